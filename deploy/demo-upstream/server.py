#!/usr/bin/env python3
"""The demo upstream for deploy/compose.yaml: an OpenAI-style chat model, standard library only.

It mirrors the bundled upstream of `tollgate demo` (src/demo.rs, `upstream_router`), which the
binary does not serve on its own: `tollgate demo` binds 127.0.0.1 on a random port and needs a
local Redis and Postgres, so it cannot stand in for one container of a compose file.

  POST /v1/chat/completions, /tokens/v1/chat/completions
        JSON with `usage`, or SSE chunk by chunk when the body says "stream": true (the last
        chunk carries `usage` when stream_options.include_usage is true)
  GET  /v1/models, /health

Listens on 0.0.0.0:$PORT (default 7001; 0 picks a free port, printed on stderr). Not for
production: it is a stand-in for your model.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHAT_PATHS = ("/v1/chat/completions", "/tokens/v1/chat/completions")


def completion(request):
    messages = request.get("messages") if isinstance(request, dict) else None
    prompt = ""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        prompt = content if isinstance(content, str) else ""
    model = request.get("model") if isinstance(request, dict) else None
    model = model if isinstance(model, str) else "demo-1"
    words = f"You said: {prompt}. This answer was metered by tollgate.".split(" ")
    prompt_tokens = max(len(prompt) // 4, 1)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(words),
        "total_tokens": prompt_tokens + len(words),
    }
    return model, words, usage


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: tollgate pools upstream connections
    server_version = "tollgate-demo-upstream"

    def log_message(self, fmt, *args):  # one line per request on stderr, like a real server
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    def send_json(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self.send_json(
                200,
                {
                    "object": "list",
                    "data": [{"id": "demo-1", "object": "model", "owned_by": "tollgate"}],
                },
            )
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        raw = self.read_body()
        if path not in CHAT_PATHS:
            self.send_json(404, {"error": "not found"})
            return
        try:
            request = json.loads(raw or b"null")
        except ValueError:
            request = None
        model, words, usage = completion(request)
        if isinstance(request, dict) and request.get("stream") is True:
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            self.stream(model, words, usage, include_usage)
            return
        self.send_json(
            200,
            {
                "id": "chatcmpl-demo",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            },
        )

    def stream(self, model, words, usage, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(data):
            payload = b"data: " + data.encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            self.wfile.flush()

        def chunk(delta, finish):
            return json.dumps(
                {
                    "id": "chatcmpl-demo",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )

        try:
            for word in words:
                event(chunk({"content": word + " "}, None))
                time.sleep(0.05)
            event(chunk({}, "stop"))
            if include_usage:
                event(
                    json.dumps(
                        {
                            "id": "chatcmpl-demo",
                            "object": "chat.completion.chunk",
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
                )
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def main():
    port = int(os.environ.get("PORT", "7001"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    sys.stderr.write(f"demo upstream listening on 0.0.0.0:{server.server_address[1]}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Drives an OpenAI-compatible endpoint with the official `openai` Python client.

    openai_client.py [BASE_URL] [API_KEY] [--expect-cut] [--query K=V]... [--header K=V]...
                     [--cut-query K=V]... [--model M] [--max-tokens N]

BASE_URL (e.g. http://127.0.0.1:8080/v1) and API_KEY fall back to $TOLLGATE_OPENAI_BASE_URL /
$OPENAI_BASE_URL and $TOLLGATE_OPENAI_API_KEY / $OPENAI_API_KEY.

Runs (1) a non-streaming chat.completions.create and (2) a streaming one with
stream_options={"include_usage": True}, then prints ONE JSON line:

    {"openai_version": "...",
     "nonstream": {"content": ..., "usage": {...} | null, "id": ..., "model": ...},
     "stream": {"content": ..., "chunks": n, "usage": {...} | null}}

With --expect-cut it also runs (3) a streaming call (with the --cut-query parameters, default
cut_after=2, as extra query parameters) that is expected to fail midway, and reports instead of
failing:

    "cut": {"raised": true, "error_class": "APIError", "error_module": "openai",
            "is_api_error": true, "message": ..., "body": ..., "content": ..., "chunks": k}

--query and --header apply to every call (extra_query / extra_headers). Retries are off, so
each call is exactly one request. Exits 1 (with a traceback on stderr) on any other error.
"""

import argparse
import json
import os
import sys

import openai


def key_values(pairs):
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected K=V, got {pair!r}")
        out[key] = value
    return out


def usage_dict(usage):
    if usage is None:
        return None
    return usage.model_dump(exclude_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", nargs="?")
    parser.add_argument("api_key", nargs="?")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--query", action="append", help="K=V query parameter for every call")
    parser.add_argument("--header", action="append", help="K=V header for every call")
    parser.add_argument("--expect-cut", action="store_true")
    parser.add_argument("--cut-query", action="append",
                        help="K=V query parameter of the --expect-cut call (default cut_after=2)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    base_url = (args.base_url or os.environ.get("TOLLGATE_OPENAI_BASE_URL")
                or os.environ.get("OPENAI_BASE_URL"))
    api_key = (args.api_key or os.environ.get("TOLLGATE_OPENAI_API_KEY")
               or os.environ.get("OPENAI_API_KEY"))
    if not base_url or not api_key:
        parser.error("BASE_URL and API_KEY are required (argv or environment)")

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                           timeout=args.timeout)
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello."},
    ]
    common = {
        "model": args.model,
        "messages": messages,
        "extra_query": key_values(args.query) or None,
        "extra_headers": key_values(args.header) or None,
    }
    if args.max_tokens is not None:
        common["max_tokens"] = args.max_tokens

    result = {"openai_version": openai.__version__}

    # (1) non-streaming
    completion = client.chat.completions.create(**common)
    result["nonstream"] = {
        "id": completion.id,
        "model": completion.model,
        "content": completion.choices[0].message.content if completion.choices else None,
        "finish_reason": completion.choices[0].finish_reason if completion.choices else None,
        "usage": usage_dict(completion.usage),
    }

    # (2) streaming with include_usage
    content, chunks, usage = [], 0, None
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **common)
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                content.append(choice.delta.content)
        if chunk.usage is not None:
            usage = usage_dict(chunk.usage)
    result["stream"] = {"content": "".join(content), "chunks": chunks, "usage": usage}

    # (3) a stream expected to break midway
    if args.expect_cut:
        cut_query = dict(key_values(args.query))
        cut_query.update(key_values(args.cut_query) or {"cut_after": "2"})
        cut_common = dict(common, extra_query=cut_query)
        content, chunks = [], 0
        cut = {"raised": False}
        try:
            stream = client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **cut_common)
            for chunk in stream:
                chunks += 1
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        content.append(choice.delta.content)
        except Exception as e:  # noqa: BLE001 - reporting it is the point
            cut = {
                "raised": True,
                "error_class": type(e).__name__,
                "error_module": type(e).__module__.split(".")[0],
                "is_api_error": isinstance(e, openai.APIError),
                "status_code": getattr(e, "status_code", None),
                "message": str(e),
                "body": getattr(e, "body", None),
            }
        cut["content"] = "".join(content)
        cut["chunks"] = chunks
        result["cut"] = cut

    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

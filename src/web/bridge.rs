//! Serves a request Pingora has read on the proxy listener with an axum router (the portal):
//! the request head and its (small) body are handed over as an `http::Request`, the answer is
//! written back to the client. This keeps the portal's pages ordinary axum handlers, like the
//! console's and the admin API's, while the proxy listener stays Pingora's.

use std::net::IpAddr;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tower::ServiceExt;

/// The largest form a portal page accepts; larger requests get 413.
const MAX_BODY: usize = 64 * 1024;
/// The largest page the portal renders (its own pages are far smaller).
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Facts about the connection the handlers need and cannot read from the request head.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// Served over TLS: cookies get `Secure`.
    pub tls: bool,
    /// For the sign-in rate limit.
    pub ip: Option<IpAddr>,
}

/// Answers the request with `router`; returns the status sent.
pub async fn serve(router: &axum::Router, session: &mut Session) -> pingora::Result<u16> {
    let head = session.req_header();
    let mut builder = http::Request::builder()
        .method(head.method.clone())
        .uri(head.uri.clone());
    for (name, value) in head.headers.iter() {
        builder = builder.header(name, value);
    }
    let info = ClientInfo {
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        ip: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
    };
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return write(
                session,
                413,
                Vec::new(),
                Bytes::from_static(b"request too large"),
            )
            .await;
        }
        body.extend_from_slice(&chunk);
    }
    let request = match builder.extension(info).body(axum::body::Body::from(body)) {
        Ok(r) => r,
        Err(_) => return write(session, 400, Vec::new(), Bytes::from_static(b"bad request")).await,
    };
    let response = match router.clone().oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_RESPONSE)
        .await
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| *name != http::header::CONTENT_LENGTH)
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    write(session, parts.status.as_u16(), headers, bytes).await
}

async fn write(
    session: &mut Session,
    status: u16,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    body: Bytes,
) -> pingora::Result<u16> {
    let mut header = ResponseHeader::build(status, Some(headers.len() + 1))?;
    for (name, value) in headers {
        // Appended, not inserted: a response may set several cookies.
        header.append_header(name, value)?;
    }
    header.insert_header("content-length", body.len().to_string())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(status)
}

//! Answers tollgate gives itself (errors, self-service JSON), written straight to the client.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::error::GatewayError;

/// Writes a JSON response. Errors writing to a gone client are not worth more than a debug line.
pub async fn json(
    session: &mut Session,
    status: u16,
    body: &serde_json::Value,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> pingora::Result<()> {
    let body = Bytes::from(body.to_string());
    let mut header = ResponseHeader::build(status, Some(4 + extra.len()))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", request_id)?;
    for (name, value) in extra {
        header.insert_header(*name, value.as_str())?;
    }
    // The request body was not read; do not try to reuse a connection that still carries it.
    if !session.is_body_empty() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

pub async fn error(
    session: &mut Session,
    err: &GatewayError,
    request_id: &str,
) -> pingora::Result<()> {
    json(
        session,
        err.status(),
        &err.body(),
        request_id,
        &err.headers(),
    )
    .await
}

/// An error after which the connection is not reused (failed proxying): say so in the
/// response (`Connection: close`) rather than close a connection advertised as keep-alive.
pub async fn error_and_close(
    session: &mut Session,
    err: &GatewayError,
    request_id: &str,
) -> pingora::Result<()> {
    session.set_keepalive(None);
    error(session, err, request_id).await
}

//! The admin API's OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! annotations and the body types' schemas, so it cannot drift from the router:
//! `tollgate openapi` prints it, `docs/openapi.yaml` is its committed copy (a test keeps the
//! two equal), and the e2e tests call every path it lists on a running tollgate.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::server::ServerBuilder;
use utoipa::{Modify, OpenApi};

use super::components::{
    AdminErrorCode, BadRequest, BadRequestOrUnknownTier, CreditsInput, Internal,
    MeteringUnavailable, NotFound, ProxyError, ProxyUnauthorized, StoreUnavailable, StripeError,
    StripeOrStoreUnavailable, TimeParam, Unauthorized, UndefinedTier, UsageParams,
};
use super::error::AdminError;
use super::schemas::{SelfBalance, Usage};
use crate::money::Credits;

/// The document as YAML, exactly as `docs/openapi.yaml` holds it.
pub fn yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&ApiDoc::openapi())
}

const DESCRIPTION: &str = r#"The admin API of tollgate, served by the `admin_listen` listener (never public), plus the
self-service subset (`/_tollgate/v1/*`) that the proxy listener answers to a caller's own
credential.

**Authentication.** Every `/v1` call carries `Authorization: Bearer <admin token>` (the token
is read from the environment variable named by `[admin] token_env` and compared in constant
time; the scheme may be written `Bearer` or `bearer`). `GET /healthz`, `GET /readyz` and
`POST /webhooks/stripe` need no token (the webhook is authenticated by its
`Stripe-Signature`).

**Errors.** Every error the admin API answers is JSON `{"error": CODE, "message": TEXT}` with
one HTTP status per stable code: `unauthorized` 401, `invalid_request` 400, `unknown_tier`
400, `invalid_signature` 400, `not_found` 404, `conflict` 409, `seat_limit_reached` 409,
`internal_error` 500, `stripe_error` 502, `store_unavailable` 503, `stripe_not_configured`
503. Clients branch on `error`; `message` is for humans. A path the router does not know
answers 404 `{"error": "not_found", "message": "no such admin endpoint"}` (without checking
the token); a known path called with a method it does not list answers 405 with an empty body
(on `/v1` paths, after the token check).

**Request bodies.** Endpoints that take a JSON body require `Content-Type: application/json`
and refuse unknown fields (`additionalProperties: false`); a missing or wrong content type,
malformed JSON, a missing required field or an unknown field is 400 `invalid_request`.
Optional fields may also be sent as `null`. Bodies are limited to 2 MiB: over it, the JSON-body
endpoints answer 400 `invalid_request`, while `POST /webhooks/stripe` and
`POST /v1/accounts/{id}/subscription/cancel` (which read the raw body) answer 413 in plain
text.

**Money.** Credit amounts are JSON numbers in credits, exact to 6 decimal places: tollgate
keeps integer micro-credits (1 credit = 1,000,000 µc) and prints the shortest exact decimal
(`12.5`, `0.3`, `0`, `-1.000001`), never a rounded float. Stripe amounts (`*_cents`) are
integer cents of the named currency.

**Times** are RFC 3339 strings in UTC. Query parameters `from`/`to` take a date
(`2026-11-01`, midnight UTC) or an RFC 3339 time.

This document is generated: `cargo run -- openapi > docs/openapi.yaml`.
"#;

#[derive(OpenApi)]
#[openapi(
    info(title = "tollgate admin API", description = DESCRIPTION),
    servers((url = "http://127.0.0.1:8081", description = "the admin listener (`[server] admin_listen`)")),
    security(("adminToken" = [])),
    tags(
        (name = "health", description = "Liveness and readiness, without a token."),
        (name = "accounts"),
        (name = "keys"),
        (name = "grants"),
        (name = "usage", description = "Usage statistics and journal history."),
        (name = "billing", description = "Catalogue, Stripe Checkout, subscriptions, revenue."),
        (name = "config", description = "Hot reload of the config file."),
        (name = "webhooks"),
        (name = "self-service", description = "On the proxy listener, authenticated with the caller's own API key or JWT."),
    ),
    paths(
        super::health::healthz,
        super::health::readyz,
        super::accounts::create,
        super::accounts::get,
        super::accounts::set_tier,
        super::accounts::set_status,
        super::keys::create,
        super::keys::revoke,
        super::grants::create,
        super::usage::get_usage,
        super::usage::get_ledger,
        super::billing::catalog,
        super::billing::checkout_pack,
        super::billing::checkout_subscription,
        super::subscription::get_subscription,
        super::subscription::change_subscription,
        super::subscription_preview::get_preview,
        super::subscription::cancel_subscription,
        super::reports::revenue,
        super::config::reload,
        super::portal::create,
        super::stripe_webhook::receive,
        self_balance,
        self_usage,
    ),
    components(
        schemas(AdminErrorCode, AdminError, ProxyError, Credits, CreditsInput, TimeParam),
        responses(
            Unauthorized,
            BadRequest,
            BadRequestOrUnknownTier,
            NotFound,
            UndefinedTier,
            Internal,
            StoreUnavailable,
            StripeOrStoreUnavailable,
            StripeError,
            ProxyUnauthorized,
            MeteringUnavailable,
        ),
    ),
    modifiers(&Finish),
)]
pub struct ApiDoc;

/// What the derive cannot say: the security schemes, the operations that need no token
/// (`security: []`, not an optional `[{}]`), and the proxy listener's paths' own server.
struct Finish;

/// Where the proxy listener answers self-service calls (`proxy::selfservice::PREFIX`; not
/// named, so the admin module does not depend on the proxy).
const SELF_SERVICE_PREFIX: &str = "/_tollgate/";

/// The operations answered without an admin token.
const OPEN_OPERATIONS: [&str; 3] = ["healthz", "readyz", "stripeWebhook"];

impl Modify for Finish {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut admin = Http::new(HttpAuthScheme::Bearer);
        admin.description = Some(
            "`Authorization: Bearer <admin token>`; the token comes from the environment variable \
             named by `[admin] token_env`. Without the header, or with another token (or when no \
             admin token is configured), every `/v1` call answers 401 `unauthorized`."
                .into(),
        );
        components.add_security_scheme("adminToken", SecurityScheme::Http(admin));
        let mut client = Http::new(HttpAuthScheme::Bearer);
        client.description = Some(
            "The caller's own API key (`tg_` + 32 base62 characters) or, with `[auth.jwt]`, a JWT \
             naming the account."
                .into(),
        );
        components.add_security_scheme("clientBearer", SecurityScheme::Http(client));
        components.add_security_scheme(
            "clientApiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "The caller's own API key, as an alternative to `Authorization`.",
            ))),
        );
        let proxy = ServerBuilder::new()
            .url("http://127.0.0.1:8080")
            .description(Some("the proxy listener (`[server] listen`)"))
            .build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            if path.starts_with(SELF_SERVICE_PREFIX) {
                item.servers = Some(vec![proxy.clone()]);
            }
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                if op
                    .operation_id
                    .as_deref()
                    .is_some_and(|id| OPEN_OPERATIONS.contains(&id))
                {
                    op.security = Some(Vec::new());
                }
            }
        }
    }
}

/// `GET /_tollgate/v1/balance`, answered by [`crate::proxy::selfservice`] (not axum).
#[utoipa::path(
    get,
    path = "/_tollgate/v1/balance",
    tag = "self-service",
    operation_id = "selfBalance",
    summary = "The caller's own balance",
    description = "Answered by tollgate on the proxy listener, never forwarded, not metered. \
        After authentication, any other method or path under `/_tollgate/` answers 404 \
        `route_not_found`.",
    security(("clientBearer" = []), ("clientApiKey" = [])),
    responses(
        (status = 200, description = "The caller's account.", body = SelfBalance,
            headers(("X-Request-Id" = String, description = "The request's id."))),
        (status = 401, response = ProxyUnauthorized),
        (status = 503, response = MeteringUnavailable),
    )
)]
#[allow(dead_code)]
fn self_balance() {}

/// `GET /_tollgate/v1/usage`, answered by [`crate::proxy::selfservice`] (not axum).
#[utoipa::path(
    get,
    path = "/_tollgate/v1/usage",
    tag = "self-service",
    operation_id = "selfUsage",
    summary = "The caller's own usage",
    description = "The same answer and parameters as `GET /v1/accounts/{id}/usage`, for the \
        caller's account.",
    security(("clientBearer" = []), ("clientApiKey" = [])),
    params(UsageParams),
    responses(
        (status = 200, description = "Totals without `group_by`; `groups` with it.", body = Usage,
            headers(("X-Request-Id" = String, description = "The request's id."))),
        (status = 400, description = "`invalid_request`: a bad `from`, `to` or `group_by`.",
            body = ProxyError),
        (status = 401, response = ProxyUnauthorized),
        (status = 503, response = MeteringUnavailable),
    )
)]
#[allow(dead_code)]
fn self_usage() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's check that the committed copy is the generated document.
    #[test]
    fn committed_document_is_current() {
        let generated = yaml().expect("the document serializes");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
        let committed = std::fs::read_to_string(path).expect("docs/openapi.yaml");
        assert!(
            generated == committed,
            "docs/openapi.yaml is stale: run `cargo run -- openapi > docs/openapi.yaml`"
        );
    }
}

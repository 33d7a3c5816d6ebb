//! The OpenAPI components the handlers' `#[utoipa::path]` annotations share: the reusable
//! error responses, the error and money schemas, the usage parameters. Apart from
//! `openapi.rs` (which names the handlers) so that handlers and document do not import each
//! other.

use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{AdditionalProperties, AllOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, Schema};
use utoipa::{PartialSchema, ToResponse, ToSchema};

use super::error::AdminError;
use crate::money::Credits;

/// The stable codes `AdminError::code` answers (a test checks the two agree).
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdminErrorCode {
    Unauthorized,
    InvalidRequest,
    UnknownTier,
    InvalidSignature,
    NotFound,
    Conflict,
    SeatLimitReached,
    InternalError,
    StripeError,
    StoreUnavailable,
    StripeNotConfigured,
}

/// Every admin API error: one HTTP status per code (see the API description).
impl PartialSchema for AdminError {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "Every admin API error. One HTTP status per code (see the API description).",
            ))
            .property("error", Ref::from_schema_name("AdminErrorCode"))
            .required("error")
            .property(
                "message",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("For humans; not stable.")),
            )
            .required("message")
            .property(
                "dependency",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["postgres"]))
                    .description(Some(
                        "`store_unavailable` because the call needs Postgres and it does not answer.",
                    )),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for AdminError {}

/// An error the proxy listener answers itself.
pub struct ProxyError;

impl PartialSchema for ProxyError {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "An error the proxy listener answers itself: `{\"error\": CODE, \"message\": TEXT, \
                 ...details}` (the details depend on the code; see the README's HTTP contract).",
            ))
            .property(
                "error",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(crate::error::CODES)),
            )
            .required("error")
            .property("message", ObjectBuilder::new().schema_type(Type::String))
            .required("message")
            .into()
    }
}

impl ToSchema for ProxyError {}

/// Credits are printed as exact decimals (see [`Credits`]'s `Serialize`).
impl PartialSchema for Credits {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .description(Some(
                "An amount of credits as a JSON number, exact to 6 decimal places (tollgate keeps \
                 integer micro-credits and prints the shortest exact decimal; never a rounded float).",
            ))
            .examples([serde_json::json!(12.5), serde_json::json!(0.2), serde_json::json!(0)])
            .into()
    }
}

impl ToSchema for Credits {}

/// `credits` in a request: [`Credits`]' `Deserialize` takes a number or a decimal string.
pub struct CreditsInput;

impl PartialSchema for CreditsInput {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                Type::Number,
                Type::String,
            ]))
            .description(Some(
                "An amount of credits: a JSON number, or a decimal string (`\"12.5\"`). At most 6 \
                 decimal places (more is refused, never rounded); no exponent in strings.",
            ))
            .examples([
                serde_json::json!(100),
                serde_json::json!(12.5),
                serde_json::json!("0.000001"),
            ])
            .into()
    }
}

impl ToSchema for CreditsInput {}

/// A `from`/`to` query parameter ([`crate::journal::usage::parse_time`]).
pub struct TimeParam;

impl PartialSchema for TimeParam {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "A date (`YYYY-MM-DD`, midnight UTC) or an RFC 3339 time.",
            ))
            .examples(["2026-11-01", "2026-11-01T12:00:00Z"])
            .into()
    }
}

impl ToSchema for TimeParam {}

/// An error response whose `error` is one of `codes`, on `base` (`AdminError` or `ProxyError`).
fn error_response(description: &str, base: &str, codes: &[&str], headers: bool) -> Response {
    let schema = AllOfBuilder::new().item(Ref::from_schema_name(base)).item(
        ObjectBuilder::new().property(
            "error",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(codes.iter().copied())),
        ),
    );
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new().schema(Some(schema)).build(),
    );
    if headers {
        response = response.header("X-Request-Id", request_id_header());
    }
    response.build()
}

fn request_id_header() -> utoipa::openapi::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::String))
        .description(Some(
            "The request's id (the client's own `X-Request-Id` when it sent one).",
        ))
        .build()
}

/// A reusable error response (`components/responses`), referenced by the paths.
macro_rules! error_response {
    ($name:ident, $base:literal, $headers:literal, [$($code:literal),+], $description:literal) => {
        #[doc = $description]
        pub struct $name;

        impl<'r> ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                (
                    stringify!($name),
                    error_response($description, $base, &[$($code),+], $headers).into(),
                )
            }
        }
    };
}

error_response!(
    Unauthorized,
    "AdminError",
    false,
    ["unauthorized"],
    "`unauthorized`: no `Authorization: Bearer` header, or not the admin token."
);
error_response!(
    BadRequest,
    "AdminError",
    false,
    ["invalid_request"],
    "`invalid_request`: the body, a parameter or a field is not valid; `message` says which."
);
error_response!(BadRequestOrUnknownTier, "AdminError", false, ["invalid_request", "unknown_tier"],
    "`invalid_request` (the body or a field is not valid) or `unknown_tier` (the config defines no such tier).");
error_response!(
    NotFound,
    "AdminError",
    false,
    ["not_found"],
    "`not_found`: no such account."
);
error_response!(
    UndefinedTier,
    "AdminError",
    false,
    ["conflict"],
    "`conflict`: the account is on a tier the config does not define."
);
error_response!(
    Internal,
    "AdminError",
    false,
    ["internal_error"],
    "`internal_error`: an unexpected store error (details are logged, not answered)."
);
error_response!(
    StoreUnavailable,
    "AdminError",
    false,
    ["store_unavailable"],
    "`store_unavailable`: Redis or Postgres is unreachable (details are logged, not answered)."
);
error_response!(StripeOrStoreUnavailable, "AdminError", false, ["stripe_not_configured", "store_unavailable"],
    "`stripe_not_configured` (no `[stripe]` section or no Stripe secret key) or `store_unavailable`.");
error_response!(StripeError, "AdminError", false, ["stripe_error"],
    "`stripe_error`: Stripe refused the call, could not be reached, or did not answer within `stripe.timeout_ms`; `message` carries Stripe's reason.");
error_response!(
    ProxyUnauthorized,
    "ProxyError",
    true,
    ["missing_credentials", "invalid_credentials"],
    "`missing_credentials` (no key or JWT sent) or `invalid_credentials`."
);
error_response!(
    MeteringUnavailable,
    "ProxyError",
    true,
    ["metering_unavailable"],
    "`metering_unavailable`: Redis or Postgres could not be asked."
);

/// The usage question's query parameters ([`crate::domain::usage::usage_params`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Start of the range (inclusive). Default `to` − 30 days. Never earlier than the
    /// account's tier `history_days` allows: an earlier `from` starts at that limit, and the
    /// answer's `from` says so.
    #[param(value_type = Option<TimeParam>)]
    pub from: Option<String>,
    /// End of the range (exclusive). Default now.
    #[param(value_type = Option<TimeParam>)]
    pub to: Option<String>,
    /// Group the totals (`route`, `action` or `day`); empty or absent = one total.
    pub group_by: Option<String>,
}

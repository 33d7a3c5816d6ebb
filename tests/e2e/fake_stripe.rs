//! A fake Stripe API (axum, in process, on 127.0.0.1:0) for the endpoints tollgate calls:
//! `POST /v1/customers`, `POST /v1/checkout/sessions`, `GET|POST|DELETE /v1/subscriptions/{id}`,
//! `POST /v1/billing_portal/sessions` (whose `url` is a small page the fake serves itself, at
//! `GET /billing_portal/p/{id}`), `POST /v1/invoices/create_preview` (a subscription moved to
//! another price, prorated by [`proration`] at the requested `proration_date`).
//! Answers are Stripe's own object shapes from `tests/fixtures/stripe/` with ids, metadata and
//! prices filled in from the request, so async-stripe parses them exactly as it parses Stripe.
//!
//! It records every request (method, path, headers, the form body as key/value pairs), replays
//! the first answer for a repeated `Idempotency-Key` (as Stripe does), and can be switched to
//! answer errors ([`Mode::Fail`]) or to never answer ([`Mode::Hang`]).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A Stripe fixture (`tests/fixtures/stripe/<name>.json`) as JSON.
pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stripe")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The form body, decoded (`metadata[account_id]` → value), in order.
    pub form: Vec<(String, String)>,
}

impl Recorded {
    /// The first value of a form key.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn idempotency_key(&self) -> Option<String> {
        self.headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method.as_str() == method && self.path == path
    }
}

/// How the fake answers.
#[derive(Debug, Clone)]
pub enum Mode {
    Normal,
    /// Every call answers this Stripe error.
    Fail {
        status: u16,
        kind: String,
        code: Option<String>,
        message: String,
    },
    /// Every call waits (far longer than tollgate's timeout) and never answers.
    Hang,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    mode: Mutex<Option<Mode>>,
    /// (path, idempotency key) → the first answer.
    replies: Mutex<HashMap<(String, String), (StatusCode, Value)>>,
    subscriptions: Mutex<HashMap<String, Value>>,
    seq: AtomicUsize,
}

pub struct FakeStripe {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStripe {
    pub async fn start() -> FakeStripe {
        let shared = Arc::new(Shared::default());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake Stripe");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeStripe { addr, shared, task }
    }

    /// The base URL for `[stripe] api_base`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests to `method path`.
    pub fn calls(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.is(method, path))
            .collect()
    }

    /// A live subscription on `price_id` that `GET/POST/DELETE /v1/subscriptions/{id}` serve.
    pub fn add_subscription(&self, id: &str, price_id: &str, account_id: &str) {
        let mut s = fixture("subscription");
        s["id"] = json!(id);
        s["status"] = json!("active");
        s["cancel_at_period_end"] = json!(false);
        s["canceled_at"] = Value::Null;
        s["ended_at"] = Value::Null;
        s["cancel_at"] = Value::Null;
        s["metadata"] = json!({"account_id": account_id});
        s["items"]["data"][0]["id"] = json!(format!("si_{id}"));
        s["items"]["data"][0]["subscription"] = json!(id);
        s["items"]["data"][0]["price"]["id"] = json!(price_id);
        s["items"]["url"] = json!(format!("/v1/subscription_items?subscription={id}"));
        self.shared
            .subscriptions
            .lock()
            .unwrap()
            .insert(id.to_string(), s);
    }

    /// Sets the subscription item's current period (the fixture's is not a real one), which a
    /// preview prorates over.
    pub fn set_period(&self, id: &str, start: i64, end: i64) {
        let mut subs = self.shared.subscriptions.lock().unwrap();
        let sub = subs.get_mut(id).expect("a subscription added first");
        sub["items"]["data"][0]["current_period_start"] = json!(start);
        sub["items"]["data"][0]["current_period_end"] = json!(end);
    }

    /// The fake's current view of a subscription.
    pub fn subscription(&self, id: &str) -> Option<Value> {
        self.shared.subscriptions.lock().unwrap().get(id).cloned()
    }
}

fn stripe_error(status: u16, kind: &str, code: Option<&str>, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        json!({"error": {"type": kind, "code": code, "message": message}}),
    )
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body)
        .chain(url::form_urlencoded::parse(
            parts.uri.query().unwrap_or_default().as_bytes(),
        ))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let recorded = Recorded {
        method: parts.method.clone(),
        path: path.clone(),
        headers: parts.headers.clone(),
        form,
    };
    shared.requests.lock().unwrap().push(recorded.clone());

    let mode = shared.mode.lock().unwrap().clone().unwrap_or(Mode::Normal);
    match mode {
        Mode::Normal => {}
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        Mode::Fail {
            status,
            kind,
            code,
            message,
        } => {
            let (status, body) = stripe_error(status, &kind, code.as_deref(), &message);
            return (status, Json(body)).into_response();
        }
    }
    if parts.method == Method::GET && path.starts_with("/billing_portal/p/") {
        return axum::response::Html(
            "<!doctype html><title>Billing portal</title><h1 id=\"fake-billing-portal\">Fake Stripe billing portal</h1>",
        )
        .into_response();
    }
    if parts.headers.get(http::header::AUTHORIZATION).is_none() {
        let (s, b) = stripe_error(401, "invalid_request_error", None, "No API key provided.");
        return (s, Json(b)).into_response();
    }

    let key = recorded
        .idempotency_key()
        .map(|k| (format!("{} {path}", parts.method), k));
    if let Some(key) = &key {
        if let Some((status, body)) = shared.replies.lock().unwrap().get(key).cloned() {
            return (status, [("idempotent-replayed", "true")], Json(body)).into_response();
        }
    }
    let (status, body) = answer(&shared, &recorded);
    if let Some(key) = key {
        shared
            .replies
            .lock()
            .unwrap()
            .insert(key, (status, body.clone()));
    }
    (status, Json(body)).into_response()
}

fn metadata(r: &Recorded, prefix: &str) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &r.form {
        if let Some(name) = k
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('['))
            .and_then(|rest| rest.strip_suffix(']'))
        {
            m.insert(name.to_string(), json!(v));
        }
    }
    Value::Object(m)
}

fn answer(shared: &Shared, r: &Recorded) -> (StatusCode, Value) {
    let n = shared.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let segments: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
    match (r.method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "billing_portal", "sessions"]) => {
            let host = r
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            let id = format!("bps_fake{n}");
            (
                StatusCode::OK,
                json!({
                    "id": id, "object": "billing_portal.session",
                    "configuration": "bpc_fake", "created": 1_700_000_000,
                    "customer": r.field("customer"), "customer_account": null,
                    "flow": null, "livemode": false, "locale": null, "on_behalf_of": null,
                    "return_url": r.field("return_url"),
                    "url": format!("http://{host}/billing_portal/p/{id}"),
                }),
            )
        }
        ("POST", ["v1", "customers"]) => {
            let mut c = fixture("customer");
            c["id"] = json!(format!("cus_fake{n}"));
            c["metadata"] = metadata(r, "metadata");
            c["description"] = json!(r.field("description"));
            (StatusCode::OK, c)
        }
        ("POST", ["v1", "checkout", "sessions"]) => {
            let mut s = fixture("checkout.session");
            let id = format!("cs_test_fake{n}");
            s["id"] = json!(id);
            s["url"] = json!(format!("https://checkout.stripe.com/c/pay/{id}"));
            s["mode"] = json!(r.field("mode"));
            s["client_reference_id"] = json!(r.field("client_reference_id"));
            s["customer"] = json!(r.field("customer"));
            s["metadata"] = metadata(r, "metadata");
            s["status"] = json!("open");
            s["payment_status"] = json!("unpaid");
            s["payment_intent"] = Value::Null;
            s["success_url"] = json!(r.field("success_url"));
            s["cancel_url"] = json!(r.field("cancel_url"));
            (StatusCode::OK, s)
        }
        ("POST", ["v1", "invoices", "create_preview"]) => preview(shared, r, n),
        (method, ["v1", "subscriptions", id]) => {
            let mut subs = shared.subscriptions.lock().unwrap();
            let Some(sub) = subs.get_mut(*id) else {
                return stripe_error(
                    404,
                    "invalid_request_error",
                    Some("resource_missing"),
                    &format!("No such subscription: '{id}'"),
                );
            };
            match method {
                "GET" => {}
                "POST" => {
                    if let Some(price) = r.field("items[0][price]") {
                        sub["items"]["data"][0]["price"]["id"] = json!(price);
                    }
                    if let Some(cancel) = r.field("cancel_at_period_end") {
                        sub["cancel_at_period_end"] = json!(cancel == "true");
                    }
                    let meta = metadata(r, "metadata");
                    if meta.as_object().is_some_and(|m| !m.is_empty()) {
                        sub["metadata"] = meta;
                    }
                }
                "DELETE" => {
                    sub["status"] = json!("canceled");
                    sub["canceled_at"] = json!(1_700_000_000);
                }
                _ => return stripe_error(405, "invalid_request_error", None, "method not allowed"),
            }
            (StatusCode::OK, sub.clone())
        }
        _ => stripe_error(
            404,
            "invalid_request_error",
            None,
            &format!("Unrecognized request URL ({} {}).", r.method, r.path),
        ),
    }
}

/// What the fake's prices cost a period, in cents (the e2e Stripe config's tier prices).
pub fn unit_amount(price_id: &str) -> i64 {
    match price_id {
        "price_pro_month" => 4900,
        "price_pro_year" => 49000,
        "price_team_month" => 19900,
        _ => 1000,
    }
}

/// The fake's proration of a move from `old` to `new` cents a period at `at` within
/// `[start, end)`: the unused time on the old price credited, the rest on the new one charged
/// (each rounded toward zero, like two separate Stripe lines).
pub fn proration(old: i64, new: i64, start: i64, end: i64, at: i64) -> (i64, i64) {
    let left = end - at;
    let period = end - start;
    (-(old * left / period), new * left / period)
}

/// `POST /v1/invoices/create_preview` for `subscription` with `subscription_details[items][0]`
/// moved to another price: Stripe's invoice shape (the fixture) with two proration lines and
/// the next period's line.
fn preview(shared: &Shared, r: &Recorded, n: usize) -> (StatusCode, Value) {
    let Some(sub_id) = r.field("subscription") else {
        return stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_missing"),
            "Missing required param: subscription.",
        );
    };
    let Some(sub) = shared.subscriptions.lock().unwrap().get(sub_id).cloned() else {
        return stripe_error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such subscription: '{sub_id}'"),
        );
    };
    let item = &sub["items"]["data"][0];
    if r.field("subscription_details[items][0][id]") != item["id"].as_str() {
        return stripe_error(
            400,
            "invalid_request_error",
            None,
            "subscription_details[items][0][id] is not an item of this subscription.",
        );
    }
    let Some(new_price) = r.field("subscription_details[items][0][price]") else {
        return stripe_error(
            400,
            "invalid_request_error",
            None,
            "Missing subscription_details[items][0][price].",
        );
    };
    let old_price = item["price"]["id"].as_str().unwrap_or_default();
    let start = item["current_period_start"].as_i64().unwrap_or_default();
    let end = item["current_period_end"].as_i64().unwrap_or_default();
    let at: i64 = match r
        .field("subscription_details[proration_date]")
        .map(str::parse)
    {
        Some(Ok(at)) if at >= start && at < end => at,
        _ => {
            return stripe_error(
                400,
                "invalid_request_error",
                None,
                "subscription_details[proration_date] must be within the current period.",
            )
        }
    };
    let (credit, charge) = proration(
        unit_amount(old_price),
        unit_amount(new_price),
        start,
        end,
        at,
    );
    let next = unit_amount(new_price);
    let line = |i: usize,
                amount: i64,
                description: String,
                proration: bool,
                price: &str,
                from: i64,
                to: i64| {
        json!({
            "amount": amount, "currency": "usd", "description": description,
            "discount_amounts": [], "discountable": !proration, "discounts": [],
            "id": format!("il_tmp_fake{n}_{i}"), "invoice": null, "livemode": false,
            "metadata": {}, "object": "line_item",
            "period": {"start": from, "end": to},
            "quantity": 1, "subscription": sub_id, "pretax_credit_amounts": [], "taxes": [],
            "parent": {
                "invoice_item_details": null,
                "subscription_item_details": {
                    "invoice_item": null, "proration": proration, "proration_details": {"credited_items": null},
                    "subscription": sub_id, "subscription_item": item["id"],
                },
                "type": "subscription_item_details",
            },
            "pricing": {"type": "price_details", "price_details": {"price": price, "product": "prod_fake"}, "unit_amount_decimal": null},
            "subtotal": amount, "quantity_decimal": "1",
        })
    };
    let lines = vec![
        line(
            0,
            credit,
            format!("Unused time on {old_price} after proration date"),
            true,
            old_price,
            at,
            end,
        ),
        line(
            1,
            charge,
            format!("Remaining time on {new_price} after proration date"),
            true,
            new_price,
            at,
            end,
        ),
        line(
            2,
            next,
            format!("1 × {new_price}"),
            false,
            new_price,
            end,
            end + (end - start),
        ),
    ];
    let total = credit + charge + next;
    let mut inv = fixture("invoice");
    inv["id"] = json!(format!("upcoming_in_fake{n}"));
    inv["object"] = json!("invoice");
    inv["customer"] = json!(r.field("customer"));
    inv["currency"] = json!("usd");
    inv["billing_reason"] = json!("upcoming");
    inv["status"] = json!("draft");
    inv["lines"]["data"] = json!(lines);
    inv["lines"]["url"] = json!("/v1/invoices/upcoming/lines");
    inv["subtotal"] = json!(total);
    inv["subtotal_excluding_tax"] = json!(total);
    inv["total"] = json!(total);
    inv["total_excluding_tax"] = json!(total);
    inv["amount_due"] = json!(total.max(0));
    inv["amount_remaining"] = json!(total.max(0));
    inv["amount_paid"] = json!(0);
    inv["parent"] = json!({
        "quote_details": null,
        "subscription_details": {"metadata": sub["metadata"], "subscription": sub_id, "subscription_proration_date": at},
        "type": "subscription_details",
    });
    inv["period_start"] = json!(start);
    inv["period_end"] = json!(end);
    (StatusCode::OK, inv)
}

//! Typed views of the event objects, as lenient as reading JSON paths by hand: every field is
//! optional, a missing, null or differently-typed field reads as `None` (never a refusal),
//! and unknown fields are ignored. An expandable reference reads as its id, whether Stripe
//! sent the id or the expanded object.

use std::collections::HashMap;

use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;
use serde_json::Value;

/// The field if it has the expected type, else `None`.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(d)?).ok())
}

/// An expandable reference's id: the string itself or the object's `id`; empty is `None`.
fn expandable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Value::deserialize(d)?;
    let id = v
        .as_str()
        .or_else(|| v.get("id").and_then(Value::as_str))
        .filter(|s| !s.is_empty());
    Ok(id.map(str::to_string))
}

/// The first element of a list object's `data`, read as `T` (all `None` when it is not an
/// object); `None` when there is no first element.
fn first_of_list<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    d: D,
) -> Result<Option<T>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(v.get("data").and_then(|data| data.get(0)).map(read))
}

/// Each element of a list read as `T` (all `None` when it is not an object); empty when the
/// field is not a list.
fn each_of_list<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(v.as_array()
        .map(|items| items.iter().map(read).collect())
        .unwrap_or_default())
}

/// Reads an event's object as `T`; an object that is not a JSON object reads as all `None`.
pub(super) fn read<T: DeserializeOwned + Default>(object: &Value) -> T {
    T::deserialize(object).unwrap_or_default()
}

/// A Checkout Session (`checkout.session.*`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct CheckoutSession {
    #[serde(deserialize_with = "lenient")]
    pub id: Option<String>,
    /// `payment` (a credit pack) or `subscription`.
    #[serde(deserialize_with = "lenient")]
    pub mode: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub payment_status: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub amount_total: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub currency: Option<String>,
    #[serde(deserialize_with = "expandable")]
    pub payment_intent: Option<String>,
    #[serde(deserialize_with = "expandable")]
    pub subscription: Option<String>,
    #[serde(deserialize_with = "expandable")]
    pub customer: Option<String>,
}

/// An invoice (`invoice.*`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Invoice {
    #[serde(deserialize_with = "lenient")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub billing_reason: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub currency: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub amount_paid: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub amount_due: Option<i64>,
    /// Where the subscription was before the 2025 API (`parent.subscription_details` since).
    #[serde(deserialize_with = "expandable")]
    pub subscription: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub parent: Option<InvoiceParent>,
    #[serde(deserialize_with = "lenient")]
    pub lines: Option<InvoiceLines>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceParent {
    #[serde(deserialize_with = "lenient")]
    pub subscription_details: Option<SubscriptionDetails>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SubscriptionDetails {
    #[serde(deserialize_with = "expandable")]
    pub subscription: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub metadata: Option<HashMap<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceLines {
    #[serde(deserialize_with = "each_of_list")]
    pub data: Vec<InvoiceLine>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct InvoiceLine {
    #[serde(deserialize_with = "lenient")]
    pub period: Option<Period>,
    /// The line's price since the 2025 API (`pricing.price_details.price`), else `price.id`.
    #[serde(deserialize_with = "lenient")]
    pub pricing: Option<LinePricing>,
    #[serde(deserialize_with = "lenient")]
    pub price: Option<Price>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Period {
    #[serde(deserialize_with = "lenient")]
    pub start: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub end: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LinePricing {
    #[serde(deserialize_with = "lenient")]
    pub price_details: Option<PriceDetails>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PriceDetails {
    #[serde(deserialize_with = "lenient")]
    pub price: Option<String>,
}

/// A subscription (`customer.subscription.*`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Subscription {
    #[serde(deserialize_with = "lenient")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub status: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub cancel_at_period_end: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub ended_at: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub canceled_at: Option<i64>,
    /// Before 2025 the periods were on the subscription; since, on its items.
    #[serde(deserialize_with = "lenient")]
    pub current_period_start: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub current_period_end: Option<i64>,
    /// The first of `items.data` (tollgate sells one price per subscription).
    #[serde(rename = "items", deserialize_with = "first_of_list")]
    pub first_item: Option<SubscriptionItem>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SubscriptionItem {
    #[serde(deserialize_with = "lenient")]
    pub price: Option<Price>,
    /// The price's id under its pre-2018 name.
    #[serde(deserialize_with = "lenient")]
    pub plan: Option<Plan>,
    #[serde(deserialize_with = "lenient")]
    pub current_period_start: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub current_period_end: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Price {
    #[serde(deserialize_with = "lenient")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub unit_amount: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub currency: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub recurring: Option<Recurring>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Recurring {
    #[serde(deserialize_with = "lenient")]
    pub interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Plan {
    #[serde(deserialize_with = "lenient")]
    pub id: Option<String>,
}

/// A charge (`charge.refunded`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Charge {
    #[serde(deserialize_with = "lenient")]
    pub id: Option<String>,
    #[serde(deserialize_with = "expandable")]
    pub payment_intent: Option<String>,
    /// In the currency's smallest unit.
    #[serde(deserialize_with = "lenient")]
    pub amount: Option<i64>,
    /// Cumulative over the charge's refunds.
    #[serde(deserialize_with = "lenient")]
    pub amount_refunded: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_of_another_type_or_missing_read_as_none_and_unknown_ones_are_ignored() {
        let c: Charge = read(&json!({"id": 7, "amount": "12", "amount_refunded": 5, "extra": {}}));
        assert_eq!(c.id, None);
        assert_eq!(c.amount, None);
        assert_eq!(c.amount_refunded, Some(5));
        assert_eq!(c.payment_intent, None);
        let c: Charge = read(&json!(null));
        assert_eq!(c.amount_refunded, None);
    }

    #[test]
    fn expandable_references_read_as_their_id() {
        let s: CheckoutSession = read(&json!({
            "payment_intent": "pi_1", "customer": {"id": "cus_1", "email": "a@b"}, "subscription": ""
        }));
        assert_eq!(s.payment_intent.as_deref(), Some("pi_1"));
        assert_eq!(s.customer.as_deref(), Some("cus_1"));
        assert_eq!(s.subscription, None);
    }
}

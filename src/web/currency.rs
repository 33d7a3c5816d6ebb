//! Amounts in a currency's minor units (as Stripe gives them) as page text, with integer
//! arithmetic only: `1234 usd` → `$12.34`, `500 jpy` → `¥500`, `1500 kwd` → `1.500 KWD`.

/// Stripe's zero-decimal currencies: the amount is already in whole units.
const ZERO_DECIMAL: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];

/// Stripe's three-decimal currencies.
const THREE_DECIMAL: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];

/// The absolute value of `minor` in `currency` (lowercase ISO code), e.g. `$12.34`; the caller
/// words the sign ("charged" / "credited").
pub fn show_minor(minor: i64, currency: &str) -> String {
    let currency = currency.to_ascii_lowercase();
    let abs = minor.unsigned_abs();
    let number = if ZERO_DECIMAL.contains(&currency.as_str()) {
        abs.to_string()
    } else if THREE_DECIMAL.contains(&currency.as_str()) {
        format!("{}.{:03}", abs / 1000, abs % 1000)
    } else {
        format!("{}.{:02}", abs / 100, abs % 100)
    };
    match currency.as_str() {
        "usd" => format!("${number}"),
        "eur" => format!("€{number}"),
        "gbp" => format!("£{number}"),
        "jpy" => format!("¥{number}"),
        other => format!("{number} {}", other.to_ascii_uppercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_are_shown_exactly() {
        assert_eq!(show_minor(1234, "usd"), "$12.34");
        assert_eq!(show_minor(-5, "usd"), "$0.05");
        assert_eq!(show_minor(0, "eur"), "€0.00");
        assert_eq!(show_minor(500, "JPY"), "¥500");
        assert_eq!(show_minor(1500, "kwd"), "1.500 KWD");
        assert_eq!(show_minor(199, "chf"), "1.99 CHF");
        assert_eq!(show_minor(i64::MIN, "usd"), "$92233720368547758.08");
    }
}

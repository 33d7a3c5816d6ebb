//! `[[credit_packs]]`: ids, amounts and currency of the packs for sale.

use super::*;

/// `[[credit_packs]]`: unique ids, positive credits, a currency.
pub(super) fn packs(raw: &raw::Config, p: &mut Problems) -> Vec<raw::CreditPack> {
    // [[credit_packs]]
    let mut pack_ids = BTreeSet::new();
    for (i, pack) in raw.credit_packs.iter().enumerate() {
        let f = format!("credit_packs[{i}]");
        if !is_name(&pack.id) {
            p.add(
                format!("{f}.id"),
                format!("{:?} is not a valid id", pack.id),
            );
        }
        if !pack_ids.insert(pack.id.clone()) {
            p.add(format!("{f}.id"), format!("duplicate pack {:?}", pack.id));
        }
        if pack.credits.micros() <= 0 {
            p.add(format!("{f}.credits"), "must be greater than 0");
        }
        if pack.bonus_credits.is_negative() {
            p.add(format!("{f}.bonus_credits"), "must not be negative");
        }
        if !is_currency(&pack.currency) {
            p.add(
                format!("{f}.currency"),
                "must be a lowercase ISO 4217 code such as \"usd\"",
            );
        }
    }
    raw.credit_packs.clone()
}

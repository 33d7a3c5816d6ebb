//! The `proration_date` a tier change may pass back: the instant of a recent preview, so
//! Stripe charges what the preview showed and nobody picks an old instant to shift the proration.

use super::error::AdminError;

/// How long a preview's `proration_date` may be passed back: long enough to read the confirm
/// page, short enough that nobody can choose an old instant to shift the proration.
pub const PREVIEW_VALID_SECONDS: i64 = 3600;

/// A change may only pass back a recent preview's instant (not a chosen one).
pub fn check_proration_date(at: i64, now: i64) -> Result<(), AdminError> {
    if at > now + 60 || at < now - PREVIEW_VALID_SECONDS {
        return Err(AdminError::BadRequest(format!(
            "proration_date {at} is not from a preview of the last {} minutes; preview the change again",
            PREVIEW_VALID_SECONDS / 60
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_recent_proration_date_is_accepted() {
        let now = 1_800_000_000;
        assert!(check_proration_date(now, now).is_ok());
        assert!(check_proration_date(now - PREVIEW_VALID_SECONDS, now).is_ok());
        assert!(check_proration_date(now - PREVIEW_VALID_SECONDS - 1, now).is_err());
        assert!(check_proration_date(now + 3600, now).is_err());
    }
}

//! `[portal]`: public origin (without trailing slash), link and session lifetimes.

use super::*;

/// `[portal]`: `public_url` is an origin (stored without its trailing slash); TTLs in range.
pub(super) fn portal(raw: &raw::Config, p: &mut Problems) -> raw::Portal {
    // [portal]
    let mut portal = raw.portal.clone();
    if let Some(public) = portal.public_url.as_mut() {
        match url::Url::parse(public) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.path() == "/"
                    && u.query().is_none() =>
            {
                *public = public.trim_end_matches('/').to_string();
            }
            _ => p.add(
                "portal.public_url",
                format!("{public:?} must be an http:// or https:// origin (scheme, host, optional port; no path)"),
            ),
        }
    }
    if !(60..=86_400).contains(&portal.link_ttl_seconds) {
        p.add("portal.link_ttl_seconds", "must be between 60 and 86400");
    }
    if !(1..=3600).contains(&portal.key_used_flush_seconds) {
        p.add(
            "portal.key_used_flush_seconds",
            "must be between 1 and 3600",
        );
    }
    if !(300..=86_400).contains(&portal.session_ttl_seconds) {
        p.add(
            "portal.session_ttl_seconds",
            "must be between 300 and 86400",
        );
    }
    portal
}

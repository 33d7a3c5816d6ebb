//! The refund policy: which failures give the caller's charge back. A route's `refund_on`
//! decides for connect errors, timeouts and upstream 5xx; tollgate's own refusal after
//! charging is always refunded.

use crate::config::{RefundOn, RouteConfig};

/// Why a request failed, as far as the refund policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    ConnectError,
    Timeout,
    Upstream5xx,
    /// tollgate itself refused the request after charging (a chunked body over the tier's
    /// limit): always refunded, whatever the route's policy.
    Refused,
}

impl Failure {
    fn policy(self) -> Option<RefundOn> {
        match self {
            Failure::ConnectError => Some(RefundOn::ConnectError),
            Failure::Timeout => Some(RefundOn::Timeout),
            Failure::Upstream5xx => Some(RefundOn::Status5xx),
            Failure::Refused => None,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::ConnectError => "connect_error",
            Failure::Timeout => "timeout",
            Failure::Upstream5xx => "upstream_5xx",
            Failure::Refused => "refused_by_tollgate",
        }
    }
}

pub fn should_refund(route: &RouteConfig, failure: Option<Failure>) -> bool {
    failure.is_some_and(|f| f.policy().is_none_or(|p| route.refunds(p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const ROUTES: &str = r#"
[[routes]]
name = "default"
path_prefix = "/d"
upstream = "u"
cost = 1
[[routes]]
name = "all"
path_prefix = "/a"
upstream = "u"
cost = 1
refund_on = ["connect_error", "5xx", "timeout"]
[[routes]]
name = "none"
path_prefix = "/n"
upstream = "u"
cost = 1
refund_on = []
"#;

    fn route(name: &str) -> Arc<RouteConfig> {
        let c = crate::config::for_tests(ROUTES);
        c.routes.into_iter().find(|r| r.name == name).unwrap()
    }

    #[test]
    fn refunds_follow_the_routes_policy() {
        use Failure::*;
        let (default, all, none) = (route("default"), route("all"), route("none"));
        // README: `refund_on` defaults to connect errors and 5xx.
        assert!(should_refund(&default, Some(ConnectError)));
        assert!(should_refund(&default, Some(Upstream5xx)));
        assert!(!should_refund(&default, Some(Timeout)));
        assert!(should_refund(&all, Some(Timeout)));
        assert!(!should_refund(&none, Some(ConnectError)));
        assert!(!should_refund(&none, Some(Upstream5xx)));
        // tollgate's own refusal after charging is refunded whatever the policy says.
        assert!(should_refund(&none, Some(Refused)));
        // A request that did not fail is never refunded.
        assert!(!should_refund(&all, None));
        assert_eq!(Upstream5xx.reason(), "upstream_5xx");
        assert_eq!(Refused.reason(), "refused_by_tollgate");
    }
}

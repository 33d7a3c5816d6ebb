//! The route table (the proxy's phase 1): method + longest path prefix, matched on whole
//! path segments (`/v1/chat` matches `/v1/chat/completions`, not `/v1/chatter`). Built with
//! each config snapshot, so it lives outside `proxy/`.

use std::sync::Arc;

use http::Method;

use crate::config::RouteConfig;

pub struct Router {
    /// Longest prefix first; among equal prefixes, method-specific before any-method.
    routes: Vec<Arc<RouteConfig>>,
}

impl Router {
    pub fn new(routes: &[Arc<RouteConfig>]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_by(|a, b| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then_with(|| b.method.is_some().cmp(&a.method.is_some()))
        });
        Router { routes }
    }

    pub fn find(&self, method: &Method, path: &str) -> Option<&Arc<RouteConfig>> {
        self.routes.iter().find(|r| {
            r.method.as_ref().is_none_or(|m| m == method) && prefix_matches(&r.path_prefix, path)
        })
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router() -> (Router, Config) {
        let text = r#"
[[routes]]
name = "any_v1"
path_prefix = "/v1"
upstream = "u"
cost = 1
[[routes]]
name = "chat_post"
method = "POST"
path_prefix = "/v1/chat"
upstream = "u"
cost = 1
[[routes]]
name = "chat_any"
path_prefix = "/v1/chat"
upstream = "u"
cost = 1
[[routes]]
name = "root"
path_prefix = "/"
upstream = "u"
public = true
"#;
        let c = crate::config::for_tests(text);
        (Router::new(&c.routes), c)
    }

    #[test]
    fn longest_prefix_then_method() {
        let (r, _c) = router();
        let name = |m: Method, p: &str| r.find(&m, p).map(|r| r.name.clone());
        assert_eq!(
            name(Method::POST, "/v1/chat/completions").as_deref(),
            Some("chat_post")
        );
        assert_eq!(
            name(Method::GET, "/v1/chat/completions").as_deref(),
            Some("chat_any")
        );
        assert_eq!(name(Method::GET, "/v1/chatter").as_deref(), Some("any_v1"));
        assert_eq!(name(Method::GET, "/v1").as_deref(), Some("any_v1"));
        assert_eq!(name(Method::GET, "/v2").as_deref(), Some("root"));
    }
}

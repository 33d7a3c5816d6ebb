//! `deploy/`: what can be checked without Docker or a cluster. Every YAML file parses; the
//! Grafana dashboard and the alert rules name only metrics (and labels) that `src/metrics.rs`
//! registers; the Kubernetes manifests, the compose file and the config agree with each other
//! (ports, probes, the config path, the secrets); `deploy/tollgate.toml` passes
//! `tollgate check-config`; the Dockerfile's build steps are what `deploy/check-dockerfile.sh`
//! mirrors; the demo upstream answers like `tollgate demo`'s; and, when `promtool` is on PATH,
//! it accepts the rule files, the Prometheus config and every dashboard query.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use sha2::Digest;

use crate::harness::run_tollgate;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Yaml::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

fn yaml(path: &Path) -> Yaml {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: expected one document", path.display());
    docs.remove(0)
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A path into a YAML value: `get(v, &["spec", "template"])`; sequences by index.
fn get<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    let mut cur = v;
    for key in path {
        cur = match cur {
            Yaml::Sequence(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            Yaml::Mapping(m) => m.get(*key),
            _ => None,
        }
        .unwrap_or_else(|| panic!("no {key:?} in {path:?} of {v:?}"));
    }
    cur
}

fn text<'a>(v: &'a Yaml, path: &[&str]) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

fn int(v: &Yaml, path: &[&str]) -> i64 {
    get(v, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{path:?} is not an integer"))
}

fn seq<'a>(v: &'a Yaml, path: &[&str]) -> &'a Vec<Yaml> {
    get(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path:?} is not a sequence"))
}

// ---------------------------------------------------------------------------------------------
// The metrics src/metrics.rs registers, and the PromQL that names them

#[derive(Debug)]
struct Metric {
    histogram: bool,
    labels: BTreeSet<String>,
}

/// Labels Prometheus itself (or the Kubernetes service discovery) attaches to every series.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// Reads the metric names, kinds and label names out of the source text.
fn registered_metrics() -> BTreeMap<String, Metric> {
    // src/metrics.rs, plus the journal maintenance's own counters (registered on the same
    // registry by src/journal/partitions/task.rs).
    let src = read(&root().join("src/metrics.rs"))
        + &read(&root().join("src/journal/partitions/task.rs"));
    let starts: Vec<usize> = src.match_indices("\"tollgate_").map(|(i, _)| i).collect();
    assert!(
        starts.len() >= 15,
        "too few metrics found in src/metrics.rs"
    );
    let mut metrics = BTreeMap::new();
    for (n, &start) in starts.iter().enumerate() {
        let name_end = start + 1 + src[start + 1..].find('"').unwrap();
        let name = src[start + 1..name_end].to_string();
        let before = &src[if n == 0 { 0 } else { starts[n - 1] }..start];
        let after = &src[name_end..starts.get(n + 1).copied().unwrap_or(src.len())];
        let kind = [
            "counter(",
            "histogram(",
            "HistogramOpts::new(",
            "IntCounter::new(",
            "IntGauge::new(",
            "IntGaugeVec::new(",
        ]
        .iter()
        .filter_map(|k| before.rfind(k).map(|at| (at, *k)))
        .max()
        .map(|(_, k)| k)
        .unwrap_or_else(|| panic!("cannot tell what kind of metric {name} is"));
        let histogram = kind.contains("istogram");
        // The label names: the `&["a", "b"]` following the name in its call.
        let labels = match after.find("&[") {
            Some(open) => {
                let close = open + after[open..].find(']').unwrap();
                after[open + 2..close]
                    .split(',')
                    .map(|l| l.trim().trim_matches('"').to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            }
            None => BTreeSet::new(),
        };
        metrics.insert(name, Metric { histogram, labels });
    }
    metrics
}

/// Identifiers of a PromQL expression outside string literals, with their byte offsets.
fn identifiers(expr: &str) -> Vec<(usize, &str)> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i += 1;
            while i < bytes.len() && bytes[i] != c {
                if bytes[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b'$' {
            let start = i;
            i += 1;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':')
            {
                i += 1;
            }
            out.push((start, &expr[start..i]));
        } else {
            i += 1;
        }
    }
    out
}

/// The label names of a `{…}` matcher list starting at `open`.
fn matcher_labels(expr: &str, open: usize) -> Vec<String> {
    let close = open + expr[open..].find('}').unwrap();
    identifiers(&expr[open + 1..close])
        .into_iter()
        .map(|(_, id)| id.to_string())
        .collect()
}

/// The metrics an expression names; panics naming `what` on an unknown metric or label.
fn check_expr(what: &str, expr: &str, metrics: &BTreeMap<String, Metric>) -> BTreeSet<String> {
    let all_labels: BTreeSet<String> = metrics
        .values()
        .flat_map(|m| m.labels.iter().cloned())
        .chain(TARGET_LABELS.iter().map(|s| s.to_string()))
        .chain(["le".to_string()])
        .collect();
    let ids = identifiers(expr);
    let mut used = BTreeSet::new();
    for &(at, id) in &ids {
        if id.starts_with("tollgate_") {
            let (base, bucket) = match metrics.get(id) {
                Some(_) => (id, false),
                None => {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| id.strip_suffix(suffix))
                        .filter(|base| metrics.get(*base).is_some_and(|m| m.histogram))
                        .unwrap_or_else(|| {
                            panic!("{what}: metric {id} is not registered in src/metrics.rs")
                        });
                    (base, id.ends_with("_bucket"))
                }
            };
            used.insert(base.to_string());
            let rest = expr[at + id.len()..].trim_start();
            if rest.starts_with('{') {
                let open = expr.len() - rest.len();
                for label in matcher_labels(expr, open) {
                    let known = metrics[base].labels.contains(&label)
                        || TARGET_LABELS.contains(&label.as_str())
                        || (bucket && label == "le");
                    assert!(known, "{what}: {base} has no label {label:?}");
                }
            }
        }
        if id == "by" || id == "without" {
            let rest = expr[at + id.len()..].trim_start();
            if rest.starts_with('(') {
                let open = expr.len() - rest.len();
                let close = open + expr[open..].find(')').unwrap();
                for (_, label) in identifiers(&expr[open + 1..close]) {
                    assert!(
                        all_labels.contains(label),
                        "{what}: `{id} ({label})` names a label no tollgate metric has"
                    );
                }
            }
        }
    }
    used
}

// ---------------------------------------------------------------------------------------------
// The files

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &mut files);
    let mut yamls = 0;
    for path in &files {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yml" | "yaml") => {
                assert!(!yaml_docs(path).is_empty(), "{} is empty", path.display());
                yamls += 1;
            }
            Some("json") => {
                serde_json::from_str::<Json>(&read(path))
                    .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
            }
            _ => {}
        }
    }
    assert!(yamls >= 12, "only {yamls} YAML files under deploy/");
    for required in [
        "Dockerfile",
        "Dockerfile.dockerignore",
        "check-dockerfile.sh",
        "sync-k8s.sh",
        "compose.yaml",
        "tollgate.toml",
        "redis.conf",
        "README.md",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/dashboards/tollgate.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/tollgate.yml",
        "k8s/kustomization.yaml",
        "k8s/secret.example.yaml",
    ] {
        assert!(deploy(required).is_file(), "deploy/{required} is missing");
    }
}

fn dashboard_exprs(dashboard: &Json) -> Vec<(String, String)> {
    fn panels(list: &Json, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"].as_str().or(var["query"].as_str());
        if var["type"] == "query" {
            out.push((
                format!("variable {}", var["name"]),
                query.unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

#[test]
fn the_dashboard_shows_the_registered_metrics() {
    let metrics = registered_metrics();
    let dashboard: Json =
        serde_json::from_str(&read(&deploy("grafana/dashboards/tollgate.json"))).unwrap();
    assert_eq!(dashboard["uid"], "tollgate");
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 20, "only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        used.extend(check_expr(
            &format!("dashboard panel {title:?}"),
            expr,
            &metrics,
        ));
    }
    for required in [
        "tollgate_requests_total",
        "tollgate_plan_rejections_total",
        "tollgate_credits_debited_micros_total",
        "tollgate_overhead_seconds",
        "tollgate_upstream_duration_seconds",
        "tollgate_journal_backlog",
        "tollgate_redis_script_duration_seconds",
        "tollgate_redis_errors_total",
        "tollgate_holds_expired_total",
        "tollgate_streams_cut_total",
        "tollgate_settles_total",
    ] {
        assert!(
            used.contains(required),
            "the dashboard does not show {required}"
        );
    }
    let all = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "histogram_quantile(0.99, sum by (le) (rate(tollgate_overhead_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(tollgate_overhead_seconds_bucket",
        "reason=\"insufficient_credits\"",
        "reason=~\"rate_limited|quota_exceeded|max_concurrent\"",
    ] {
        assert!(all.contains(needle), "no dashboard query has {needle:?}");
    }
    // Panels: unique ids, a place on the grid, the datasource chosen by the variable.
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_i64().unwrap()),
            "duplicate panel id"
        );
        assert!(panel["gridPos"]["w"].as_i64().unwrap() > 0);
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        }
    }
}

#[test]
fn the_alert_rules_name_registered_metrics_and_match_the_prometheus_rule() {
    let metrics = registered_metrics();
    let rules = yaml(&deploy("prometheus/alerts.yml"));
    let mut names = BTreeSet::new();
    for group in seq(&rules, &["groups"]) {
        for rule in seq(group, &["rules"]) {
            let name = text(rule, &["alert"]).to_string();
            let expr = text(rule, &["expr"]);
            check_expr(&format!("alert {name}"), expr, &metrics);
            assert!(
                ["critical", "warning"].contains(&text(rule, &["labels", "severity"])),
                "{name}: severity"
            );
            assert!(!text(rule, &["annotations", "summary"]).is_empty());
            assert!(names.insert(name.clone()), "alert {name} twice");
        }
    }
    for required in [
        "TollgateJournalBacklogGrowing",
        "TollgateJournalBacklogHigh",
        "TollgateJournalFlushStalled",
        "TollgateRedisErrors",
        "TollgateMeteringUnavailable",
        "TollgateUpstreamErrors",
        "TollgateUpstream5xx",
        "TollgateHoldsExpired",
        "TollgateDown",
    ] {
        assert!(names.contains(required), "no alert {required}");
    }
    // The Kubernetes PrometheusRule carries the same groups (deploy/sync-k8s.sh).
    let rule = yaml(&deploy("k8s/prometheusrule.yaml"));
    assert_eq!(text(&rule, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(text(&rule, &["kind"]), "PrometheusRule");
    assert_eq!(
        get(&rule, &["spec"]),
        &rules,
        "k8s/prometheusrule.yaml differs from prometheus/alerts.yml: run deploy/sync-k8s.sh"
    );
    // Prometheus loads the rule file (relative to its config).
    let prometheus = yaml(&deploy("prometheus/prometheus.yml"));
    assert_eq!(text(&prometheus, &["rule_files", "0"]), "alerts.yml");
}

/// `promtool` (Debian: `apt-get install prometheus`, which `scripts/setup` does) on the rule
/// files, the Prometheus config and every dashboard query. Without promtool the test fails in CI
/// (`CI` set), so the rules are really checked there; elsewhere it says loudly that it skipped.
#[test]
fn promtool_accepts_the_rules_the_config_and_the_dashboard_queries() {
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed (Debian package `prometheus`; scripts/setup installs it): \
             the alert rules cannot be checked"
        );
        eprintln!(
            "SKIPPED promtool_accepts_the_rules_the_config_and_the_dashboard_queries: promtool \
             is not installed (Debian package `prometheus`; run scripts/setup)"
        );
        return;
    }
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let alerts = deploy("prometheus/alerts.yml");
    promtool(&["check", "rules", alerts.to_str().unwrap()]);
    promtool(&[
        "check",
        "config",
        deploy("prometheus/prometheus.yml").to_str().unwrap(),
    ]);

    let dir = tempfile::tempdir().unwrap();
    // The PrometheusRule's spec, as a plain rule file.
    let rule = yaml(&deploy("k8s/prometheusrule.yaml"));
    let k8s_rules = dir.path().join("k8s-rules.yml");
    std::fs::write(
        &k8s_rules,
        serde_yaml::to_string(get(&rule, &["spec"])).unwrap(),
    )
    .unwrap();
    promtool(&["check", "rules", k8s_rules.to_str().unwrap()]);

    // Every dashboard query, with Grafana's variables filled in, as a recording rule.
    let dashboard: Json =
        serde_json::from_str(&read(&deploy("grafana/dashboards/tollgate.json"))).unwrap();
    let rules: Vec<Json> = dashboard_exprs(&dashboard)
        .into_iter()
        .filter(|(title, _)| !title.starts_with("variable"))
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$route", ".*");
            serde_json::json!({"record": format!("dashboard:query:{i}"), "expr": expr})
        })
        .collect();
    let file = dir.path().join("dashboard-rules.yml");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()]);
}

// ---------------------------------------------------------------------------------------------
// The config, Kubernetes and compose, against each other

fn deploy_toml() -> toml::Table {
    read(&deploy("tollgate.toml")).parse().unwrap()
}

fn listen_port(cfg: &toml::Table, field: &str) -> i64 {
    let addr = cfg["server"][field].as_str().unwrap();
    assert!(
        addr.starts_with("0.0.0.0:"),
        "server.{field} must listen on all interfaces in a container: {addr}"
    );
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The environment variables deploy/tollgate.toml reads: `${VAR}` and `*_env = "VAR"` outside
/// comments.
fn config_env_vars() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    for line in read(&deploy("tollgate.toml")).lines() {
        let line = line.split('#').next().unwrap();
        let mut rest = line;
        while let Some(at) = rest.find("${") {
            let end = rest[at..].find('}').unwrap();
            vars.insert(rest[at + 2..at + end].to_string());
            rest = &rest[at + end..];
        }
        if let Some((key, value)) = line.split_once('=') {
            if key.trim().ends_with("_env") {
                vars.insert(value.trim().trim_matches('"').to_string());
            }
        }
    }
    vars
}

/// Dummy values for every secret the config reads.
fn dummy_env() -> Vec<(String, String)> {
    config_env_vars()
        .into_iter()
        .map(|var| {
            let value = match var.as_str() {
                "TOLLGATE_DATABASE_URL" => "postgres://tollgate:x@postgres:5432/tollgate".into(),
                "TOLLGATE_REDIS_URL" => "redis://:x@redis:6379/0".into(),
                "TOLLGATE_UPSTREAM_URL" => "http://demo-upstream:7001".into(),
                "TOLLGATE_UPSTREAM_URL_2" => "http://demo-upstream-2:7001".into(),
                _ => "dummy-secret-0123456789".into(),
            };
            (var, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_config_passes_check_config() {
    let vars = config_env_vars();
    for var in [
        "TOLLGATE_ADMIN_TOKEN",
        "TOLLGATE_DATABASE_URL",
        "TOLLGATE_REDIS_URL",
        "TOLLGATE_UPSTREAM_URL",
        "TOLLGATE_UPSTREAM_URL_2",
        "UPSTREAM_API_KEY",
    ] {
        assert!(
            vars.contains(var),
            "deploy/tollgate.toml does not read {var}"
        );
    }
    let path = deploy("tollgate.toml");
    let args = [
        "check-config".to_string(),
        "--config".into(),
        path.display().to_string(),
    ];
    let out = run_tollgate(&args, &dummy_env(), Duration::from_secs(20)).await;
    assert!(out.success(), "deploy/tollgate.toml is rejected:\n{out}");
    assert!(out.stdout.contains(": ok ("), "{out}");
    assert!(
        !out.stderr.contains("warning"),
        "secrets reported missing:\n{out}"
    );

    // Without the secrets it does not pass silently.
    let out = run_tollgate(&args, &[], Duration::from_secs(20)).await;
    assert!(
        !out.success() || out.stderr.contains("warning"),
        "missing secrets went unnoticed:\n{out}"
    );
}

fn k8s_docs() -> Vec<Yaml> {
    let kustomization = yaml(&deploy("k8s/kustomization.yaml"));
    let mut docs = Vec::new();
    for file in seq(&kustomization, &["resources"]) {
        docs.extend(yaml_docs(&deploy("k8s").join(file.as_str().unwrap())));
    }
    docs
}

fn k8s<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s (kustomization resources)"))
}

fn labels_match(selector: &Yaml, labels: &Yaml) -> bool {
    selector
        .as_mapping()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k.as_str().unwrap()) == Some(v))
}

#[test]
fn the_kubernetes_manifests_fit_together() {
    let cfg = deploy_toml();
    let docs = k8s_docs();
    for doc in &docs {
        assert!(
            doc["metadata"].get("namespace").is_none(),
            "{} {}: manifests are namespace-agnostic",
            text(doc, &["kind"]),
            text(doc, &["metadata", "name"])
        );
    }

    // The Deployment.
    let deployment = k8s(&docs, "Deployment", "tollgate");
    assert_eq!(text(deployment, &["apiVersion"]), "apps/v1");
    assert_eq!(int(deployment, &["spec", "replicas"]), 2);
    let pod = get(deployment, &["spec", "template"]);
    let pod_labels = get(pod, &["metadata", "labels"]);
    assert!(labels_match(
        get(deployment, &["spec", "selector", "matchLabels"]),
        pod_labels
    ));
    let containers = seq(pod, &["spec", "containers"]);
    assert_eq!(
        containers.len(),
        2,
        "tollgate and its config-reloader sidecar"
    );
    let container = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    let c = container("tollgate");
    let port = |name: &str| {
        seq(c, &["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .map(|p| int(p, &["containerPort"]))
            .unwrap_or_else(|| panic!("no container port named {name}"))
    };
    assert_eq!(port("proxy"), listen_port(&cfg, "listen"));
    assert_eq!(port("admin"), listen_port(&cfg, "admin_listen"));
    assert_eq!(port("metrics"), listen_port(&cfg, "metrics_listen"));
    // Health and readiness live on the admin listener (src/admin/mod.rs).
    let admin_src = read(&root().join("src/admin/mod.rs"));
    assert!(admin_src.contains(".route(\"/readyz\"") && admin_src.contains(".route(\"/healthz\""));
    assert_eq!(text(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    assert_eq!(text(c, &["readinessProbe", "httpGet", "port"]), "admin");
    assert_eq!(text(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(text(c, &["livenessProbe", "httpGet", "port"]), "admin");
    // The config file the container runs with is the ConfigMap, mounted where args say.
    let args: Vec<&str> = seq(c, &["args"])
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["serve", "--config", "/etc/tollgate/tollgate.toml"]);
    let mount = seq(c, &["volumeMounts"])
        .iter()
        .find(|m| m["name"].as_str() == Some("config"))
        .unwrap();
    assert_eq!(text(mount, &["mountPath"]), "/etc/tollgate");
    let volume = seq(pod, &["spec", "volumes"])
        .iter()
        .find(|v| v["name"].as_str() == Some("config"))
        .unwrap();
    let configmap = k8s(&docs, "ConfigMap", text(volume, &["configMap", "name"]));
    assert_eq!(
        text(configmap, &["data", "tollgate.toml"]),
        read(&deploy("tollgate.toml")),
        "k8s/configmap.yaml differs from deploy/tollgate.toml: run deploy/sync-k8s.sh"
    );
    let checksum = hex::encode(sha2::Sha256::digest(read(&deploy("tollgate.toml"))));
    assert_eq!(
        text(pod, &["metadata", "annotations", "checksum/config"]),
        checksum,
        "the Deployment's checksum/config is stale: run deploy/sync-k8s.sh"
    );
    // The reloader watches the same mounted file (a directory mount: a subPath mount is never
    // updated) and calls the reload endpoint on the admin port with the admin token.
    let reloader = container("config-reloader");
    let reloader_mount = seq(reloader, &["volumeMounts"])
        .iter()
        .find(|m| m["name"].as_str() == Some("config"))
        .expect("the reloader mounts the config");
    assert_eq!(text(reloader_mount, &["mountPath"]), "/etc/tollgate");
    assert!(reloader_mount.get("subPath").is_none() && mount.get("subPath").is_none());
    let script = text(reloader, &["args", "0"]);
    assert!(script.contains("/etc/tollgate/tollgate.toml"), "{script}");
    // The listener's certificate: an optional Secret, mounted in both containers, and the
    // reloader's checksum covers it (a renewal is reloaded like a config change).
    for c in [c, reloader] {
        let tls = seq(c, &["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some("tls"))
            .expect("the TLS Secret is mounted");
        assert_eq!(text(tls, &["mountPath"]), "/etc/tollgate-tls");
    }
    let tls = seq(pod, &["spec", "volumes"])
        .iter()
        .find(|v| v["name"].as_str() == Some("tls"))
        .expect("a tls volume");
    assert_eq!(text(tls, &["secret", "secretName"]), "tollgate-tls");
    assert_eq!(tls["secret"]["optional"].as_bool(), Some(true));
    assert!(script.contains("/etc/tollgate-tls/tls.crt"), "{script}");
    assert!(
        script.contains(&format!(
            "http://127.0.0.1:{}/v1/config/reload",
            listen_port(&cfg, "admin_listen")
        )),
        "{script}"
    );
    assert!(admin_src.contains(".route(\"/v1/config/reload\", post("));
    assert_eq!(
        text(reloader, &["env", "0", "valueFrom", "secretKeyRef", "key"]),
        "TOLLGATE_ADMIN_TOKEN"
    );
    let rsc = get(reloader, &["securityContext"]);
    assert_eq!(get(rsc, &["readOnlyRootFilesystem"]), &Yaml::Bool(true));
    assert_eq!(get(rsc, &["allowPrivilegeEscalation"]), &Yaml::Bool(false));
    // Secrets: every variable the config reads comes from the Secret.
    let secret_ref = text(c, &["envFrom", "0", "secretRef", "name"]);
    let secret = yaml(&deploy("k8s/secret.example.yaml"));
    assert_eq!(text(&secret, &["metadata", "name"]), secret_ref);
    for var in config_env_vars() {
        assert!(
            get(&secret, &["stringData"]).get(var.as_str()).is_some(),
            "the Secret template lacks {var}"
        );
    }
    // Shutdown: the grace period covers the preStop sleep, the drain and the journal flush.
    let grace = cfg["server"]["shutdown_grace_seconds"]
        .as_integer()
        .unwrap();
    let pre_stop: Vec<&str> = seq(c, &["lifecycle", "preStop", "exec", "command"])
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(pre_stop[0], "sleep");
    let sleep: i64 = pre_stop[1].parse().unwrap();
    let termination = int(pod, &["spec", "terminationGracePeriodSeconds"]);
    assert!(
        termination >= sleep + grace + 15,
        "terminationGracePeriodSeconds {termination} < preStop {sleep} + grace {grace} + 15 s flush"
    );
    // Non-root, read-only root filesystem, requests and limits.
    assert_eq!(
        get(pod, &["spec", "securityContext", "runAsNonRoot"]),
        &Yaml::Bool(true)
    );
    assert_eq!(int(pod, &["spec", "securityContext", "runAsUser"]), 10001);
    let sc = get(c, &["securityContext"]);
    assert_eq!(get(sc, &["readOnlyRootFilesystem"]), &Yaml::Bool(true));
    assert_eq!(get(sc, &["allowPrivilegeEscalation"]), &Yaml::Bool(false));
    for key in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            get(c, &["resources", key, res]);
        }
    }

    // Services: the proxy one and the internal one (admin + metrics).
    for (service, ports) in [
        ("tollgate", &["proxy"][..]),
        ("tollgate-internal", &["admin", "metrics"][..]),
    ] {
        let s = k8s(&docs, "Service", service);
        assert!(labels_match(get(s, &["spec", "selector"]), pod_labels));
        let targets: Vec<&str> = seq(s, &["spec", "ports"])
            .iter()
            .map(|p| text(p, &["targetPort"]))
            .collect();
        assert_eq!(targets, ports, "Service {service}");
    }

    // HPA on CPU, PDB, ServiceMonitor.
    let hpa = k8s(&docs, "HorizontalPodAutoscaler", "tollgate");
    assert_eq!(text(hpa, &["apiVersion"]), "autoscaling/v2");
    assert_eq!(text(hpa, &["spec", "scaleTargetRef", "name"]), "tollgate");
    assert_eq!(int(hpa, &["spec", "minReplicas"]), 2);
    assert_eq!(
        text(hpa, &["spec", "metrics", "0", "resource", "name"]),
        "cpu"
    );
    let pdb = k8s(&docs, "PodDisruptionBudget", "tollgate");
    assert_eq!(text(pdb, &["apiVersion"]), "policy/v1");
    assert_eq!(int(pdb, &["spec", "minAvailable"]), 1);
    assert!(labels_match(
        get(pdb, &["spec", "selector", "matchLabels"]),
        pod_labels
    ));
    let monitor = k8s(&docs, "ServiceMonitor", "tollgate");
    assert_eq!(text(monitor, &["apiVersion"]), "monitoring.coreos.com/v1");
    let internal = k8s(&docs, "Service", "tollgate-internal");
    assert!(labels_match(
        get(monitor, &["spec", "selector", "matchLabels"]),
        get(internal, &["metadata", "labels"])
    ));
    assert_eq!(
        text(monitor, &["spec", "endpoints", "0", "port"]),
        "metrics"
    );
    assert_eq!(
        text(monitor, &["spec", "endpoints", "0", "path"]),
        "/metrics"
    );
    // `job` = the Service's app.kubernetes.io/name = "tollgate", as the alerts expect.
    let job_label = text(monitor, &["spec", "jobLabel"]);
    assert_eq!(
        text(internal, &["metadata", "labels", job_label]),
        "tollgate"
    );
}

#[test]
fn the_compose_file_fits_together() {
    let cfg = deploy_toml();
    let compose = yaml(&deploy("compose.yaml"));
    let services = get(&compose, &["services"]);
    for name in [
        "tollgate",
        "redis",
        "postgres",
        "prometheus",
        "grafana",
        "demo-upstream",
    ] {
        let service = get(services, &[name]);
        assert!(
            service.get("healthcheck").is_some(),
            "compose service {name} has no healthcheck"
        );
        // Bind mounts name files that exist.
        for volume in service
            .get("volumes")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            let volume = volume.as_str().unwrap();
            if let Some(source) = volume.strip_prefix("./") {
                let source = source.split(':').next().unwrap();
                assert!(
                    deploy(source).exists(),
                    "compose service {name} mounts ./{source}, which does not exist"
                );
            }
        }
    }

    // tollgate: built from deploy/Dockerfile, the config mounted where the image expects it,
    // every variable the config reads set, healthy dependencies.
    let tollgate = get(services, &["tollgate"]);
    assert_eq!(text(tollgate, &["build", "context"]), "..");
    assert_eq!(
        text(tollgate, &["build", "dockerfile"]),
        "deploy/Dockerfile"
    );
    assert!(seq(tollgate, &["volumes"])
        .iter()
        .any(|v| v.as_str() == Some("./tollgate.toml:/etc/tollgate/tollgate.toml:ro")));
    for var in config_env_vars() {
        assert!(
            get(tollgate, &["environment"]).get(var.as_str()).is_some(),
            "compose does not set {var} for tollgate"
        );
    }
    assert!(text(tollgate, &["environment", "TOLLGATE_UPSTREAM_URL"])
        .contains("http://demo-upstream:7001"));
    for dep in ["redis", "postgres"] {
        assert_eq!(
            text(tollgate, &["depends_on", dep, "condition"]),
            "service_healthy"
        );
    }
    let ports: Vec<&str> = seq(tollgate, &["ports"])
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let admin = listen_port(&cfg, "admin_listen");
    assert!(
        ports.contains(&format!("127.0.0.1:{admin}:{admin}").as_str()),
        "the admin port must be published on loopback only: {ports:?}"
    );
    // The readiness check is the admin listener's /readyz.
    let health = seq(tollgate, &["healthcheck", "test"])
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        health.contains(&format!("/dev/tcp/127.0.0.1/{admin}")) && health.contains("GET /readyz")
    );

    // Redis: the persistence settings tollgate needs, from deploy/redis.conf.
    let redis = get(services, &["redis"]);
    assert!(seq(redis, &["command"])
        .iter()
        .any(|a| a.as_str() == Some("/usr/local/etc/redis/redis.conf")));
    let redis_conf = read(&deploy("redis.conf"));
    let settings: BTreeSet<String> = redis_conf
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    for required in [
        "appendonly yes",
        "appendfsync everysec",
        "maxmemory-policy noeviction",
    ] {
        assert!(settings.contains(required), "redis.conf lacks {required:?}");
    }
    // Postgres with a password.
    let postgres = get(services, &["postgres"]);
    assert!(text(postgres, &["environment", "POSTGRES_PASSWORD"]).contains("${POSTGRES_PASSWORD"));
    assert_eq!(
        text(postgres, &["environment", "POSTGRES_HOST_AUTH_METHOD"]),
        "scram-sha-256"
    );

    // Every ${VAR:-default} has one default throughout the file.
    let compose_text = read(&deploy("compose.yaml"));
    let mut defaults: BTreeMap<&str, &str> = BTreeMap::new();
    for (at, _) in compose_text.match_indices("${") {
        let inner = &compose_text[at + 2..at + compose_text[at..].find('}').unwrap()];
        if let Some((var, default)) = inner.split_once(":-") {
            let seen = defaults.entry(var).or_insert(default);
            assert_eq!(*seen, default, "compose: two defaults for ${{{var}}}");
        }
    }

    // Prometheus scrapes tollgate's metrics port; Grafana finds the datasource and dashboards.
    let prometheus = yaml(&deploy("prometheus/prometheus.yml"));
    let job = seq(&prometheus, &["scrape_configs"])
        .iter()
        .find(|j| j["job_name"].as_str() == Some("tollgate"))
        .expect("no scrape job named tollgate (the alerts use up{job=\"tollgate\"})");
    assert_eq!(
        text(job, &["static_configs", "0", "targets", "0"]),
        format!("tollgate:{}", listen_port(&cfg, "metrics_listen"))
    );
    let grafana = get(services, &["grafana"]);
    let volumes: Vec<&str> = seq(grafana, &["volumes"])
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let provider = yaml(&deploy("grafana/provisioning/dashboards/tollgate.yml"));
    let dashboards_path = text(&provider, &["providers", "0", "options", "path"]);
    assert!(volumes.contains(&format!("./grafana/dashboards:{dashboards_path}:ro").as_str()));
    assert!(volumes.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro"));
    let datasource = yaml(&deploy("grafana/provisioning/datasources/prometheus.yml"));
    assert_eq!(
        text(&datasource, &["datasources", "0", "type"]),
        "prometheus"
    );
    assert_eq!(
        text(&datasource, &["datasources", "0", "url"]),
        "http://prometheus:9090"
    );
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile and the script that mirrors it

#[test]
fn the_dockerfile_and_its_mirror_agree() {
    let cfg = deploy_toml();
    let dockerfile = read(&deploy("Dockerfile"));
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let from: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "a builder and a runtime stage");
    assert!(from[0].contains("rust:${RUST_VERSION}-bookworm AS builder"));
    assert!(from[1].starts_with("FROM debian:bookworm-slim"));
    assert!(lines.contains(&"USER 10001:10001"));
    assert!(lines.contains(&"ENTRYPOINT [\"tollgate\"]"));
    assert!(lines.contains(&"CMD [\"serve\", \"--config\", \"/etc/tollgate/tollgate.toml\"]"));
    let expose = format!(
        "EXPOSE {} {} {}",
        listen_port(&cfg, "listen"),
        listen_port(&cfg, "admin_listen"),
        listen_port(&cfg, "metrics_listen")
    );
    assert!(lines.contains(&expose.as_str()), "no {expose:?}");
    // The migrations are compiled in: the runtime image needs no migrations directory.
    assert!(read(&root().join("src/store/mod.rs")).contains("sqlx::migrate!(\"./migrations\")"));

    // What the mirror script reads out of the Dockerfile.
    let out = Command::new("bash")
        .arg(deploy("check-dockerfile.sh"))
        .arg("--print")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{printed}"))
            .to_string()
    };
    assert_eq!(
        field("cargo"),
        "cargo build --release --locked --bin tollgate"
    );
    let apt: BTreeSet<String> = field("builder_apt").split(' ').map(String::from).collect();
    for pkg in ["cmake", "pkg-config", "libssl-dev"] {
        assert!(apt.contains(pkg), "the builder does not install {pkg}");
    }
    assert!(field("runtime_apt")
        .split(' ')
        .any(|p| p == "ca-certificates"));
    // Every file the image is built from is let through the .dockerignore.
    let ignore = read(&deploy("Dockerfile.dockerignore"));
    for source in field("copy").split(' ') {
        assert!(root().join(source).exists(), "COPY {source}: no such file");
        assert!(
            ignore
                .lines()
                .any(|l| l == format!("!{source}") || l == format!("!{source}/")),
            "Dockerfile.dockerignore excludes {source}"
        );
    }
    // The image's Rust is at least what the lock file needs (the mirror checks rustc ≥ it).
    let rust: Vec<u32> = field("rust_version")
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        rust >= vec![1, 95],
        "Cargo.lock needs Rust ≥ 1.95 (pingora-lru → parking_lot 0.13)"
    );

    // The quick mirror: packages installed, rustc new enough, Cargo.lock current, and the
    // binary links only what the runtime stage has. Debian hosts only.
    if Command::new("dpkg-query").arg("--version").output().is_ok() {
        let out = Command::new("bash")
            .arg(deploy("check-dockerfile.sh"))
            .arg("--quick")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "deploy/check-dockerfile.sh --quick failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("note: not a Debian host; skipping deploy/check-dockerfile.sh --quick");
    }
}

// ---------------------------------------------------------------------------------------------
// The demo upstream of the compose file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_upstream_answers_like_tollgate_demos() {
    let mut child = tokio::process::Command::new(crate::harness::BIN)
        .args(["demo-upstream", "--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting tollgate demo-upstream");
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let port = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("listening upstream=127.0.0.1:") {
                return addr.trim().parse::<u16>().unwrap();
            }
        }
        panic!("the demo upstream exited without listening");
    })
    .await
    .expect("the demo upstream did not start");
    // Keep draining its request log.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let health: Json = client
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let models: Json = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "demo-1");

    // JSON with usage; a chunked request body (how tollgate forwards rewritten bodies) is read.
    let body =
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}]});
    let chunked =
        reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
            bytes::Bytes::from(body.to_string()),
        )]));
    for (path, req_body) in [
        (
            "/v1/chat/completions",
            reqwest::Body::from(body.to_string()),
        ),
        ("/tokens/v1/chat/completions", chunked),
    ] {
        let answer: Json = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(req_body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["object"], "chat.completion", "{path}: {answer}");
        assert_eq!(answer["model"], "m");
        assert!(answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("You said: hello there."));
        assert!(answer["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }

    // SSE, usage in the last chunk when asked for, then [DONE].
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &serde_json::json!({"stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "stream"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let events: Vec<String> = resp
        .text()
        .await
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(String::from))
        .collect();
    assert!(events.len() > 3, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Json = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage["choices"], serde_json::json!([]));
    let _ = child.kill().await;
}

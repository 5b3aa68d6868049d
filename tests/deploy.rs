//! The monitoring files in deploy/ only query what stowage exports: every
//! metric name in the Grafana dashboard's and the alert rules' PromQL is a
//! series the binary registers, with labels it has. (deploy/check.py runs
//! the other checks: parsing, promtool, systemd-analyze, manifests.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use stowage::Metrics;

/// Labels every scraped series has besides its own.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The series the binary exports, with their labels.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let m = Metrics::new();
    m.series_names()
        .iter()
        .map(|s| {
            let mut labels: BTreeSet<String> = s.labels.iter().cloned().collect();
            labels.extend(TARGET_LABELS.iter().map(|l| l.to_string()));
            (s.name.clone(), labels)
        })
        .collect()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A metric selector found in a PromQL expression: the name and the label
/// names it matches on.
#[derive(Debug)]
struct Selector {
    name: String,
    labels: Vec<String>,
}

/// Metric selectors (`stowage_*` and `process_*` names) in `expr`, and the
/// label names of its `by (...)` / `without (...)` / `on (...)` /
/// `ignoring (...)` clauses.
fn scan(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let mut selectors = Vec::new();
    let mut grouping = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            // Skip string literals (label values, regexes).
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_') || (i > 0 && is_ident_char(chars[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident_char(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        let next = chars.get(j).copied();
        if matches!(word.as_str(), "by" | "without" | "on" | "ignoring") && next == Some('(') {
            let close = chars[j..].iter().position(|c| *c == ')').map(|p| j + p);
            if let Some(close) = close {
                let inner: String = chars[j + 1..close].iter().collect();
                grouping.extend(
                    inner
                        .split(',')
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty()),
                );
                i = close + 1;
            }
            continue;
        }
        if word.starts_with("stowage_") || word.starts_with("process_") {
            let mut labels = Vec::new();
            if next == Some('{') {
                let mut k = j + 1;
                // label names are the identifiers before a matcher operator,
                // outside string literals.
                let mut current = String::new();
                while k < chars.len() && chars[k] != '}' {
                    let ch = chars[k];
                    if ch == '"' {
                        k += 1;
                        while k < chars.len() && chars[k] != '"' {
                            if chars[k] == '\\' {
                                k += 1;
                            }
                            k += 1;
                        }
                    } else if is_ident_char(ch) {
                        current.push(ch);
                    } else if matches!(ch, '=' | '!') {
                        if !current.is_empty() {
                            labels.push(std::mem::take(&mut current));
                        }
                    } else {
                        current.clear();
                    }
                    k += 1;
                }
                i = k;
            }
            selectors.push(Selector { name: word, labels });
        }
    }
    (selectors, grouping)
}

/// Checks one PromQL expression; returns the problems found.
fn check_expr(
    where_: &str,
    expr: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
    used: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let (selectors, grouping) = scan(expr);
    let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    for s in &selectors {
        used.insert(s.name.clone());
        match exported.get(&s.name) {
            None => problems.push(format!(
                "{where_}: `{}` is not a metric stowage exports",
                s.name
            )),
            Some(labels) => {
                for l in &s.labels {
                    if !labels.contains(l) {
                        problems.push(format!(
                            "{where_}: `{}` has no label `{l}` (it has {labels:?})",
                            s.name
                        ));
                    }
                }
                available.extend(labels.iter().cloned());
            }
        }
    }
    for l in grouping {
        if !available.contains(&l) {
            problems.push(format!(
                "{where_}: groups by `{l}`, which no metric in the expression has"
            ));
        }
    }
    problems
}

/// The `expr:` values of a Prometheus rule file (plain or `|` block).
fn rule_exprs(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut name = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(n) = t
            .strip_prefix("- alert:")
            .or_else(|| t.strip_prefix("- record:"))
        {
            name = n.trim().to_string();
        }
        if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest == "|" || rest == ">" {
                let indent = lines[i].len() - t.len();
                let mut block = String::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    block.push_str(lines[i].trim());
                    block.push(' ');
                    i += 1;
                }
                out.push((name.clone(), block));
                continue;
            }
            out.push((name.clone(), rest.trim_matches('\'').to_string()));
        }
        i += 1;
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn alert_rules_query_exported_metrics() {
    let exported = exported();
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/kubernetes/prometheusrule.yaml",
    ] {
        let exprs = rule_exprs(&read(&root().join(file)));
        assert!(exprs.len() >= 8, "{file}: only {} expressions", exprs.len());
        for (alert, expr) in exprs {
            problems.extend(check_expr(
                &format!("{file} {alert}"),
                &expr,
                &exported,
                &mut used,
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for required in [
        "stowage_upstream_requests_total",
        "stowage_cache_size_bytes",
        "stowage_cache_budget_bytes",
        "stowage_digest_mismatches_total",
        "stowage_manifest_stale_served_total",
    ] {
        assert!(used.contains(required), "no alert uses {required}");
    }
}

#[test]
fn dashboard_queries_exported_metrics() {
    let exported = exported();
    let path = root().join("deploy/grafana/stowage.json");
    let dash: serde_json::Value = serde_json::from_str(&read(&path)).unwrap();
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    let mut n = 0;
    let mut exprs: Vec<(String, String)> = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((title.clone(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    for (title, expr) in exprs {
        n += 1;
        problems.extend(check_expr(
            &format!("dashboard panel {title:?}"),
            &expr,
            &exported,
            &mut used,
        ));
    }
    assert!(n >= 20, "only {n} queries");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The dashboard covers every stowage family (histograms through their
    // buckets).
    let families: BTreeSet<&str> = exported
        .keys()
        .filter(|n| n.starts_with("stowage_"))
        .filter(|n| !n.ends_with("_sum") && !n.ends_with("_count"))
        .map(String::as_str)
        .collect();
    let missing: Vec<&&str> = families.iter().filter(|f| !used.contains(**f)).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

#[test]
fn scanner_finds_names_and_labels() {
    let exported = exported();
    let mut used = BTreeSet::new();
    let ok = r#"sum by (le, route) (rate(stowage_http_request_duration_seconds_bucket{job=~"$job", route="blob"}[5m]))"#;
    assert!(check_expr("ok", ok, &exported, &mut used).is_empty());
    let bad_name = r#"rate(stowage_http_requests{status="200"}[5m])"#;
    assert_eq!(check_expr("x", bad_name, &exported, &mut used).len(), 1);
    let bad_label = r#"rate(stowage_http_requests_total{stauts="200", x="a=b"}[5m])"#;
    assert_eq!(check_expr("x", bad_label, &exported, &mut used).len(), 2);
    let bad_by = r#"sum by (repository) (rate(stowage_http_requests_total[5m]))"#;
    assert_eq!(check_expr("x", bad_by, &exported, &mut used).len(), 1);
    let rules = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          up == 0\n          or vector(1)\n        for: 1m\n      - alert: B\n        expr: x > 1\n";
    let e = rule_exprs(rules);
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].0, "A");
    assert_eq!(e[0].1.trim(), "up == 0 or vector(1)");
    assert_eq!(e[1], ("B".to_string(), "x > 1".to_string()));
}

//! The operator files under deploy/: every metric the alert rules, their unit tests and the
//! Grafana dashboard name is one the daemon exports (declared in src/metrics.rs *and* recorded
//! somewhere in src/), histogram series are only read from histograms, the rules pass
//! `promtool check rules` and `promtool test rules`, and every dashboard query is valid PromQL
//! (promtool checks it as a recording rule). promtool comes with Debian's `prometheus` package.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `name -> (CONST_IDENT, kind)` as the daemon declares them (`metrics::declared`).
fn declared() -> BTreeMap<String, (String, Kind)> {
    let out: BTreeMap<_, _> = atproto_ingest::metrics::declared()
        .map(|(name, ident, kind)| {
            let kind = match kind {
                "counter" => Kind::Counter,
                "histogram" => Kind::Histogram,
                _ => Kind::Gauge,
            };
            (name.to_owned(), (ident.to_owned(), kind))
        })
        .collect();
    assert!(out.len() > 50, "read only {} metric names", out.len());
    out
}

/// The code that records metrics: every `.rs` file under src/ except the declarations (the
/// `metrics! { … }` block of src/metrics.rs) and unit-test files.
fn recording_code() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs")
                && !p.ends_with("src/metrics.rs")
                && !p.ends_with("tests.rs")
            {
                out.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(&Path::new(ROOT).join("src"), &mut out);
    let metrics = read("src/metrics.rs");
    let start = metrics.find("\nmetrics! {").expect("the metrics! block");
    let end = start + metrics[start..].find("\n}\n").expect("its end");
    out.push_str(&metrics[..start]);
    out.push_str(&metrics[end..]);
    out
}

/// Every `atproto_ingest_…` token in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("atproto_ingest_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The problems with `used` names: unknown, declared but never recorded, or a histogram
/// series of a metric that is not a histogram.
fn problems(
    used: &BTreeSet<String>,
    declared: &BTreeMap<String, (String, Kind)>,
    code: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for name in used {
        let (base, series_suffix) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).map(|b| (b, true)))
            .filter(|(b, _)| declared.contains_key(*b))
            .unwrap_or((name.as_str(), false));
        let Some((ident, kind)) = declared.get(base) else {
            out.push(format!(
                "{name}: not a metric the daemon declares in src/metrics.rs"
            ));
            continue;
        };
        let recorded = code.match_indices(ident.as_str()).any(|(i, _)| {
            let before = code[..i].chars().next_back().unwrap_or(' ');
            let after = code[i + ident.len()..].chars().next().unwrap_or(' ');
            let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
            !word(before) && !word(after)
        });
        if !recorded {
            out.push(format!(
                "{name}: declared as {ident} but never recorded in src/"
            ));
        }
        if series_suffix && *kind != Kind::Histogram {
            out.push(format!("{name}: {base} is a {kind:?}, not a histogram"));
        }
    }
    out
}

fn deploy_texts() -> Vec<(&'static str, String)> {
    [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts.test.yml",
        "deploy/grafana/atproto-ingest.json",
    ]
    .into_iter()
    .map(|f| (f, read(f)))
    .collect()
}

#[test]
fn every_metric_in_rules_and_dashboard_is_one_the_daemon_exports() {
    let declared = declared();
    let code = recording_code();
    let mut all = Vec::new();
    for (file, text) in deploy_texts() {
        let used = names_in(&text);
        assert!(used.len() >= 10, "{file}: only {} metric names", used.len());
        all.extend(
            problems(&used, &declared, &code)
                .into_iter()
                .map(|p| format!("{file}: {p}")),
        );
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

#[test]
fn the_check_catches_invented_and_misused_names() {
    let declared = declared();
    let code = recording_code();
    let used = names_in(
        "rate(atproto_ingest_invented_total[5m]) atproto_ingest_lag_seconds_bucket \
         histogram_quantile(0.9, atproto_ingest_batch_flush_seconds_bucket)",
    );
    let p = problems(&used, &declared, &code);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].contains("atproto_ingest_invented_total: not a metric"),
        "{p:?}"
    );
    assert!(p[1].contains("lag_seconds is a Gauge"), "{p:?}");
}

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("promtool not found on PATH: install Debian's `prometheus` package (.ci/run does)")
    })
}

fn run_promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    let checked = run_promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run_promtool(&["test", "rules", "alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    run_promtool(&["check", "config", "prometheus.yml"], &dir);

    // Each alert: severity, summary, description and the README's on-call link, and a test.
    let rules = read("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts.test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 15, "{alerts:?}");
    for key in [
        "severity:",
        "summary:",
        "description:",
        "runbook_url: file:///usr/share/doc/atproto-ingest/README.md#on-call",
    ] {
        let n = rules.lines().filter(|l| l.trim().starts_with(key)).count();
        assert_eq!(
            n,
            alerts.len(),
            "{key} appears {n} times for {} alerts",
            alerts.len()
        );
    }
    for a in &alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {a}\n    exp_alerts:\n    - exp_labels"
            )),
            "{a} has no firing test"
        );
    }
    assert!(
        read("README.md").contains("\n## On call\n"),
        "README lost its on-call section"
    );
}

/// The dashboard's panels, their queries with Grafana's variables replaced.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/atproto-ingest.json")).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            out.push((p["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

#[test]
fn dashboard_covers_the_operator_views_and_its_queries_are_valid_promql() {
    let queries = dashboard_queries();
    let titles: BTreeSet<&str> = queries.iter().map(|(t, _)| t.as_str()).collect();
    for want in [
        "Events decoded /s",
        "Lag behind the relay",
        "Batch flush latency",
        "Pool utilization",
        "Transaction retries",
        "Pending-op maps",
        "Repos flagged for resync",
    ] {
        assert!(titles.contains(want), "no panel {want:?} in {titles:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in queries.iter().enumerate() {
        assert!(
            !expr.contains('$'),
            "{title}: unreplaced variable in {expr}"
        );
        let quoted = serde_json::to_string(expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {quoted}\n"
        ));
    }
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let out = run_promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        out.contains(&format!("{} rules found", queries.len())),
        "{out}"
    );
}

/// The systemd unit's memory limits match the default memory budget: `MemoryHigh` at least the
/// budget, `MemoryMax` above it; the env example names the budget with its default.
#[test]
fn the_unit_memory_limits_match_the_memory_budget() {
    use atproto_ingest::budget::DEFAULT_MEMORY_BUDGET_MB;
    let unit = read("systemd/atproto-ingest.service");
    let bytes = |key: &str| -> u64 {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} not set in the unit"));
        let (n, unit) = line.split_at(line.len() - 1);
        let mult = match unit {
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            other => panic!("{key}: unexpected suffix {other}"),
        };
        n.parse::<u64>().unwrap() * mult
    };
    let (high, max) = (bytes("MemoryHigh"), bytes("MemoryMax"));
    let budget = DEFAULT_MEMORY_BUDGET_MB * 1_000_000;
    assert!(
        high >= budget && high < budget * 11 / 10,
        "MemoryHigh {high} vs budget {budget}"
    );
    assert!(max > high && max <= budget * 3 / 2, "MemoryMax {max}");
    let env = read("systemd/env.example");
    assert!(
        env.contains(&format!("MEMORY_BUDGET_MB={DEFAULT_MEMORY_BUDGET_MB}")),
        "env.example must name the budget"
    );
}

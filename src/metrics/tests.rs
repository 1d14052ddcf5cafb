//! The metric declarations follow the naming conventions and all reach the recorder.

use super::*;

#[test]
fn install_twice_and_render() {
    let a = install();
    let b = install();
    metrics::counter!(DB_RETRIES_TOTAL, "sqlstate" => "40P01").increment(1);
    metrics::histogram!(DB_TX_SECONDS, "outcome" => "commit").record(0.02);
    let text = b.render();
    assert!(
        text.contains("atproto_ingest_db_retries_total{sqlstate=\"40P01\"}"),
        "{text}"
    );
    assert!(
        text.contains("atproto_ingest_db_tx_seconds_bucket"),
        "{text}"
    );
    drop(a);
}

/// Every declared metric: prefixed, unique, counters end in `_total` (and only they),
/// units in the name, labels bounded, help text present.
#[test]
fn declarations_follow_conventions() {
    let mut seen = std::collections::HashSet::new();
    for m in ALL {
        let name = m.name;
        assert!(name.starts_with("atproto_ingest_"), "{name}");
        assert!(seen.insert(name), "duplicate {name}");
        assert_eq!(
            m.kind == Kind::Counter,
            name.ends_with("_total"),
            "only counters end in _total: {name}"
        );
        assert_eq!(
            m.unit == Some(Unit::Seconds),
            name.ends_with("_seconds"),
            "seconds are in the name and the unit: {name}"
        );
        assert_eq!(
            m.unit == Some(Unit::Bytes),
            name.ends_with("_bytes"),
            "{name}"
        );
        if name.ends_with("_ratio") {
            assert_eq!(m.kind, Kind::Gauge, "{name}");
        }
        for label in m.labels {
            assert!(!label.is_empty(), "{name}");
            assert!(
                !["did", "uri", "handle", "cid", "rkey"].contains(label),
                "unbounded label {label} on {name}"
            );
        }
        assert!(
            m.help.len() > 10 && m.help.ends_with('.'),
            "help of {name}: {:?}",
            m.help
        );
    }
    assert!(ALL.len() > 50, "found only {} metrics", ALL.len());
    assert!(ALL
        .iter()
        .any(|m| m.name == OPS_TOTAL && m.labels == ["action", "collection"]));
}

/// The recorder describes every declared metric: each has a `# HELP` line once used.
#[test]
fn every_metric_is_described() {
    let handle = install();
    for m in ALL {
        match m.kind {
            Kind::Counter => metrics::counter!(m.name).increment(0),
            Kind::Gauge => metrics::gauge!(m.name).increment(0.0),
            Kind::Histogram => metrics::histogram!(m.name).record(0.0),
        }
    }
    let text = handle.render();
    for m in ALL {
        assert!(
            text.contains(&format!("# HELP {} {}", m.name, m.help)),
            "{} not described",
            m.name
        );
    }
}

#[test]
fn collection_labels_are_bounded() {
    assert_eq!(collection_label("app.bsky.feed.like"), "app.bsky.feed.like");
    assert_eq!(collection_label("com.example.status"), "other");
    assert_eq!(collection_label("app.bsky.feed.nope"), "other");
}

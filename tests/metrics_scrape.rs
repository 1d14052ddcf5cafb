//! Scrapes `/metrics` during and after a replay of the small fixture and checks the series an
//! operator relies on. The Prometheus recorder is global per process: keep this test alone in
//! its own test binary.

#[path = "it/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::http::{self, Health, HttpState};
use atproto_ingest::metrics as m;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// One sample: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus text (exposition format 0.0.4) into samples; comments skipped.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Our label values contain no `",` sequences or escapes.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label pair");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Sum of the samples of `name` whose labels include all of `want`; `None` if none match.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in samples.iter().filter(|s| s.name == name) {
        if want
            .iter()
            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

/// `GET /metrics` over a raw HTTP/1.1 connection; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

#[sqlx::test(migrations = false)]
async fn metrics_during_and_after_a_replay(pool: sqlx::PgPool) {
    let handle = m::install();
    let db = common::db_config(&pool);
    let cancel = CancellationToken::new();
    let state = HttpState {
        health: Health::new(),
        metrics: handle,
        pool: atproto_ingest::db::connect(&db).await.unwrap(),
    };
    let (addr, server) = http::serve("127.0.0.1:0".parse().unwrap(), state, cancel.clone())
        .await
        .unwrap();

    let mut cfg = PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    });
    // Many small batches: the cursor moves in steps a scrape can catch.
    cfg.batch_max_ops = 50;
    let stats = Arc::new(Stats::default());
    let run = tokio::spawn({
        let (db, stats) = (db.clone(), stats.clone());
        async move {
            replay(
                &db,
                vec![common::fixture("small.frames")],
                cfg,
                CancellationToken::new(),
                stats,
            )
            .await
        }
    });

    // Mid-replay: poll until the cursor gauge shows progress; it only ever grows.
    let mut cursors = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mid_running = loop {
        let finished = run.is_finished();
        let samples = parse(&scrape(addr).await);
        if let Some(c) = sum(&samples, m::CURSOR_SEQ, &[]) {
            cursors.push(c);
            if c > 0.0 {
                assert!(c <= 2000.0, "cursor {c}");
                break !finished;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no cursor in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    run.await.unwrap().unwrap();
    let end = parse(&scrape(addr).await);
    let end_cursor = sum(&end, m::CURSOR_SEQ, &[]).unwrap();
    cursors.push(end_cursor);
    assert!(
        cursors.windows(2).all(|w| w[0] <= w[1]),
        "cursor went backwards: {cursors:?}"
    );
    eprintln!("cursor scrapes: {cursors:?} (first > 0 scraped while running: {mid_running})");
    assert_eq!(end_cursor, 2000.0);
    if mid_running {
        let mid = cursors[cursors.len() - 2];
        assert!(mid > 0.0 && mid <= 2000.0, "mid-replay cursor {mid}");
    }

    // Events and ops agree with the fixture's manifest.
    assert_eq!(
        sum(&end, m::EVENTS_TOTAL, &[("type", "#commit")]),
        Some(1871.0)
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("small.manifest.json")).unwrap(),
    )
    .unwrap();
    for (ty, n) in manifest["event_types"].as_object().unwrap() {
        let n = n.as_f64().unwrap();
        let got = sum(&end, m::EVENTS_TOTAL, &[("type", ty)]).unwrap_or(0.0);
        assert_eq!(got, n, "events_total{{type={ty}}}");
    }
    let mut want: BTreeMap<(String, &str), f64> = BTreeMap::new();
    let by = manifest["commit_ops"]["by_action_and_collection"]
        .as_object()
        .unwrap();
    for (action, colls) in by {
        for (coll, n) in colls.as_object().unwrap() {
            *want
                .entry((action.clone(), m::collection_label(coll)))
                .or_default() += n.as_f64().unwrap();
        }
    }
    assert!(want.contains_key(&("create".to_owned(), "other")));
    for ((action, coll), n) in &want {
        let got = sum(
            &end,
            m::OPS_TOTAL,
            &[("action", action.as_str()), ("collection", coll)],
        );
        assert_eq!(
            got,
            Some(*n),
            "ops_total{{action={action},collection={coll}}}"
        );
    }
    assert_eq!(
        sum(&end, m::OPS_TOTAL, &[]),
        Some(manifest["commit_ops"]["total"].as_f64().unwrap())
    );
    // Labels stay bounded: known collections or `other`, nothing else.
    for s in end.iter().filter(|s| s.name == m::OPS_TOTAL) {
        let c = &s.labels["collection"];
        assert!(c == "other" || c.starts_with("app.bsky."), "{c}");
    }

    // Rows, invalid records, malformed frames.
    let likes = sum(
        &end,
        m::ROWS_WRITTEN_TOTAL,
        &[("table", "likes"), ("op", "insert")],
    )
    .unwrap_or(0.0);
    assert!(likes > 0.0, "likes inserted: {likes}");
    assert_eq!(
        sum(&end, m::INVALID_RECORDS_TOTAL, &[]),
        Some(6.0),
        "the six validate:false records"
    );
    assert_eq!(
        sum(&end, m::FRAMES_MALFORMED_TOTAL, &[]).unwrap_or(0.0),
        0.0
    );

    // Histograms: one observation per batch.
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed) as f64;
    assert!(batches > 10.0, "{batches} batches");
    for h in [
        m::BATCH_SIZE_EVENTS,
        m::BATCH_SIZE_OPS,
        m::BATCH_FLUSH_SECONDS,
    ] {
        assert_eq!(sum(&end, &format!("{h}_count"), &[]), Some(batches), "{h}");
        assert!(sum(&end, &format!("{h}_sum"), &[]).unwrap() > 0.0, "{h}");
        assert!(
            end.iter().any(|s| s.name == format!("{h}_bucket")),
            "{h} has buckets"
        );
    }
    let events_sum = sum(&end, &format!("{}_sum", m::BATCH_SIZE_EVENTS), &[]).unwrap();
    assert_eq!(events_sum, 2000.0, "every event in exactly one batch");

    // Lag: the fixture's events are old, so the lag is large but never negative.
    let lag = sum(&end, m::LAG_SECONDS, &[]).expect("lag_seconds present");
    assert!(lag >= 0.0, "lag {lag}");

    cancel.cancel();
    server.await.unwrap().unwrap();
}

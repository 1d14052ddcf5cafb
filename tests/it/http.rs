//! HTTP surface on 127.0.0.1:0 with raw HTTP/1.1 requests: /healthz, /readyz per role and
//! database state, /metrics, graceful shutdown.
use crate::common;

use common::deadpool;

use std::net::SocketAddr;
use std::time::Duration;

use atproto_ingest::http::{serve, Health, HttpState, Role};
use atproto_ingest::metrics;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// `GET path` over a fresh connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[sqlx::test(migrations = "./migrations")]
async fn health_readiness_and_metrics(pg: PgPool) {
    let handle = metrics::install();
    let pool = deadpool(&pg, 2).await;
    let health = Health::new();
    let cancel = CancellationToken::new();
    let state = HttpState {
        health: health.clone(),
        metrics: handle,
        pool: pool.clone(),
    };
    let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), state, cancel.clone())
        .await
        .unwrap();

    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"role\":\"starting\""), "{body}");

    health.set_role(Role::Leader);
    health.set_cursor(42);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"role\":\"leader\"") && body.contains("\"db\":\"ok\""),
        "{body}"
    );
    assert!(body.contains("\"cursor\":42"), "{body}");

    health.set_role(Role::Standby);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    health.set_role(Role::Draining);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("\"role\":\"draining\""), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive while draining");

    metrics::install();
    ::metrics::counter!(metrics::RECONNECTS_TOTAL, "reason" => "http_test").increment(3);
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!(
            "{}{{reason=\"http_test\"}} 3",
            metrics::RECONNECTS_TOTAL
        )),
        "{body}"
    );
    assert!(
        body.contains(&format!("# HELP {}", metrics::RECONNECTS_TOTAL)),
        "{body}"
    );
    assert_eq!(get(addr, "/nope").await.0, 404);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    pool.close();
}

#[tokio::test]
async fn readyz_is_503_when_the_database_is_unreachable() {
    // Nothing listens on port 1: the probe fails fast.
    let cfg = atproto_ingest::db::DbConfig::new("postgres://postgres@127.0.0.1:1/nothing");
    let mgr = deadpool_postgres::Manager::new(cfg.pg_config().unwrap(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(mgr)
        .max_size(1)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap();
    let health = Health::new();
    health.set_role(Role::Leader);
    let cancel = CancellationToken::new();
    let state = HttpState {
        health,
        metrics: metrics::install(),
        pool,
    };
    let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), state, cancel.clone())
        .await
        .unwrap();
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"db\":\"unreachable\""), "{body}");
    assert!(body.contains("\"role\":\"leader\""), "{body}");
    cancel.cancel();
    task.await.unwrap().unwrap();
}

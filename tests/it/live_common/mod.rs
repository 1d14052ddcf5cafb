//! Helpers of the live-ingestion tests (`tests/live.rs`, `tests/failover.rs`): app configs
//! against the test relay, a per-test Redis key prefix, polling the durable cursor.
#![allow(dead_code)]

use std::time::Duration;

use atproto_ingest::app::AppConfig;
use atproto_ingest::firehose::client::ClientConfig;
use atproto_ingest::leader::LeaderConfig;
use atproto_ingest::testrelay::TestRelay;
use redis::AsyncCommands;
use tokio::time::Instant;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Last seq of `small.frames`.
pub const LAST_SEQ: i64 = 2000;

pub fn prefix(test: &str) -> String {
    format!("test:live:{test}:{:016x}:", rand::random::<u64>())
}

pub fn app_config(pool: &sqlx::PgPool, relay: &TestRelay, prefix: &str) -> AppConfig {
    let mut db = crate::common::db_config(pool);
    db.pool_size = 4;
    let relay_cfg = ClientConfig {
        relay_url: relay.url(),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    let leader = LeaderConfig {
        redis_url: REDIS_URL.into(),
        key_prefix: prefix.into(),
        ttl: Duration::from_millis(900),
        poll_interval: Duration::from_millis(100),
    };
    let mut cfg = AppConfig::new(db, relay_cfg, leader);
    cfg.pipeline.batch_max_ops = 200;
    cfg.pipeline.batch_max_age = Duration::from_millis(50);
    cfg.drain_limit = Duration::from_secs(5);
    cfg
}

pub fn service(relay: &TestRelay) -> String {
    relay.addr().to_string()
}

/// `(seq, fence)` of the relay's cursor row, if any (`None` also before migrations ran).
pub async fn cursor(pool: &sqlx::PgPool, service: &str) -> Option<(i64, i64)> {
    sqlx::query_as("SELECT seq, fence FROM firehose_cursor WHERE service = $1")
        .bind(service)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

/// Waits until the durable cursor reaches `seq` (panics after `limit`).
pub async fn wait_cursor(pool: &sqlx::PgPool, service: &str, seq: i64, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        if cursor(pool, service).await.is_some_and(|(s, _)| s >= seq) {
            return;
        }
        assert!(
            Instant::now() < until,
            "cursor did not reach {seq} within {limit:?} (now {:?})",
            cursor(pool, service).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn cleanup(prefix: &str) {
    let mut c = redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = c
        .del(&[
            format!("{prefix}leader"),
            format!("{prefix}fence"),
            format!("{prefix}progress"),
        ])
        .await
        .unwrap();
}

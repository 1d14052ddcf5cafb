//! `status`: what an operator asks first. The durable cursors (`firehose_cursor`: service, seq,
//! fence, last update and its age) and, from Redis, who holds the leader lease, the fence
//! counter and the leader's last progress report (relay seq seen, lag). Read-only; prints and
//! exits 0 when the database answers (Redis being down is reported, not fatal).

use std::io::Write;

use chrono::{DateTime, Utc};

use crate::config::{check, ConfigError, DbArgs};
use crate::cursor::{self, CursorError, CursorRow};
use crate::db::{self, redact_url, DbError};
use crate::leader::{self, Elector, LeaderConfig, LeaderError, LeaseInfo};
use crate::repos;

/// Why `status` could not answer (only the database is required).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error("reading repo sync states: {0}")]
    Repos(String),
}

/// Options of `status`.
#[derive(Clone, clap::Args)]
pub struct StatusOptions {
    #[command(flatten)]
    pub db: DbArgs,
    /// Redis of the leader lease (as given to `run`).
    #[arg(long, env = "REDIS_URL", value_name = "URL", default_value = leader::DEFAULT_REDIS_URL, hide_env_values = true)]
    pub redis_url: String,
    /// Prefix of the leader keys (as given to `run`).
    #[arg(long, env = "LEADER_KEY_PREFIX", value_name = "PREFIX", default_value = leader::DEFAULT_KEY_PREFIX)]
    pub leader_key_prefix: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl std::fmt::Debug for StatusOptions {
    /// URLs with their passwords redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusOptions")
            .field("database_url", &redact_url(&self.db.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("leader_key_prefix", &self.leader_key_prefix)
            .field("json", &self.json)
            .finish()
    }
}

/// Everything `status` shows.
#[derive(Debug)]
pub struct Status {
    pub cursors: Vec<CursorRow>,
    /// Repos per sync state (§12) and the resync queue's length.
    pub repos: RepoCounts,
    /// The lease as Redis sees it, or why Redis could not be asked.
    pub leader: Result<LeaseInfo, LeaderError>,
    pub now: DateTime<Utc>,
}

/// Repos per sync state and repos waiting in the resync queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoCounts {
    pub by_state: Vec<(&'static str, i64)>,
    pub queued: i64,
}

/// Reads the cursors and the lease. Fails only when the database cannot be read.
pub async fn collect(opts: &StatusOptions) -> Result<Status, StatusError> {
    let db_cfg = opts.db.db_config()?;
    check(
        crate::tls::redis_client(&opts.redis_url).is_ok(),
        "--redis-url",
        "REDIS_URL",
        "is not a Redis URL (redis[s]://[user:password@]host:port[/db][?ssl_ca_certs=ca.pem]) or its CA file is unreadable",
        redact_url(&opts.redis_url),
    )?;
    // No pool of DB_POOL_SIZE connections for two queries.
    let mut small = db_cfg.clone();
    small.pool_size = 1;
    let pool = db::connect(&small).await?;
    let cursors = cursor::cursors(&pool).await?;
    let repos = {
        let client = pool
            .get()
            .await
            .map_err(|e| StatusError::Repos(e.to_string()))?;
        let (by_state, queued) = repos::counts(&**client)
            .await
            .map_err(|e| StatusError::Repos(e.to_string()))?;
        RepoCounts { by_state, queued }
    };
    let leader = match Elector::connect(LeaderConfig {
        redis_url: opts.redis_url.clone(),
        key_prefix: opts.leader_key_prefix.clone(),
        ..LeaderConfig::default()
    })
    .await
    {
        Ok(e) => e.lease_info().await,
        Err(e) => Err(e),
    };
    Ok(Status {
        cursors,
        repos,
        leader,
        now: Utc::now(),
    })
}

/// `status` from the command line: collects and prints (text or JSON) on `out`.
pub(crate) async fn status_command(
    opts: &StatusOptions,
    out: &mut impl Write,
) -> Result<(), StatusError> {
    let s = collect(opts).await?;
    let written = if opts.json {
        writeln!(out, "{}", to_json(&s))
    } else {
        write_text(&s, &opts.leader_key_prefix, out)
    };
    // stdout closed (`status | head`): nothing left to tell anyone.
    let _ = written.and_then(|()| out.flush());
    Ok(())
}

fn age_secs(s: &Status, at: DateTime<Utc>) -> f64 {
    (s.now - at).num_milliseconds().max(0) as f64 / 1000.0
}

/// The leader's progress report, parsed (it is JSON written by `run`).
fn progress(info: &LeaseInfo) -> Option<serde_json::Value> {
    info.progress
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
}

pub fn to_json(s: &Status) -> serde_json::Value {
    let cursors: Vec<_> = s
        .cursors
        .iter()
        .map(|c| {
            serde_json::json!({
                "service": c.service,
                "seq": c.seq,
                "fence": c.fence,
                "updated_at": c.updated_at.to_rfc3339(),
                "age_seconds": age_secs(s, c.updated_at),
            })
        })
        .collect();
    let leader = match &s.leader {
        Ok(l) => serde_json::json!({
            "holder": l.holder,
            "lease_ttl_ms": l.ttl_ms,
            "fence": l.fence,
            "progress": progress(l),
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let by_state: serde_json::Map<String, serde_json::Value> = s
        .repos
        .by_state
        .iter()
        .map(|(k, n)| ((*k).to_owned(), (*n).into()))
        .collect();
    serde_json::json!({
        "cursors": cursors,
        "repos": { "by_sync_state": by_state, "resync_queued": s.repos.queued },
        "leader": leader,
        "now": s.now.to_rfc3339(),
    })
}

fn write_text(s: &Status, prefix: &str, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "cursors (firehose_cursor):")?;
    if s.cursors.is_empty() {
        writeln!(out, "  none yet (no run has claimed a relay)")?;
    }
    for c in &s.cursors {
        let seq = c.seq.map_or_else(|| "none".to_owned(), |v| v.to_string());
        writeln!(
            out,
            "  service={} seq={seq} fence={} updated_at={} age={:.1}s",
            c.service,
            c.fence,
            c.updated_at.to_rfc3339(),
            age_secs(s, c.updated_at)
        )?;
    }
    let states: Vec<String> = s
        .repos
        .by_state
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    writeln!(
        out,
        "repos: {} resync_queued={}",
        states.join(" "),
        s.repos.queued
    )?;
    writeln!(out, "leader (Redis keys {prefix}*):")?;
    match &s.leader {
        Err(e) => writeln!(out, "  unknown: {e}")?,
        Ok(l) => {
            match (&l.holder, l.ttl_ms) {
                (Some(h), Some(t)) => writeln!(out, "  holder={h} lease_expires_in={t}ms")?,
                (Some(h), None) => writeln!(out, "  holder={h}")?,
                (None, _) => writeln!(out, "  holder=none (no leader: the lease is free)")?,
            }
            match l.fence {
                Some(f) => writeln!(out, "  fence_counter={f}")?,
                None => writeln!(out, "  fence_counter=none")?,
            }
            match progress(l) {
                Some(p) => {
                    let field = |k: &str| match &p[k] {
                        serde_json::Value::Null => "unknown".to_owned(),
                        v => v.to_string(),
                    };
                    writeln!(
                        out,
                        "  progress: fence={} relay_seq={} cursor={} lag_events={} reported_at={}",
                        field("fence"),
                        field("relay_seq"),
                        field("cursor"),
                        field("lag_events"),
                        p["at"].as_str().unwrap_or("unknown")
                    )?;
                }
                None => writeln!(
                    out,
                    "  progress: none (no leader reported in the last 10 s)"
                )?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json() {
        let now = Utc::now();
        let s = Status {
            cursors: vec![CursorRow {
                service: "relay.example".into(),
                seq: Some(42),
                fence: 3,
                updated_at: now - chrono::Duration::seconds(5),
            }],
            repos: RepoCounts {
                by_state: vec![("synchronized", 7), ("desynchronized", 2), ("resyncing", 1)],
                queued: 3,
            },
            leader: Ok(LeaseInfo {
                holder: Some("h:1:ab".into()),
                ttl_ms: Some(900),
                fence: Some(3),
                progress: Some(
                    r#"{"fence":3,"relay_seq":50,"cursor":42,"lag_events":8,"at":"t"}"#.into(),
                ),
            }),
            now,
        };
        let mut out = Vec::new();
        write_text(&s, "p:", &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("service=relay.example seq=42 fence=3"),
            "{text}"
        );
        assert!(text.contains("age=5.0s"), "{text}");
        assert!(
            text.contains("holder=h:1:ab lease_expires_in=900ms"),
            "{text}"
        );
        assert!(text.contains("lag_events=8"), "{text}");
        assert!(
            text.contains("repos: synchronized=7 desynchronized=2 resyncing=1 resync_queued=3"),
            "{text}"
        );
        let j = to_json(&s);
        assert_eq!(j["cursors"][0]["seq"], 42);
        assert_eq!(j["leader"]["progress"]["lag_events"], 8);
        assert_eq!(j["repos"]["by_sync_state"]["desynchronized"], 2);
        assert_eq!(j["repos"]["resync_queued"], 3);
    }
}

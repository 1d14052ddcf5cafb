//! `dead-letters`: the events the write stage set aside (§6) — `list` prints them (text or
//! JSON), `retry` applies them again through the writer after a fix. The table and its SQL
//! live in [`crate::writer::dead_letters`].

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, DbArgs};
use crate::db::{self, redact_url, DbError};
use crate::writer::dead_letters::{self, DeadLetter, DeadLetterError, RetryReport};

/// Rows `list` prints unless `--limit` says otherwise.
pub const DEFAULT_LIST_LIMIT: i64 = 100;
/// Longest field `list` prints in text mode (a refused URI may be 8 KB); `--json` prints all.
const TEXT_FIELD_MAX: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum DeadLettersCmdError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
}

/// Options of `dead-letters`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadLettersOptions {
    #[command(subcommand)]
    pub action: DeadLettersAction,
}

/// What to do with the dead letters.
#[derive(Clone, clap::Subcommand)]
pub enum DeadLettersAction {
    /// Print the events set aside, oldest first: id, seq, DID, URI, collection, SQLSTATE,
    /// error, attempts, time.
    List {
        #[command(flatten)]
        db: DbArgs,
        /// Only this dead letter.
        #[arg(long, value_name = "N")]
        id: Option<i64>,
        /// At most this many rows.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LIST_LIMIT)]
        limit: i64,
        /// One JSON object per line, the stored event included, fields in full.
        #[arg(long)]
        json: bool,
    },
    /// Apply dead letters again through the writer (after a fix): those that succeed are
    /// removed, the others stay with their new error. Prints how many of each.
    Retry {
        #[command(flatten)]
        db: DbArgs,
        /// Only this dead letter.
        #[arg(
            long,
            value_name = "N",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        id: Option<i64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

impl DeadLettersAction {
    fn db(&self) -> &DbArgs {
        match self {
            Self::List { db, .. } | Self::Retry { db, .. } => db,
        }
    }
}

impl std::fmt::Debug for DeadLettersAction {
    /// The database URL with its password redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = redact_url(&self.db().database_url);
        match self {
            Self::List {
                id, limit, json, ..
            } => f
                .debug_struct("List")
                .field("database_url", &url)
                .field("id", id)
                .field("limit", limit)
                .field("json", json)
                .finish(),
            Self::Retry { id, all, .. } => f
                .debug_struct("Retry")
                .field("database_url", &url)
                .field("id", id)
                .field("all", all)
                .finish(),
        }
    }
}

/// `dead-letters` from the command line; prints on `out`.
pub(crate) async fn dead_letters_command(
    opts: &DeadLettersOptions,
    out: &mut impl Write,
) -> Result<(), DeadLettersCmdError> {
    let db_args = opts.action.db();
    let mut cfg = db_args.db_config()?;
    cfg.pool_size = 1;
    let pool = db::connect(&cfg).await?;
    let written = match &opts.action {
        DeadLettersAction::List {
            id, limit, json, ..
        } => {
            let rows = dead_letters::list(&pool, *id, *limit).await?;
            print_list(&rows, *json, out)
        }
        DeadLettersAction::Retry { id, .. } => {
            let policy = db_args.retry_policy()?;
            let cancel = CancellationToken::new();
            let r = dead_letters::retry(&pool, &policy, &cancel, *id).await?;
            print_retry(r, out)
        }
    };
    // stdout closed (`dead-letters list | head`): nothing left to tell anyone.
    let _ = written.and_then(|()| out.flush());
    Ok(())
}

fn print_list(rows: &[DeadLetter], json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        for r in rows {
            let line = serde_json::to_string(r).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    if rows.is_empty() {
        return writeln!(out, "no dead letters");
    }
    for r in rows {
        let opt = |s: &Option<String>| s.as_deref().map_or_else(|| "-".to_owned(), short);
        writeln!(
            out,
            "id={} service={} seq={} sqlstate={} attempts={} failed_at={}\n  did={}\n  uri={}\n  collection={}\n  error={}",
            r.id,
            short(&r.service),
            r.seq,
            r.sqlstate,
            r.attempts,
            r.failed_at.to_rfc3339(),
            opt(&r.did),
            opt(&r.uri),
            opt(&r.collection),
            short(&r.error),
        )?;
    }
    Ok(())
}

fn print_retry(r: RetryReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "re-applied and removed: {}, still failing (kept with the new error): {}",
        r.applied, r.failed
    )
}

/// `s` cut to [`TEXT_FIELD_MAX`] bytes, with its full length when cut.
fn short(s: &str) -> String {
    if s.len() <= TEXT_FIELD_MAX {
        return s.to_owned();
    }
    let mut end = TEXT_FIELD_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_in_text_mode_only() {
        let row = DeadLetter {
            id: 7,
            service: "replay".into(),
            seq: 42,
            did: Some("did:plc:a".into()),
            uri: Some(format!(
                "at://did:plc:a/app.bsky.feed.like/1#/{}",
                "x".repeat(7000)
            )),
            collection: None,
            sqlstate: "54000".into(),
            error: "index row size 7088 exceeds btree maximum 2704".into(),
            record: Some(serde_json::json!({"type": "#commit"})),
            attempts: 1,
            failed_at: chrono::Utc::now(),
        };
        let mut text = Vec::new();
        print_list(std::slice::from_ref(&row), false, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("id=7 service=replay seq=42 sqlstate=54000"),
            "{text}"
        );
        assert!(text.contains("collection=-"), "{text}");
        assert!(text.contains("bytes)"), "{text}");
        assert!(text.len() < 1000, "{text}");
        let mut json = Vec::new();
        print_list(&[row], true, &mut json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["uri"].as_str().map(str::len), Some(7000 + 37));
        assert_eq!(v["record"]["type"], "#commit");
    }
}

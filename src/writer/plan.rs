//! Events of one batch → the set of row changes to apply (pure, no I/O).
//!
//! Rules (§4): ops on the same record collapse to the last one in seq order; a commit whose
//! rev is not newer than the repo's last fully applied rev is already applied and skipped
//! (that makes replays of any range a no-op); a deleted account's records are purged and its
//! later commits ignored; a commit with ops we could not read (missing blocks, `tooBig`)
//! applies what it can, does not advance the repo's rev, and marks the repo for resync; a
//! commit over a decode limit applies nothing and marks the repo with that limit's reason.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::firehose::event::{Commit, Unavailable};
use crate::firehose::{Action, Event, EventKind, OpRecord};
use crate::mapping::{self, Fixes, GenericRow, Meta, Origin, Row, Table};

/// What the database knows of an actor at the start of the batch.
#[derive(Debug, Clone, Default)]
pub struct ActorState {
    pub rev: Option<String>,
    pub status: String,
}

/// A record's final change within the batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    Delete,
    /// Write this row. `replace`: an existing row with another CID must be replaced (an update,
    /// or a delete/update earlier in the batch); otherwise an existing row is left alone
    /// (a replayed create).
    Put {
        row: Box<Row>,
        replace: bool,
    },
}

/// Changes to an actor row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActorUpdate {
    pub handle: Option<String>,
    /// When the `#identity` event that brought `handle` was emitted (`None`: unknown). A
    /// resolution of the identity made after it is newer than the event's claim and wins.
    pub handle_time: Option<DateTime<Utc>>,
    pub status: Option<String>,
    pub rev: Option<String>,
    /// With `rev`: the commit's MST root (when verified, §12) and CID: the repo's new head.
    pub data: Option<String>,
    pub commit: Option<String>,
    /// Why the repo needs a resync, when a commit of this batch could not be read in full.
    pub resync: Option<&'static str>,
}

/// Counters of what planning saw; merged into the run summary.
#[derive(Debug, Clone, Default)]
pub struct PlanStats {
    pub commits_applied: u64,
    pub commits_already_applied: u64,
    pub commits_of_deleted_accounts: u64,
    pub ops_applied: u64,
    pub ops_superseded: u64,
    /// (collection, rejection kind) → count.
    pub invalid: HashMap<(String, &'static str), u64>,
    /// unavailable reason → count.
    pub unavailable: HashMap<&'static str, u64>,
    /// Values changed so PostgreSQL can store them (§6), by kind.
    pub sanitized: Fixes,
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Accounts deleted in this batch, sorted.
    pub purges: Vec<String>,
    /// Final change per record, in (table, uri) order: the stable key order of writes.
    pub changes: BTreeMap<(Table, String), Change>,
    pub actors: BTreeMap<String, ActorUpdate>,
    pub stats: PlanStats,
}

/// The statuses `actors.status` accepts; others from the relay (`desynchronized`, `throttled`,
/// future values) keep the records but hide the account, as `deactivated` does.
fn stored_status(status: &str) -> &str {
    match status {
        "active" | "deactivated" | "takendown" | "suspended" | "deleted" => status,
        _ => "deactivated",
    }
}

/// Every DID the events concern, sorted and unique.
pub fn dids_of(events: &[Event]) -> Vec<String> {
    let mut dids: Vec<String> = events
        .iter()
        .filter_map(|e| e.kind.did())
        .map(str::to_owned)
        .collect();
    dids.sort_unstable();
    dids.dedup();
    dids
}

/// How [`build`] treats a commit the repo's rev says is already applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Revs {
    /// Skip it (the stream: §4, replays are no-ops).
    Skip,
    /// Apply it all the same, without moving the rev back (`dead-letters retry`: the event
    /// was set aside, so later commits of its repo moved the rev past it).
    Reapply,
}

pub(crate) fn build(events: &[Event], mut state: HashMap<String, ActorState>, revs: Revs) -> Plan {
    let mut plan = Plan::default();
    for ev in events {
        match &ev.kind {
            EventKind::Commit(c) => {
                let st = state.entry(c.repo.clone()).or_insert_with(|| ActorState {
                    rev: None,
                    status: "active".into(),
                });
                if st.status == "deleted" {
                    plan.stats.commits_of_deleted_accounts += 1;
                } else if revs == Revs::Skip
                    && st.rev.as_deref().is_some_and(|r| r >= c.rev.as_str())
                {
                    plan.stats.commits_already_applied += 1;
                } else if let Some(over) = c.over_limit {
                    // §3: skipped whole (it carries no ops); its repo needs a resync.
                    let upd = plan.actors.entry(c.repo.clone()).or_default();
                    upd.resync.get_or_insert(over.reason());
                } else {
                    let outcome = apply_commit(&mut plan, ev.seq, c);
                    plan.stats.commits_applied += 1;
                    let upd = plan.actors.entry(c.repo.clone()).or_default();
                    let newer = st.rev.as_deref().is_none_or(|r| r < c.rev.as_str());
                    if outcome.complete && newer {
                        st.rev = Some(c.rev.clone());
                        upd.rev = Some(c.rev.clone());
                        upd.data = c.data.map(|d| d.to_string());
                        upd.commit = Some(c.commit.to_string());
                    }
                    if let Some(reason) = outcome.damaged {
                        upd.resync.get_or_insert(reason);
                    }
                }
            }
            EventKind::Identity(i) => {
                if let Some(h) = &i.handle {
                    // Indexed (`actors_handle_idx`): the reference rule of §6 applies.
                    let mut h = h.clone();
                    plan.stats.sanitized.reference(&mut h);
                    let mut time = mapping::parse_time(&i.time);
                    plan.stats.sanitized.time(&mut time);
                    let upd = plan.actors.entry(i.did.clone()).or_default();
                    upd.handle = Some(h);
                    upd.handle_time = time;
                }
            }
            EventKind::Account(a) => {
                let status = stored_status(a.effective_status()).to_owned();
                if status == "deleted" {
                    purge(&mut plan, &a.did);
                }
                state.entry(a.did.clone()).or_default().status = status.clone();
                plan.actors.entry(a.did.clone()).or_default().status = Some(status);
            }
            EventKind::Sync(_) | EventKind::Info { .. } | EventKind::Error { .. } => {}
        }
    }
    plan.purges.sort_unstable();
    plan.purges.dedup();
    plan
}

/// Drops the batch's pending changes of `did` and schedules its rows for deletion.
fn purge(plan: &mut Plan, did: &str) {
    let prefix = format!("at://{did}/");
    plan.changes.retain(|(_, uri), _| !uri.starts_with(&prefix));
    plan.purges.push(did.to_owned());
}

/// How completely a commit could be applied.
struct Outcome {
    /// Every op was applied with a valid record: the repo's rev may advance past this commit.
    /// Otherwise the rev stays, so the same commit seen again (a replay, or a clean copy of a
    /// damaged frame) is applied again — harmless, every write is idempotent.
    complete: bool,
    /// Some record could not be read at all (missing block, CID mismatch, `tooBig`): the repo
    /// needs a resync from its PDS, for this reason.
    damaged: Option<&'static str>,
}

/// Adds one commit's ops to the plan.
fn apply_commit(plan: &mut Plan, seq: i64, c: &Commit) -> Outcome {
    let origin = Origin {
        did: &c.repo,
        seq,
        time: mapping::parse_time(&c.time),
    };
    let mut out = Outcome {
        complete: true,
        damaged: None,
    };
    for op in &c.ops {
        let table = Table::for_collection(&op.collection);
        let uri = op.uri(&c.repo);
        let cid = op.cid.map(|c| c.to_string()).unwrap_or_default();
        let mut row = match (&op.action, &op.record) {
            (Action::Delete, _) => None,
            (_, OpRecord::Known(k)) => Some(mapping::known(origin, uri.clone(), cid, k)),
            (_, OpRecord::Generic(v)) => Some(Row::Generic(GenericRow {
                meta: Meta {
                    uri: uri.clone(),
                    cid,
                    did: c.repo.clone(),
                    created_at: v
                        .get("createdAt")
                        .and_then(|t| t.as_str())
                        .filter(|t| crate::firehose::syntax::is_datetime(t))
                        .and_then(mapping::parse_time),
                },
                collection: op.collection.clone(),
                rkey: op.rkey.clone(),
                value: v.clone(),
            })),
            (action, OpRecord::Invalid(r)) => {
                *plan
                    .stats
                    .invalid
                    .entry((op.collection.clone(), r.kind))
                    .or_default() += 1;
                out.complete = false;
                if *action == Action::Update {
                    // The new version breaks its lexicon: the old one is gone all the same.
                    plan.changes.insert((table, uri), Change::Delete);
                }
                continue;
            }
            (_, OpRecord::Superseded) => {
                plan.stats.ops_superseded += 1;
                continue;
            }
            (_, OpRecord::Unavailable(u)) => {
                *plan.stats.unavailable.entry(u.reason()).or_default() += 1;
                if *u != Unavailable::BadPath {
                    out.complete = false;
                    out.damaged.get_or_insert(u.reason());
                }
                continue;
            }
            (_, OpRecord::None) => continue,
        };
        plan.stats.ops_applied += 1;
        if let Some(row) = &mut row {
            // §6: what PostgreSQL cannot take is changed before anything (derived rows
            // included) is built from the row.
            row.sanitize(&mut plan.stats.sanitized);
        }
        let key = (table, uri);
        let change = match row {
            None => Change::Delete,
            Some(row) => {
                let replace = op.action == Action::Update || plan.changes.contains_key(&key);
                Change::Put {
                    row: Box::new(row),
                    replace,
                }
            }
        };
        plan.changes.insert(key, change);
    }
    out
}

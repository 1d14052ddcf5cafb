//! A whole repo (a verified `getRepo` CAR) → its rows (§12): the repo's stored records are
//! made equal to the CAR's, inside the caller's transaction. What is new is inserted, what is
//! gone is deleted, what has another CID is replaced; a record with the CID already stored is
//! left alone (a CID names the record's bytes, so its rows are already right). The changes go
//! through the batch writer's own plan, record SQL and derived-table folding, as one synthetic
//! commit, so aggregates, notifications and feed items move exactly as for live events.
//! Several repos at once, with the first write of a repo by `COPY`, are in [`super::group`].

use std::collections::HashMap;

use deadpool_postgres::Transaction;

use super::derived::Derived;
use super::plan::{self, ActorState, Plan};
use super::{query, records, Applied, WriteError};
use crate::firehose::event::Commit;
use crate::firehose::record::{self, Decoded};
use crate::firehose::{Action, Event, EventKind, OpRecord, RecordOp};
use crate::mapping::Table;
use crate::sync::{RepoRecord, VerifiedRepo};

/// What [`apply_repo`] changed, besides the rows counted in [`Applied`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepoDiff {
    /// Records inserted (not stored before).
    pub created: u64,
    /// Records replaced (stored with another CID).
    pub updated: u64,
    /// Stored records absent from the CAR, deleted.
    pub deleted: u64,
    /// Records already stored with the CAR's CID.
    pub unchanged: u64,
    /// Records of the CAR that break their lexicon (not stored).
    pub invalid: u64,
}

/// Makes `repo.did`'s record rows equal to the verified CAR `repo`, with derived tables kept
/// exact. The caller holds the actor row (the repo's state) and stores the new head.
pub async fn apply_repo(
    tx: &Transaction<'_>,
    repo: &VerifiedRepo<'_>,
) -> Result<(Applied, RepoDiff), WriteError> {
    let mut applied = Applied::default();
    let t0 = std::time::Instant::now();
    let dids = [repo.did.clone()];
    let stored = stored_cids(tx, &dids).await?.remove(&repo.did);
    applied.timed("repo_read", t0);
    let (plan, diff) = diff_plan(repo, stored.unwrap_or_default());
    let Some(plan) = plan else {
        return Ok((applied, diff));
    };
    let mut derived = Derived::default();
    records::write(tx, &plan, &mut derived, &mut applied).await?;
    derived.prune();
    super::derived::write(tx, &derived, &mut applied, super::derived::Existing::Kept).await?;
    applied.stats = plan.stats;
    Ok((applied, diff))
}

/// The changes that make the rows `stored` (URI → CID) of `repo.did` equal to the CAR, as a
/// plan (`None`: nothing to change) and their count.
pub(super) fn diff_plan(
    repo: &VerifiedRepo<'_>,
    mut stored: HashMap<String, String>,
) -> (Option<Plan>, RepoDiff) {
    let mut diff = RepoDiff::default();
    let mut ops = Vec::new();
    let mut records_bytes = 0;
    for r in &repo.records {
        let uri = format!("at://{}/{}/{}", repo.did, r.collection, r.rkey);
        let cid = r.cid.to_string();
        let action = match stored.remove(&uri) {
            Some(old) if old == cid => {
                diff.unchanged += 1;
                continue;
            }
            Some(_) => Action::Update,
            None => Action::Create,
        };
        records_bytes += r.bytes.len();
        ops.push(record_op(r, action, &mut diff));
    }
    // What is left is stored but not in the CAR.
    let mut gone: Vec<String> = stored.into_keys().collect();
    gone.sort_unstable();
    for uri in gone {
        let Some((collection, rkey)) = uri
            .strip_prefix(&format!("at://{}/", repo.did))
            .and_then(|p| p.split_once('/'))
        else {
            continue;
        };
        diff.deleted += 1;
        ops.push(RecordOp {
            action: Action::Delete,
            collection: collection.to_owned(),
            rkey: rkey.to_owned(),
            cid: None,
            prev: None,
            record: OpRecord::None,
        });
    }
    if ops.is_empty() {
        return (None, diff);
    }
    (Some(synthetic_plan(repo, ops, records_bytes)), diff)
}

/// Every record of the CAR as a create: the plan of a repo with nothing stored.
pub(super) fn create_plan(repo: &VerifiedRepo<'_>) -> (Plan, RepoDiff) {
    let mut diff = RepoDiff::default();
    let mut records_bytes = 0;
    let ops: Vec<RecordOp> = repo
        .records
        .iter()
        .map(|r| {
            records_bytes += r.bytes.len();
            record_op(r, Action::Create, &mut diff)
        })
        .collect();
    (synthetic_plan(repo, ops, records_bytes), diff)
}

/// The op that writes CAR record `r`, counted in `diff`.
fn record_op(r: &RepoRecord<'_>, action: Action, diff: &mut RepoDiff) -> RecordOp {
    let record = match record::decode(&r.collection, &r.rkey, r.bytes) {
        Ok(Decoded::Known(k)) => OpRecord::Known(k),
        Ok(Decoded::Generic(v)) => OpRecord::Generic(v),
        Err(rejection) => {
            diff.invalid += 1;
            OpRecord::Invalid(rejection)
        }
    };
    if !matches!(record, OpRecord::Invalid(_)) {
        match action {
            Action::Update => diff.updated += 1,
            _ => diff.created += 1,
        }
    }
    RecordOp {
        action,
        collection: r.collection.clone(),
        rkey: r.rkey.clone(),
        cid: Some(r.cid),
        prev: None,
        record,
    }
}

/// One synthetic commit through the batch planner: the same rows, the same replace rules.
/// No relay seq or commit time exists for a resync: `commit_seq` 0, no commit time.
fn synthetic_plan(repo: &VerifiedRepo<'_>, ops: Vec<RecordOp>, records_bytes: usize) -> Plan {
    let commit = Event {
        seq: 0,
        kind: EventKind::Commit(Commit {
            repo: repo.did.clone(),
            rev: repo.rev.clone(),
            since: None,
            commit: repo.commit_cid,
            prev_data: None,
            time: String::new(),
            too_big: false,
            ops,
            blocks: Vec::new(),
            data: Some(repo.data),
            over_limit: None,
            records_bytes,
        }),
    };
    let state = HashMap::from([(
        repo.did.clone(),
        ActorState {
            rev: None,
            status: "active".into(),
        },
    )]);
    plan::build(std::slice::from_ref(&commit), state, plan::Revs::Skip)
}

/// DID → (URI → CID) of every record row of `dids`, over every record table, in one
/// statement. Every DID of `dids` is a key of the result.
pub(super) async fn stored_cids(
    tx: &Transaction<'_>,
    dids: &[String],
) -> Result<HashMap<String, HashMap<String, String>>, tokio_postgres::Error> {
    // URIs sort bytewise ("C" collation): all of `at://did/…` lies in [at://did/, at://did0).
    let lo: Vec<String> = dids.iter().map(|d| format!("at://{d}/")).collect();
    let hi: Vec<String> = dids.iter().map(|d| format!("at://{d}0")).collect();
    let sql = Table::ALL
        .iter()
        .map(|t| {
            format!(
                "SELECT r.i, t.uri, t.cid FROM UNNEST($1::text[], $2::text[]) \
                 WITH ORDINALITY AS r(lo, hi, i) JOIN {} t ON t.uri >= r.lo AND t.uri < r.hi",
                t.name()
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows = query(tx, &sql, &[&lo, &hi]).await?;
    let mut out: HashMap<String, HashMap<String, String>> =
        dids.iter().map(|d| (d.clone(), HashMap::new())).collect();
    for r in rows {
        let i: i64 = r.try_get(0)?;
        let Some(did) = usize::try_from(i - 1).ok().and_then(|i| dids.get(i)) else {
            continue;
        };
        if let Some(m) = out.get_mut(did) {
            m.insert(r.try_get(1)?, r.try_get(2)?);
        }
    }
    Ok(out)
}

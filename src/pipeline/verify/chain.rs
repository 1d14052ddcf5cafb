//! Chain continuity (§12): what the verify stage knows of a repo, and whether a verified
//! commit continues its stored head (`since` = stored `rev`, `prevData` = stored `data`).

use cid::Cid;

use crate::repos::{Head, SYNCHRONIZED};
use crate::sync::PublicKey;

/// What the stage knows of one repo.
#[derive(Debug, Clone, Default)]
pub(super) struct Repo {
    pub(super) rev: Option<String>,
    pub(super) data: Option<Cid>,
    pub(super) synchronized: bool,
    pub(super) key: Option<PublicKey>,
    /// The chunk of the last `#identity` of the repo since its key was fetched: the key may
    /// have rotated, the next chunk that needs it fetches the DID document again.
    pub(super) key_stale: Option<u64>,
}

impl Repo {
    pub(super) fn from_head(head: Head) -> Self {
        Self {
            data: head.data.as_deref().and_then(|d| d.parse().ok()),
            rev: head.rev,
            synchronized: head.state == SYNCHRONIZED,
            key: None,
            key_stale: None,
        }
    }
}

/// How a verified commit relates to its repo's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Continuity {
    /// It continues the head (or starts a repo we hold nothing of): apply, head moves on.
    Applies,
    /// Not newer than the head (a replay): passes on, the writer skips it.
    Replayed,
    /// The repo awaits a resync: not applied.
    AwaitsResync,
    /// `since`/`prevData` are not the head: the repo is desynchronized.
    Broken,
}

/// Checks `c` (verified, MST root `data`) against `repo`'s head and moves the head on when
/// it applies.
pub(super) fn continues(
    repo: &mut Repo,
    c: &crate::firehose::event::Commit,
    data: Cid,
) -> Continuity {
    if !repo.synchronized {
        return Continuity::AwaitsResync;
    }
    let chained = match (&repo.rev, &repo.data) {
        (None, _) => true,
        (Some(rev), _) if c.rev.as_str() <= rev.as_str() => return Continuity::Replayed,
        (Some(rev), Some(head)) => {
            c.since.as_deref() == Some(rev.as_str()) && c.prev_data.as_ref() == Some(head)
        }
        // A head stored without its MST root (written unverified): the rev is all there is.
        (Some(rev), None) => c.since.as_deref() == Some(rev.as_str()),
    };
    if !chained {
        return Continuity::Broken;
    }
    repo.rev = Some(c.rev.clone());
    repo.data = Some(data);
    Continuity::Applies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::event::Commit;

    fn cid(n: u8) -> Cid {
        crate::sync::mst::cid_for(&[n])
    }

    fn commit(rev: &str, since: Option<&str>, prev_data: Option<Cid>) -> Commit {
        Commit {
            since: since.map(str::to_owned),
            commit: cid(0),
            prev_data,
            ..crate::firehose::Event::bare_commit("did:plc:x", rev)
        }
    }

    fn head(rev: &str, data: Option<Cid>) -> Repo {
        Repo {
            rev: Some(rev.into()),
            data,
            synchronized: true,
            key: None,
            key_stale: None,
        }
    }

    #[test]
    fn a_commit_applies_only_on_top_of_the_stored_head() {
        let mut repo = head("3b", Some(cid(1)));
        let next = commit("3c", Some("3b"), Some(cid(1)));
        assert_eq!(continues(&mut repo, &next, cid(2)), Continuity::Applies);
        assert_eq!((repo.rev.as_deref(), repo.data), (Some("3c"), Some(cid(2))));
        // The same commit again is a replay; an older one too.
        assert_eq!(continues(&mut repo, &next, cid(2)), Continuity::Replayed);
        let older = commit("3a", None, None);
        assert_eq!(continues(&mut repo, &older, cid(9)), Continuity::Replayed);
        // A commit after one we never saw: `since` or `prevData` is not the head.
        let skipped_since = commit("3e", Some("3d"), Some(cid(2)));
        assert_eq!(
            continues(&mut repo, &skipped_since, cid(4)),
            Continuity::Broken
        );
        let other_tree = commit("3e", Some("3c"), Some(cid(7)));
        assert_eq!(
            continues(&mut repo, &other_tree, cid(4)),
            Continuity::Broken
        );
        assert_eq!(
            repo.rev.as_deref(),
            Some("3c"),
            "a broken commit moves nothing"
        );
    }

    #[test]
    fn unknown_repos_start_their_chain_and_desynchronized_ones_wait() {
        let mut fresh = Repo {
            synchronized: true,
            ..Repo::default()
        };
        let first = commit("3a", Some("2z"), Some(cid(1)));
        assert_eq!(continues(&mut fresh, &first, cid(2)), Continuity::Applies);
        // A head stored without its MST root (verification was off): the rev decides.
        let mut unverified = head("3a", None);
        let next = commit("3b", Some("3a"), Some(cid(5)));
        assert_eq!(
            continues(&mut unverified, &next, cid(6)),
            Continuity::Applies
        );
        let mut waiting = head("3a", Some(cid(2)));
        waiting.synchronized = false;
        let next = commit("3b", Some("3a"), Some(cid(2)));
        assert_eq!(
            continues(&mut waiting, &next, cid(3)),
            Continuity::AwaitsResync
        );
    }
}

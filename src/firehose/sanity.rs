//! Sanity checks of what a relay says about an event (§3): the repo DID is a DID, a `rev` (and
//! a `since`) is a TID, and a `rev` is not more than [`MAX_REV_AHEAD`] in the future. An event
//! that fails is skipped and counted by reason like a malformed frame: a bad DID would create
//! a bogus actor, and a bad or future `rev` would make every genuine later commit of the repo
//! look already applied.

use std::time::Duration;

use super::event::{Event, EventKind};
use super::frame::FrameError;
use super::syntax::{is_did, is_tid, tid_micros};

/// How far a `rev` may be ahead of our clock: the clock skew the sync spec tolerates.
pub const MAX_REV_AHEAD: Duration = Duration::from_secs(5 * 60);

/// Checks `event` against the clock `now_micros` (µs since the Unix epoch).
pub(crate) fn check(event: &Event, now_micros: i64) -> Result<(), FrameError> {
    let (did, rev, since) = match &event.kind {
        EventKind::Commit(c) => (&c.repo, Some(&c.rev), c.since.as_ref()),
        EventKind::Sync(s) => (&s.did, Some(&s.rev), None),
        EventKind::Identity(i) => (&i.did, None, None),
        EventKind::Account(a) => (&a.did, None, None),
        EventKind::Info { .. } | EventKind::Error { .. } => return Ok(()),
    };
    if !is_did(did) {
        return Err(FrameError::BadDid(did.clone()));
    }
    if let Some(since) = since {
        if !is_tid(since) {
            return Err(FrameError::BadRev(since.clone()));
        }
    }
    let Some(rev) = rev else {
        return Ok(());
    };
    let Some(at) = tid_micros(rev) else {
        return Err(FrameError::BadRev(rev.clone()));
    };
    let limit = now_micros.saturating_add(MAX_REV_AHEAD.as_micros() as i64);
    if at > limit {
        return Err(FrameError::FutureRev(rev.clone()));
    }
    Ok(())
}

/// Now, in µs since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::event::Identity;
    use atrium_api::types::string::Tid;
    use atrium_api::types::LimitedU32;

    fn commit_frame() -> Event {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/firehose/small.frames"
        );
        let reader = crate::firehose::fixture::open(std::path::Path::new(path)).unwrap();
        crate::firehose::fixture::FrameReader::new(reader, 1 << 20)
            .filter_map(|f| match f.unwrap() {
                crate::firehose::fixture::RawFrame::Message(m) => super::super::decode(&m).ok(),
                _ => None,
            })
            .map(|d| d.event)
            .find(|e| matches!(e.kind, EventKind::Commit(_)))
            .unwrap()
    }

    fn tid_at(micros: i64) -> String {
        let t = chrono::DateTime::from_timestamp_micros(micros).unwrap();
        Tid::from_datetime(LimitedU32::MIN, t).as_str().to_owned()
    }

    #[test]
    fn dids_and_revs_are_checked_and_a_rev_may_be_five_minutes_ahead() {
        let now = now_micros();
        let good = commit_frame();
        assert_eq!(check(&good, now), Ok(()));
        let with = |f: &dyn Fn(&mut crate::firehose::event::Commit)| {
            let mut e = good.clone();
            let EventKind::Commit(c) = &mut e.kind else {
                unreachable!()
            };
            f(c);
            check(&e, now).map_err(|e| e.reason())
        };
        assert_eq!(
            with(&|c| c.repo = "did:plc:has space".into()),
            Err("bad_did")
        );
        assert_eq!(with(&|c| c.rev = "not-a-tid".into()), Err("bad_rev"));
        assert_eq!(with(&|c| c.since = Some("zzz".into())), Err("bad_rev"));
        let hour = 3_600_000_000;
        assert_eq!(with(&|c| c.rev = tid_at(now + hour)), Err("future_rev"));
        assert_eq!(
            with(&|c| c.rev = tid_at(now + hour / 20)),
            Ok(()),
            "3 min ahead"
        );
        let identity = Event {
            seq: 1,
            kind: EventKind::Identity(Identity {
                did: "plc:missing-scheme".into(),
                handle: None,
                time: String::new(),
            }),
        };
        assert_eq!(
            check(&identity, now).map_err(|e| e.reason()),
            Err("bad_did")
        );
    }
}

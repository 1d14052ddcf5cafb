//! Cache tests: what chunks need and how loads fold in, across `#identity` rotations and
//! loads that overlap.

use super::*;
use crate::firehose::event::Identity;
use crate::repos::SYNCHRONIZED;

const X: &str = "did:plc:x";

fn key(n: usize) -> PublicKey {
    let k = [
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",
        "did:key:zQ3shtxV1FrJfhqE1dvxYRcCknWNjHc3c5X1y3ZSoPDi2aur2",
    ][n];
    PublicKey::parse(k).expect("key")
}

fn commit(did: &str) -> Event {
    Event {
        seq: 1,
        kind: EventKind::Commit(Event::bare_commit(did, "3aaa")),
    }
}

fn identity(did: &str) -> Event {
    Event {
        seq: 2,
        kind: EventKind::Identity(Identity {
            did: did.into(),
            handle: None,
            time: String::new(),
        }),
    }
}

fn head(rev: &str) -> Head {
    Head {
        rev: Some(rev.into()),
        data: None,
        commit: None,
        state: SYNCHRONIZED.into(),
    }
}

/// `needs` of chunk `seq` made of `events`.
fn needs(cache: &mut Cache, seq: u64, events: &[Event]) -> Needs {
    cache.needs(seq, events, &repos_of(events))
}

fn x() -> Vec<String> {
    vec![X.to_owned()]
}

#[test]
fn an_identity_makes_later_chunks_fetch_the_key_afresh() {
    let mut cache = Cache::new(16);
    let first = needs(&mut cache, 0, &[commit(X)]);
    assert_eq!((first.heads.clone(), first.keys.clone()), (x(), x()));
    cache.apply(
        0,
        Loaded {
            absent: x(),
            keys: vec![(X.into(), Some(key(0)))],
            ..Loaded::default()
        },
    );
    // Chunk 1 verifies with the key it has; its #identity makes it stale afterwards.
    assert_eq!(
        needs(&mut cache, 1, &[commit(X), identity(X)]),
        Needs::default()
    );
    cache.apply(1, Loaded::default());
    assert_eq!(
        cache.repos.peek(X).and_then(|r| r.key.clone()),
        Some(key(0))
    );
    // Chunk 2 fetches it again; another #identity in chunk 2 keeps it stale for chunk 3.
    let fresh = needs(&mut cache, 2, &[commit(X), identity(X)]);
    assert_eq!(fresh.fresh, x());
    let rotated = Loaded {
        fresh: vec![(X.into(), Some(key(1)))],
        ..Loaded::default()
    };
    cache.apply(2, rotated);
    let r = cache.repos.peek(X).expect("cached");
    assert_eq!((r.key.clone(), r.key_stale), (Some(key(1)), Some(2)));
    assert_eq!(needs(&mut cache, 3, &[commit(X)]).fresh, x());
    let again = Loaded {
        fresh: vec![(X.into(), Some(key(1)))],
        ..Loaded::default()
    };
    cache.apply(3, again);
    assert_eq!(cache.repos.peek(X).and_then(|r| r.key_stale), None);
    assert_eq!(needs(&mut cache, 4, &[commit(X)]), Needs::default());
}

#[test]
fn a_rotation_during_a_load_marks_the_key_it_brings_stale() {
    let mut cache = Cache::new(16);
    // Chunk 0's load of X is under way when chunk 1 (an #identity of X) arrives.
    let first = needs(&mut cache, 0, &[commit(X)]);
    assert_eq!(first.keys, x());
    assert_eq!(needs(&mut cache, 1, &[identity(X)]), Needs::default());
    // Chunk 2 arrives before chunk 0's load is applied: X is fetched afresh.
    let third = needs(&mut cache, 2, &[commit(X)]);
    assert_eq!((third.heads.clone(), third.fresh.clone()), (x(), x()));
    let old = Loaded {
        heads: vec![(X.into(), head("3aaa"))],
        keys: vec![(X.into(), Some(key(0)))],
        ..Loaded::default()
    };
    cache.apply(0, old);
    let r = cache.repos.peek(X).expect("cached");
    assert_eq!((r.key.clone(), r.key_stale), (Some(key(0)), Some(1)));
    cache.apply(1, Loaded::default());
    // Chunk 0 moved the head on meanwhile: chunk 2's older read of it is not applied.
    if let Some(r) = cache.repos.peek_mut(X) {
        r.rev = Some("3aab".into());
    }
    let newer = Loaded {
        heads: vec![(X.into(), head("3aaa"))],
        fresh: vec![(X.into(), Some(key(1)))],
        ..Loaded::default()
    };
    cache.apply(2, newer);
    let r = cache.repos.peek(X).expect("cached");
    assert_eq!(r.rev.as_deref(), Some("3aab"));
    assert_eq!((r.key.clone(), r.key_stale), (Some(key(1)), None));
    assert!(cache.rotated.is_empty());
}

#[test]
fn rotations_of_repos_never_loaded_are_forgotten_once_their_chunk_is_applied() {
    let mut cache = Cache::new(16);
    for seq in 0..3 {
        let _ = needs(&mut cache, seq, &[identity(&format!("did:plc:{seq}"))]);
    }
    assert_eq!(cache.rotated.len(), 3);
    cache.apply(0, Loaded::default());
    assert_eq!(cache.rotated.len(), 2);
    cache.apply(1, Loaded::default());
    cache.apply(2, Loaded::default());
    assert!(cache.rotated.is_empty());
    // A repo whose #identity was seen before it was ever needed loads its key afresh.
    let _ = needs(&mut cache, 3, &[identity(X)]);
    let next = needs(&mut cache, 4, &[commit(X)]);
    assert_eq!((next.heads, next.keys, next.fresh), (x(), vec![], x()));
}

//! The relay client and `record` against the in-process test relay serving `small.frames`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use atproto_ingest::firehose::client::{self, ClientConfig};
use atproto_ingest::firehose::fixture::{self, FrameReader, RawFrame};
use atproto_ingest::firehose::frame;
use atproto_ingest::record::record;
use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const FRAMES: u64 = 2000;
const TEST_LIMIT: Duration = Duration::from_secs(20);

fn small() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/firehose/small.frames")
}

fn frames_of(path: &Path) -> Vec<Vec<u8>> {
    FrameReader::new(fixture::open(path).unwrap(), 1 << 26)
        .map(|f| match f.unwrap() {
            RawFrame::Message(m) => m,
            RawFrame::Oversized { .. } => unreachable!(),
        })
        .collect()
}

fn client_cfg(relay: &TestRelay) -> ClientConfig {
    ClientConfig {
        relay_url: relay.url(),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..ClientConfig::default()
    }
}

fn seq_of(msg: &[u8]) -> i64 {
    frame::decode(msg).unwrap().event.seq
}

/// Checks that `received` is the concatenation of one segment per connection, the k-th starting
/// right after the cursor it asked for: never a gap, duplicates only by resuming from a cursor.
fn assert_resumed_from_cursors(received: &[i64], cursors: &[Option<i64>]) {
    assert_eq!(
        cursors.first(),
        Some(&None),
        "first connection has no cursor"
    );
    let mut later = cursors[1..]
        .iter()
        .map(|c| c.expect("reconnect carries a cursor"));
    let mut prev = 0;
    for &s in received {
        if s != prev + 1 {
            // A visible boundary: it must be the next reconnect whose cursor differs from prev.
            let c = later
                .by_ref()
                .find(|c| *c != prev)
                .unwrap_or_else(|| panic!("seq {s} after {prev} without a reconnect"));
            assert_eq!(s, c + 1, "first frame after reconnect with cursor {c}");
        }
        prev = s;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_every_frame_and_resumes_from_the_cursor_after_drops() {
    let cfg = TestRelayConfig {
        rate_limit: Some(2_000),
    };
    let relay = TestRelay::from_file(&small(), cfg).await.unwrap();
    let (cursor_tx, cursor_rx) = watch::channel(None);
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(client::run(
        client_cfg(&relay),
        cursor_rx,
        tx,
        cancel.clone(),
    ));

    // The consumer: every frame received becomes the "durable cursor" at once.
    let consumer = tokio::spawn(async move {
        let mut received = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < FRAMES as usize {
            let msg = rx.recv().await.expect("client stopped early");
            let seq = seq_of(&msg);
            received.push(seq);
            seen.insert(seq);
            cursor_tx.send_replace(Some(seq));
        }
        (received, seen)
    });
    // Three cuts, each while a connection is serving (the relay's own count, not the consumer's,
    // which can lag by a socket buffer's worth of frames on a busy machine), each followed by
    // a reconnect before the next.
    for (i, at) in [400u64, 1000, 1500].into_iter().enumerate() {
        let until = tokio::time::Instant::now() + TEST_LIMIT;
        while relay.served_count() < at || relay.cursors_requested().len() < i + 1 {
            assert!(
                tokio::time::Instant::now() < until,
                "relay stalled before cut {i}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while relay.cursors_requested().len() < i + 2 {
            relay.drop_connections();
            let wait = tokio::time::Instant::now() + Duration::from_secs(1);
            while relay.cursors_requested().len() < i + 2 && tokio::time::Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "no reconnect after cut {i}"
            );
        }
    }
    let (received, seen) = tokio::time::timeout(TEST_LIMIT, consumer)
        .await
        .expect("all frames within the time limit")
        .unwrap();

    assert_eq!(seen, (1..=FRAMES as i64).collect());
    let cursors = relay.cursors_requested();
    assert!(
        cursors.len() >= 4,
        "three drops, three reconnects: {cursors:?}"
    );
    assert_resumed_from_cursors(&received, &cursors);
    cancel.cancel();
    task.await.unwrap().unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_is_stepped_over_without_stalling() {
    let frames = frames_of(&small());
    let (big_idx, big) = frames
        .iter()
        .enumerate()
        .max_by_key(|(_, f)| f.len())
        .unwrap();
    let big_seq = big_idx as i64 + 1;
    let limit = big.len() - 1;
    assert!(
        frames.iter().filter(|f| f.len() > limit).count() == 1,
        "one frame over the limit"
    );
    let relay = TestRelay::start(frames.clone(), TestRelayConfig::default())
        .await
        .unwrap();
    let cfg = ClientConfig {
        max_message_bytes: limit,
        ..client_cfg(&relay)
    };
    let (cursor_tx, cursor_rx) = watch::channel(None);
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(client::run(cfg, cursor_rx, tx, cancel.clone()));
    let mut seen = std::collections::BTreeSet::new();
    tokio::time::timeout(TEST_LIMIT, async {
        while seen.len() < FRAMES as usize - 1 {
            let seq = seq_of(&rx.recv().await.unwrap());
            seen.insert(seq);
            cursor_tx.send_replace(Some(seq));
        }
    })
    .await
    .expect("the stream went on past the oversized frame");
    assert!(!seen.contains(&big_seq));
    assert_eq!(seen.len(), FRAMES as usize - 1);
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_frame_after_an_info_is_stepped_over_without_stalling() {
    // From malformed.frames: its `#info OutdatedCursor` (index 145) and the 6 MiB commit of
    // seq 123 (index 132), served in place of the genuine seq 123 and preceded by the #info:
    // every session resumed from cursor 122 sees the #info first, then the oversized frame.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/firehose/malformed.frames");
    let malformed = frames_of(&path);
    let (info, big) = (malformed[145].clone(), malformed[132].clone());
    assert!(big.len() > client::DEFAULT_MAX_MESSAGE_BYTES);
    let mut frames = frames_of(&small());
    frames.splice(122..123, [info, big]);
    let relay = TestRelay::start(frames, TestRelayConfig::default())
        .await
        .unwrap();
    let (cursor_tx, cursor_rx) = watch::channel(Some(122));
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(client::run(
        client_cfg(&relay),
        cursor_rx,
        tx,
        cancel.clone(),
    ));
    let mut seen = std::collections::BTreeSet::new();
    tokio::time::timeout(TEST_LIMIT, async {
        while seen.len() < (FRAMES - 123) as usize {
            let msg = rx.recv().await.unwrap();
            let seq = seq_of(&msg);
            if seq > 0 {
                seen.insert(seq);
                cursor_tx.send_replace(Some(seq));
            }
        }
    })
    .await
    .expect("the stream went on past the oversized frame that followed an #info");
    assert_eq!(seen.first(), Some(&124));
    assert_eq!(seen.last(), Some(&(FRAMES as i64)));
    assert_eq!(
        relay.cursors_requested()[..2],
        [Some(122), Some(123)],
        "one reconnect steps over seq 123"
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn silent_relay_is_treated_as_dead() {
    // Accepts the WebSocket handshake, then never reads: no frames, no pongs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(tokio_tungstenite::accept_async(s).await.unwrap());
            if held.len() == 3 {
                return;
            }
        }
    });
    let cfg = ClientConfig {
        relay_url: format!("ws://{addr}"),
        silence_timeout: Duration::from_millis(300),
        ping_interval: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(50),
        ..ClientConfig::default()
    };
    let (_cursor_tx, cursor_rx) = watch::channel(None);
    let (tx, _rx) = mpsc::channel(1);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(client::run(cfg, cursor_rx, tx, cancel.clone()));
    tokio::time::timeout(Duration::from_secs(3), accepts)
        .await
        .expect("client reconnected twice after silences")
        .unwrap();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("client stops promptly on cancel")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn record_writes_the_served_frames_byte_for_byte() {
    let relay = TestRelay::from_file(&small(), TestRelayConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("all.frames");
    let n = record(
        client_cfg(&relay),
        &out,
        None,
        Some(FRAMES),
        Some(TEST_LIMIT),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(n, FRAMES);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(small()).unwrap());

    // From a cursor: the file is the fixture's tail.
    let tail = dir.path().join("tail.frames");
    let n = record(
        client_cfg(&relay),
        &tail,
        Some(1500),
        Some(500),
        Some(TEST_LIMIT),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(n, 500);
    let expected: Vec<Vec<u8>> = frames_of(&small()).split_off(1500);
    assert!(frames_of(&tail) == expected);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_across_relay_restarts_has_no_gaps_or_duplicates() {
    let cfg = TestRelayConfig {
        rate_limit: Some(4_000),
    };
    let relay = std::sync::Arc::new(TestRelay::from_file(&small(), cfg).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("restarts.frames");
    let r2 = relay.clone();
    let chaos = tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            r2.drop_connections();
        }
    });
    let n = record(
        client_cfg(&relay),
        &out,
        None,
        Some(FRAMES),
        Some(TEST_LIMIT),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    chaos.await.unwrap();
    assert_eq!(n, FRAMES);
    assert!(
        relay.cursors_requested().len() >= 2,
        "at least one reconnect"
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(small()).unwrap());
}

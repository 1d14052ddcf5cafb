//! Leader election against the real Redis at 127.0.0.1:6379, one key prefix per test.

use std::time::Duration;

use atproto_ingest::leader::{Elector, LeaderConfig, Leadership};
use redis::AsyncCommands;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const TTL: Duration = Duration::from_millis(600);
const POLL: Duration = Duration::from_millis(100);
/// Scheduling slack on a shared 2-core machine.
const SLACK: Duration = Duration::from_millis(250);

fn cfg(prefix: &str) -> LeaderConfig {
    LeaderConfig {
        redis_url: REDIS_URL.into(),
        key_prefix: prefix.into(),
        ttl: TTL,
        poll_interval: POLL,
    }
}

fn prefix(test: &str) -> String {
    format!("test:leader:{test}:{:016x}:", rand::random::<u64>())
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cleanup(p: &str) {
    let mut c = raw().await;
    let _: () = c
        .del(&[format!("{p}leader"), format!("{p}fence")])
        .await
        .unwrap();
}

async fn must_acquire(e: &Elector) -> Leadership {
    e.try_acquire()
        .await
        .unwrap()
        .expect("lease should be free")
}

#[tokio::test]
async fn only_one_elector_holds_the_lease() {
    let p = prefix("one");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let b = Elector::connect(cfg(&p)).await.unwrap();
    let la = must_acquire(&a).await;
    assert!(b.try_acquire().await.unwrap().is_none());
    // A standby keeps waiting while the holder renews; it returns None when cancelled.
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(TTL * 2).await;
        c2.cancel();
    });
    assert!(b.acquire(&cancel).await.unwrap().is_none());
    assert!(la.is_held());
    la.release().await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn fence_increases_with_every_acquisition() {
    let p = prefix("fence");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let b = Elector::connect(cfg(&p)).await.unwrap();
    let mut last = 0;
    for e in [&a, &b, &a, &b] {
        let l = must_acquire(e).await;
        assert!(l.fence > last, "fence {} after {last}", l.fence);
        last = l.fence;
        l.release().await.unwrap();
    }
    cleanup(&p).await;
}

#[tokio::test]
async fn renewal_keeps_the_lease_past_several_ttls() {
    let p = prefix("renew");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let b = Elector::connect(cfg(&p)).await.unwrap();
    let l = must_acquire(&a).await;
    tokio::time::sleep(TTL * 4).await;
    assert!(l.is_held());
    assert!(b.try_acquire().await.unwrap().is_none());
    let pttl: i64 = raw().await.pttl(format!("{p}leader")).await.unwrap();
    assert!(pttl > 0, "lease has a TTL: {pttl}");
    l.release().await.unwrap();
    cleanup(&p).await;
}

async fn assert_lost_quickly(l: &Leadership) {
    let limit = TTL / 3 + SLACK;
    let t = Instant::now();
    tokio::time::timeout(limit, l.lost.cancelled())
        .await
        .unwrap_or_else(|_| panic!("lost did not fire within {limit:?}"));
    assert!(!l.is_held());
    assert!(t.elapsed() <= limit);
}

#[tokio::test]
async fn lost_fires_when_the_key_is_overwritten() {
    let p = prefix("stolen");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let l = must_acquire(&a).await;
    let _: () = raw()
        .await
        .set(format!("{p}leader"), "someone-else")
        .await
        .unwrap();
    assert_lost_quickly(&l).await;
    // Release must not delete the thief's key.
    l.release().await.unwrap();
    let v: Option<String> = raw().await.get(format!("{p}leader")).await.unwrap();
    assert_eq!(v.as_deref(), Some("someone-else"));
    cleanup(&p).await;
}

#[tokio::test]
async fn lost_fires_when_the_key_is_deleted() {
    let p = prefix("deleted");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let l = must_acquire(&a).await;
    let _: () = raw().await.del(format!("{p}leader")).await.unwrap();
    assert_lost_quickly(&l).await;
    cleanup(&p).await;
}

#[tokio::test]
async fn standby_takes_over_within_one_ttl_after_the_holder_vanishes() {
    let p = prefix("crash");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let b = Elector::connect(cfg(&p)).await.unwrap();
    let la = must_acquire(&a).await;
    let fence_a = la.fence;
    let cancel = CancellationToken::new();
    let standby = tokio::spawn(async move { b.acquire(&cancel).await });
    tokio::time::sleep(POLL * 2).await;
    // Dropped without release: renewal stops, the key expires on its own.
    let t = Instant::now();
    drop(la);
    let lb = tokio::time::timeout(TTL + POLL + SLACK, standby)
        .await
        .expect("standby took over within one TTL")
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(t.elapsed() <= TTL + POLL + SLACK);
    assert!(lb.fence > fence_a);
    lb.release().await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn release_hands_over_at_once() {
    let p = prefix("release");
    let a = Elector::connect(cfg(&p)).await.unwrap();
    let b = Elector::connect(cfg(&p)).await.unwrap();
    let la = must_acquire(&a).await;
    let lost = la.lost.clone();
    let cancel = CancellationToken::new();
    let standby = tokio::spawn(async move { b.acquire(&cancel).await });
    tokio::time::sleep(POLL * 2).await;
    let t = Instant::now();
    la.release().await.unwrap();
    assert!(lost.is_cancelled(), "release ends leadership locally");
    let lb = tokio::time::timeout(POLL + SLACK, standby)
        .await
        .expect("standby took over within one poll")
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < TTL);
    assert!(lb.is_held());
    lb.release().await.unwrap();
    cleanup(&p).await;
}

#[tokio::test]
async fn rejects_a_poll_interval_longer_than_a_third_of_the_ttl() {
    let mut c = cfg(&prefix("bad"));
    c.poll_interval = TTL;
    assert!(Elector::connect(c).await.is_err());
}

/// A TCP proxy to Redis that can be cut, to simulate Redis becoming unreachable.
async fn cuttable_redis_proxy(cut: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let mut inbound = tokio::select! {
                _ = cut.cancelled() => return, // drops the listener: connections are refused
                r = listener.accept() => r.unwrap().0,
            };
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect("127.0.0.1:6379")
                    .await
                    .unwrap();
                tokio::select! {
                    _ = cut.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    });
    format!("redis://{addr}")
}

#[tokio::test]
async fn lost_fires_when_redis_is_unreachable_until_the_lease_expires() {
    let p = prefix("unreachable");
    let cut = CancellationToken::new();
    let mut c = cfg(&p);
    c.redis_url = cuttable_redis_proxy(cut.clone()).await;
    let a = Elector::connect(c).await.unwrap();
    let l = must_acquire(&a).await;
    tokio::time::sleep(TTL).await;
    assert!(l.is_held(), "renewed through the proxy");
    let t = Instant::now();
    cut.cancel();
    tokio::time::timeout(TTL + SLACK, l.lost.cancelled())
        .await
        .expect("lost fired by the time the lease could have expired");
    assert!(t.elapsed() <= TTL + SLACK);
    // The lease really is gone (or about to be): a direct elector gets it within one poll.
    let b = Elector::connect(cfg(&p)).await.unwrap();
    let cancel = CancellationToken::new();
    let lb = tokio::time::timeout(POLL + SLACK, b.acquire(&cancel))
        .await
        .expect("lease expired in Redis no later than the holder gave up")
        .unwrap()
        .unwrap();
    assert!(lb.fence > l.fence);
    lb.release().await.unwrap();
    cleanup(&p).await;
}

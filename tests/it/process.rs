//! `atproto-ingest run` as child processes (the built binary), real PostgreSQL and Redis, the
//! test relay in this process serving `small.frames` rate-limited so signals land mid-stream:
//! SIGKILL and restart, two instances with one lease (crash and pause of the leader), SIGTERM
//! drain and resume, and `status` after a run; `replay` stopped by SIGTERM and run again.
//! Final state always equals the fixture's truth.
use crate::{common, live_common};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atproto_ingest::replay::REPLAY_SERVICE;
use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
use live_common::{cursor, service, wait_cursor, LAST_SEQ, REDIS_URL};
use tokio::time::Instant;

/// Lease TTL of the children: short, so takeovers are quick.
const TTL: Duration = Duration::from_millis(900);
/// Drain limit of the children.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Scheduling slack on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(1_500);
/// Limit for reaching the end of the stream.
const STREAM_LIMIT: Duration = Duration::from_secs(60);

async fn relay(rate: u32) -> TestRelay {
    TestRelay::from_file(
        &common::fixture("small.frames"),
        TestRelayConfig {
            rate_limit: Some(rate),
        },
    )
    .await
    .unwrap()
}

/// A child `atproto-ingest` with its stderr (JSON log lines) collected.
struct Proc {
    name: &'static str,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn run(name: &'static str, pool: &sqlx::PgPool, relay: &TestRelay, prefix: &str) -> Self {
        let db = common::db_config(pool).url;
        let ttl = TTL.as_millis().to_string();
        let drain = DRAIN_LIMIT.as_millis().to_string();
        let args = [
            "--log-format",
            "json",
            "run",
            "--relay-url",
            &relay.url(),
            "--database-url",
            &db,
            "--db-pool-size",
            "4",
            "--redis-url",
            REDIS_URL,
            "--leader-key-prefix",
            prefix,
            "--leader-ttl-ms",
            &ttl,
            "--drain-limit-ms",
            &drain,
            "--http-addr",
            "127.0.0.1:0",
            "--resolve-identities=false",
            // The fixture corpus comes without its signing keys.
            "--verify-commits=false",
            "--batch-max-ops",
            "200",
            "--batch-max-age-ms",
            "50",
            // A paused leader's open transaction is ended after this (its locks freed).
            "--tx-timeout-ms",
            "2000",
        ];
        Self::spawn(name, &args)
    }

    /// `replay small.frames` in small batches: many commits, so a signal lands between them.
    fn replay(name: &'static str, pool: &sqlx::PgPool) -> Self {
        let (db, file) = (common::db_config(pool).url, common::fixture("small.frames"));
        let mut args = vec!["--log-format", "json", "replay", file.to_str().unwrap()];
        args.extend([
            "--database-url",
            &db,
            "--db-pool-size",
            "4",
            "--batch-max-ops",
            "20",
        ]);
        Self::spawn(name, &args)
    }

    fn spawn(name: &'static str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_atproto-ingest"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (sink, stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { name, child, log }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn logs(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// The JSON log lines whose message contains `needle`.
    fn messages(&self, needle: &str) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(needle))
            })
            .collect()
    }

    async fn wait_logged(&self, needle: &str, limit: Duration) {
        let until = Instant::now() + limit;
        while !self.logged(needle) {
            assert!(
                Instant::now() < until,
                "{}: {needle:?} not logged within {limit:?}:\n{}",
                self.name,
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "{} did not exit within {limit:?}:\n{}",
                self.name,
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the exit; expects code 0.
    async fn wait_success(&mut self, limit: Duration) {
        let st = self.wait_exit(limit).await;
        assert!(
            st.success(),
            "{} exited with {st}:\n{}",
            self.name,
            self.logs().join("\n")
        );
    }

    /// SIGTERM, then expect exit code 0 within the drain limit.
    async fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        self.wait_success(DRAIN_LIMIT + SLACK).await;
    }

    /// The HTTP address the child bound (it was given port 0).
    async fn http_addr(&self) -> SocketAddr {
        self.wait_logged("HTTP listening", Duration::from_secs(30))
            .await;
        let line = &self.messages("HTTP listening")[0];
        line["fields"]["addr"].as_str().unwrap().parse().unwrap()
    }

    /// `GET /readyz` → the JSON body.
    async fn readyz(&self) -> serde_json::Value {
        let addr = self.http_addr().await;
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {resp}"))
        })
        .await
        .unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed test must not leave a daemon behind (SIGCONT first in case it is stopped).
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(self.pid(), libc::SIGCONT) };
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until the cursor row holds a fence above `above`; returns it.
async fn wait_fence_above(pool: &sqlx::PgPool, svc: &str, above: i64, limit: Duration) -> i64 {
    let until = Instant::now() + limit;
    loop {
        if let Some((_, f)) = cursor(pool, svc).await.filter(|(_, f)| *f > above) {
            return f;
        }
        assert!(
            Instant::now() < until,
            "no fence above {above} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn sigkill_mid_stream_and_restart_equals_truth(pool: sqlx::PgPool) {
    let relay = relay(600).await;
    let svc = service(&relay);
    let prefix = live_common::prefix("proc-kill");
    let mut p = Proc::run("run#0", &pool, &relay, &prefix);
    let mut last = 0;
    for round in 1..=3 {
        // Wait for progress past the previous kill, then a random moment more.
        wait_cursor(&pool, &svc, last + 1, STREAM_LIMIT).await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..400))).await;
        let (seq, _) = cursor(&pool, &svc).await.unwrap();
        if seq >= LAST_SEQ {
            eprintln!("round {round}: stream already finished");
            break;
        }
        p.sigkill();
        let (after, _) = cursor(&pool, &svc).await.unwrap();
        eprintln!("round {round}: SIGKILL at cursor {after}");
        assert!(after >= seq, "the cursor went back: {seq} -> {after}");
        last = after;
        p = Proc::run(
            ["run#1", "run#2", "run#3"][round - 1],
            &pool,
            &relay,
            &prefix,
        );
    }
    wait_cursor(&pool, &svc, LAST_SEQ, STREAM_LIMIT).await;
    p.stop().await;
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    let asked = relay.cursors_requested();
    eprintln!("cursors asked: {asked:?}");
    let resumed: Vec<i64> = asked.iter().flatten().copied().collect();
    assert!(resumed.windows(2).all(|w| w[0] <= w[1]), "{asked:?}");
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn two_processes_one_writes_standby_takes_over_after_sigkill(pool: sqlx::PgPool) {
    let relay = relay(400).await;
    let svc = service(&relay);
    let prefix = live_common::prefix("proc-takeover");
    let mut a = Proc::run("A", &pool, &relay, &prefix);
    wait_cursor(&pool, &svc, 300, STREAM_LIMIT).await;
    let (_, fence_a) = cursor(&pool, &svc).await.unwrap();
    let mut b = Proc::run("B", &pool, &relay, &prefix);
    b.wait_logged("standing by", Duration::from_secs(30)).await;
    assert_eq!(a.readyz().await["role"], "leader");
    let ready_b = b.readyz().await;
    assert_eq!(ready_b["role"], "standby", "{ready_b}");
    assert_eq!(ready_b["ready"], true, "{ready_b}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (seq, fence) = cursor(&pool, &svc).await.unwrap();
    assert_eq!(fence, fence_a, "only the leader writes");
    assert!(seq < LAST_SEQ, "the crash must land mid-stream ({seq})");
    a.sigkill();
    let crashed = Instant::now();
    let fence_b = wait_fence_above(&pool, &svc, fence_a, TTL + SLACK * 3).await;
    let took = crashed.elapsed();
    eprintln!("takeover after {took:?} (ttl {TTL:?})");
    assert!(took <= TTL + SLACK, "takeover took {took:?}");
    wait_cursor(&pool, &svc, LAST_SEQ, STREAM_LIMIT).await;
    b.stop().await;
    assert_eq!(cursor(&pool, &svc).await, Some((LAST_SEQ, fence_b)));
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn a_paused_leader_cannot_commit_after_the_new_leader_started(pool: sqlx::PgPool) {
    let relay = relay(400).await;
    let svc = service(&relay);
    let prefix = live_common::prefix("proc-pause");
    let mut a = Proc::run("A", &pool, &relay, &prefix);
    wait_cursor(&pool, &svc, 300, STREAM_LIMIT).await;
    let (_, fence_a) = cursor(&pool, &svc).await.unwrap();
    let mut b = Proc::run("B", &pool, &relay, &prefix);
    b.wait_logged("standing by", Duration::from_secs(30)).await;
    // Pause A past its TTL: B takes over and claims a newer fence.
    a.signal(libc::SIGSTOP);
    let fence_b = wait_fence_above(&pool, &svc, fence_a, TTL + SLACK * 3).await;
    let (claimed_at, _) = cursor(&pool, &svc).await.unwrap();
    // Let B commit a little, then wake A up in the middle of B's term.
    wait_cursor(&pool, &svc, claimed_at + 1, STREAM_LIMIT).await;
    a.signal(libc::SIGCONT);
    // From now on the row's fence stays B's and the cursor never goes back.
    let watch_until = Instant::now() + STREAM_LIMIT;
    let mut prev = claimed_at;
    loop {
        let (seq, fence) = cursor(&pool, &svc).await.unwrap();
        assert_eq!(fence, fence_b, "a write with another fence after B claimed");
        assert!(seq >= prev, "cursor went back {prev} -> {seq}");
        prev = seq;
        let a_stepped_down = a.logged("lease lost") || a.logged("fenced out");
        if seq >= LAST_SEQ && a_stepped_down {
            break;
        }
        assert!(
            Instant::now() < watch_until,
            "seq {seq}, A stepped down: {a_stepped_down}:\n{}",
            a.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "A after SIGCONT: {:?}",
        a.logs()
            .iter()
            .filter(|l| l.contains("lease lost") || l.contains("fenced out"))
            .collect::<Vec<_>>()
    );
    // A (a standby now) first, so it cannot win the lease B releases.
    a.stop().await;
    b.stop().await;
    assert_eq!(cursor(&pool, &svc).await, Some((LAST_SEQ, fence_b)));
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn sigterm_mid_stream_drains_then_restart_resumes_and_status_prints(pool: sqlx::PgPool) {
    let relay = relay(400).await;
    let svc = service(&relay);
    let prefix = live_common::prefix("proc-term");
    let mut a = Proc::run("A", &pool, &relay, &prefix);
    wait_cursor(&pool, &svc, 300, STREAM_LIMIT).await;
    let asked_before = relay.cursors_requested().len();
    let t = Instant::now();
    a.stop().await;
    eprintln!("graceful stop took {:?}", t.elapsed());
    let (seq, _) = cursor(&pool, &svc).await.unwrap();
    assert!(seq < LAST_SEQ, "the stop must land mid-stream ({seq})");
    let stopped = a.messages("stopped gracefully");
    assert_eq!(
        stopped.first().map(|v| v["fields"]["cursor"].clone()),
        Some(serde_json::json!(seq)),
        "the durable cursor is the last applied event:\n{}",
        a.logs().join("\n")
    );
    assert!(a.logged("leader lease released"));
    // Restart: the relay is asked for exactly that cursor.
    let mut b = Proc::run("B", &pool, &relay, &prefix);
    wait_cursor(&pool, &svc, LAST_SEQ, STREAM_LIMIT).await;
    let asked = relay.cursors_requested();
    assert_eq!(asked.get(asked_before), Some(&Some(seq)), "{asked:?}");
    b.stop().await;
    common::assert_matches_truth(&pool, &common::truth("small")).await;

    // `status` after the run.
    let db = common::db_config(&pool).url;
    let base = [
        "status",
        "--database-url",
        &db,
        "--redis-url",
        REDIS_URL,
        "--leader-key-prefix",
        &prefix,
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_atproto-ingest"))
        .args(base)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, fence) = cursor(&pool, &svc).await.unwrap();
    assert!(
        text.contains(&format!("service={svc} seq={LAST_SEQ} fence={fence}")),
        "{text}"
    );
    assert!(text.contains("holder=none"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_atproto-ingest"))
        .args(base)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &j["cursors"][0];
    assert_eq!(
        (row["service"].as_str(), row["seq"].as_i64()),
        (Some(svc.as_str()), Some(LAST_SEQ)),
        "{j}"
    );
    assert_eq!(j["leader"]["fence"].as_i64(), Some(fence), "{j}");
    live_common::cleanup(&prefix).await;
}

/// `replay` gets SIGTERM while batches are being committed: it writes what it read, commits the
/// cursor and exits 0 (like `run`); a second replay then completes to the truth.
#[sqlx::test(migrations = false)]
async fn sigterm_mid_replay_commits_then_a_second_replay_completes(pool: sqlx::PgPool) {
    let mut first = Proc::replay("replay#0", &pool);
    wait_cursor(&pool, REPLAY_SERVICE, 1, STREAM_LIMIT).await;
    first.signal(libc::SIGTERM);
    let (at_signal, _) = cursor(&pool, REPLAY_SERVICE).await.unwrap();
    assert!(at_signal < LAST_SEQ, "the signal must land mid-replay");
    first.wait_success(STREAM_LIMIT).await;
    let stop = first.messages("stopping gracefully");
    let signal = stop.first().map(|v| v["fields"]["signal"].clone());
    assert_eq!(
        signal,
        Some("SIGTERM".into()),
        "{}",
        first.logs().join("\n")
    );
    let (committed, _) = cursor(&pool, REPLAY_SERVICE).await.unwrap();
    eprintln!("SIGTERM at cursor {at_signal}; committed {committed}");
    assert!(committed >= at_signal, "what was read is committed");

    Proc::replay("replay#1", &pool)
        .wait_success(STREAM_LIMIT)
        .await;
    assert_eq!(
        cursor(&pool, REPLAY_SERVICE).await.map(|c| c.0),
        Some(LAST_SEQ)
    );
    common::assert_matches_truth(&pool, &common::truth("small")).await;
}

//! Batcher stage: cuts the event stream into [`Batch`]es, each written in one transaction.
//! A batch is sent when it reaches `max_ops` ops or `max_bytes` bytes in memory
//! (its share of the memory budget), or when its first event is `max_age` old, whichever comes
//! first (§6), so the lag stays bounded when traffic is low.

use std::time::Duration;

use super::queue::{self, Weigh};
use super::DecodedChunk;
use crate::cursor;
use crate::firehose::Event;

/// Ops per batch: §6 measured no gain past 5–10 k rows per batch, and smaller batches keep
/// transactions short.
pub const DEFAULT_BATCH_MAX_OPS: usize = 5_000;
/// A batch older than this is flushed even if small (bounds the lag at low traffic).
pub const DEFAULT_BATCH_MAX_AGE: Duration = Duration::from_millis(250);

/// A run of consecutive events, applied atomically with the cursor.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Highest seq among the events (the cursor after this batch), if any carries one.
    pub last_seq: Option<i64>,
    /// Low watermark from the users stage (§4): when set, the cursor written instead of
    /// `last_seq`, so it never passes an event still held in a pending-op map.
    pub watermark: Option<i64>,
}

impl Weigh for Batch {
    fn bytes(&self) -> usize {
        self.events.bytes()
    }
}

impl Batch {
    pub fn push(&mut self, ev: Event) {
        if ev.seq > 0 {
            self.last_seq = Some(self.last_seq.map_or(ev.seq, |s| s.max(ev.seq)));
        }
        self.events.push(ev);
    }

    /// The cursor this batch writes ([`cursor::batch_cursor`]).
    pub fn cursor(&self) -> Option<i64> {
        cursor::batch_cursor(self.watermark, self.last_seq)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Ops in the batch (the batch size that matters to the database).
    pub fn ops(&self) -> usize {
        self.events.iter().map(Event::weight).sum()
    }
}

/// Runs until the input ends (the last partial batch is sent) or the writer is gone.
pub(super) async fn run(
    mut rx: queue::Receiver<DecodedChunk>,
    tx: queue::Sender<Batch>,
    max_ops: usize,
    max_bytes: usize,
    max_age: Duration,
) {
    let mut batch = Batch::default();
    let mut ops = 0usize;
    let mut bytes = 0usize;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            Some(d) => tokio::select! {
                c = rx.recv() => Some(c),
                _ = tokio::time::sleep_until(d) => None,
            },
            None => Some(rx.recv().await),
        };
        match next {
            Some(Some(chunk)) => {
                let mut events = chunk.events.into_iter();
                while let Some(ev) = events.next() {
                    ops += ev.weight();
                    bytes += queue::event_bytes(&ev);
                    batch.push(ev);
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_age);
                    if ops >= max_ops || bytes >= max_bytes {
                        batch.watermark =
                            cursor::watermark_before(chunk.watermark, events.as_slice());
                        if tx.send(std::mem::take(&mut batch)).await.is_err() {
                            return;
                        }
                        ops = 0;
                        bytes = 0;
                        deadline = None;
                    }
                }
                batch.watermark = chunk.watermark.or(batch.watermark);
            }
            // Input ended: flush what is left.
            Some(None) => {
                if !batch.is_empty() {
                    let _ = tx.send(batch).await;
                }
                return;
            }
            // Age limit reached.
            None => {
                if !batch.is_empty() && tx.send(std::mem::take(&mut batch)).await.is_err() {
                    return;
                }
                ops = 0;
                bytes = 0;
                deadline = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64) -> Event {
        Event::info_at(seq)
    }

    #[tokio::test]
    async fn batches_are_cut_at_max_ops_and_the_rest_is_flushed_at_the_end() {
        let (chunk_tx, chunk_rx) = queue::channel("t", 1, 1 << 20);
        let (batch_tx, mut batch_rx) = queue::channel("t", 8, 1 << 20);
        let stage = tokio::spawn(run(
            chunk_rx,
            batch_tx,
            2,
            1 << 20,
            Duration::from_secs(3600),
        ));
        let chunk = DecodedChunk {
            events: (1..=5).map(ev).collect(),
            watermark: Some(4),
            ..DecodedChunk::default()
        };
        assert!(chunk_tx.send(chunk).await.is_ok());
        drop(chunk_tx);
        stage.await.unwrap();
        let mut got = Vec::new();
        while let Some(b) = batch_rx.recv().await {
            got.push((b.events.len(), b.last_seq, b.cursor()));
        }
        // Cut inside the chunk: the cursor stays below the events not batched yet.
        assert_eq!(
            got,
            vec![
                (2, Some(2), Some(2)),
                (2, Some(4), Some(4)),
                (1, Some(5), Some(4))
            ]
        );
    }

    #[tokio::test]
    async fn batches_are_cut_at_max_bytes() {
        let (chunk_tx, chunk_rx) = queue::channel("t", 1, 1 << 20);
        let (batch_tx, mut batch_rx) = queue::channel("t", 8, 1 << 20);
        let one = queue::event_bytes(&ev(1));
        let stage = tokio::spawn(run(
            chunk_rx,
            batch_tx,
            1_000,
            2 * one,
            Duration::from_secs(3600),
        ));
        let chunk = DecodedChunk {
            events: (1..=5).map(ev).collect(),
            ..DecodedChunk::default()
        };
        assert!(chunk_tx.send(chunk).await.is_ok());
        drop(chunk_tx);
        stage.await.unwrap();
        let mut sizes = Vec::new();
        while let Some(b) = batch_rx.recv().await {
            sizes.push(b.events.len());
        }
        assert_eq!(sizes, vec![2, 2, 1]);
    }

    #[tokio::test]
    async fn a_small_batch_is_flushed_when_it_is_max_age_old() {
        let (chunk_tx, chunk_rx) = queue::channel("t", 1, 1 << 20);
        let (batch_tx, mut batch_rx) = queue::channel("t", 8, 1 << 20);
        let stage = tokio::spawn(run(
            chunk_rx,
            batch_tx,
            1_000,
            1 << 20,
            Duration::from_millis(20),
        ));
        let chunk = DecodedChunk {
            events: vec![ev(7)],
            ..DecodedChunk::default()
        };
        assert!(chunk_tx.send(chunk).await.is_ok());
        // The input stays open: only the age limit can send it.
        let b = tokio::time::timeout(Duration::from_secs(10), batch_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((b.events.len(), b.cursor()), (1, Some(7)));
        drop(chunk_tx);
        stage.await.unwrap();
    }
}

//! Channels between pipeline stages bounded in items *and* in bytes, each with a gauge
//! (`queue_bytes{queue}`). A sender waits while the queue holds its byte bound (it blocks, it
//! never drops); an item heavier than the whole bound is let in alone, once the queue is empty.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

pub(crate) use crate::budget::Weigh;
use crate::budget::EVENT_OVERHEAD_BYTES;
use crate::firehose::fixture::RawFrame;
use crate::firehose::{Event, EventKind, OpRecord};

/// Most bytes one permit batch may take (the semaphore counts in `u32`).
const MAX_WEIGHT: usize = u32::MAX as usize;

/// A channel of at most `items` items and `bytes` bytes, named `name` in its gauge.
pub(crate) fn channel<T: Weigh>(
    name: &'static str,
    items: usize,
    bytes: usize,
) -> (Sender<T>, Receiver<T>) {
    let cap = bytes.clamp(1, MAX_WEIGHT);
    let permits = Arc::new(Semaphore::new(cap));
    let (tx, rx) = mpsc::channel(items.max(1));
    let gauge = Gauge {
        name,
        cap,
        permits: permits.clone(),
    };
    gauge.publish();
    (
        Sender {
            tx,
            permits,
            gauge: gauge.clone(),
        },
        Receiver { rx, gauge },
    )
}

#[derive(Clone)]
struct Gauge {
    name: &'static str,
    cap: usize,
    permits: Arc<Semaphore>,
}

impl Gauge {
    fn publish(&self) {
        let used = self.cap.saturating_sub(self.permits.available_permits());
        metrics::gauge!(crate::metrics::QUEUE_BYTES, "queue" => self.name).set(used as f64);
    }
}

pub(crate) struct Sender<T> {
    tx: mpsc::Sender<(T, OwnedSemaphorePermit)>,
    permits: Arc<Semaphore>,
    gauge: Gauge,
}

impl<T: Weigh> Sender<T> {
    /// Sends `item` once the queue has room for its bytes and a slot; gives it back if the
    /// receiver is gone.
    pub(crate) async fn send(&self, item: T) -> Result<(), T> {
        // Clamped to the bound, so a heavy item waits for an empty queue instead of forever.
        let weight = item.bytes().clamp(1, self.gauge.cap) as u32;
        let Ok(permit) = self.permits.clone().acquire_many_owned(weight).await else {
            return Err(item);
        };
        let sent = self.tx.send((item, permit)).await.map_err(|e| e.0 .0);
        self.gauge.publish();
        sent
    }

    /// [`Sender::send`] from a blocking thread (not from async code).
    pub(crate) fn blocking_send(&self, item: T) -> Result<(), T> {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt.block_on(self.send(item)),
            Err(_) => Err(item),
        }
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.gauge
            .cap
            .saturating_sub(self.permits.available_permits())
    }

    /// Items queued now.
    #[cfg(test)]
    pub(crate) fn queued_items(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

pub(crate) struct Receiver<T> {
    rx: mpsc::Receiver<(T, OwnedSemaphorePermit)>,
    gauge: Gauge,
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        let (item, permit) = self.rx.recv().await?;
        drop(permit);
        self.gauge.publish();
        Some(item)
    }
}

impl<T> Drop for Receiver<T> {
    /// Senders waiting for room give up (their `send` returns the item).
    fn drop(&mut self) {
        self.gauge.permits.close();
    }
}

impl Weigh for Vec<RawFrame> {
    fn bytes(&self) -> usize {
        self.iter().map(RawFrame::bytes).sum()
    }
}

impl RawFrame {
    /// What the frame holds in memory.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + match self {
                RawFrame::Message(m) => m.len(),
                RawFrame::Oversized { .. } => 0,
            }
    }
}

impl Weigh for super::DecodedChunk {
    fn bytes(&self) -> usize {
        self.events.bytes()
    }
}

impl Weigh for Vec<Event> {
    fn bytes(&self) -> usize {
        self.iter().map(event_bytes).sum()
    }
}

impl Weigh for Event {
    fn bytes(&self) -> usize {
        event_bytes(self)
    }
}

/// How much bigger a record is decoded (typed struct or JSON tree) than as DAG-CBOR: keys and
/// strings become owned `String`s, numbers and nodes 16–32-byte values.
const DECODED_RECORD_FACTOR: usize = 4;

/// What a decoded event holds in memory: its CAR slice, its ops and their records (estimated
/// from their DAG-CBOR size, [`crate::firehose::event::Commit::records_bytes`]).
pub(crate) fn event_bytes(ev: &Event) -> usize {
    EVENT_OVERHEAD_BYTES
        + match &ev.kind {
            EventKind::Commit(c) => {
                c.blocks.len()
                    + c.repo.len()
                    + c.records_bytes.saturating_mul(DECODED_RECORD_FACTOR)
                    + c.ops
                        .iter()
                        .map(|op| {
                            std::mem::size_of_val(op)
                                + op.collection.len()
                                + op.rkey.len()
                                + match &op.record {
                                    OpRecord::Invalid(r) => r.detail.len(),
                                    _ => 0,
                                }
                        })
                        .sum::<usize>()
            }
            EventKind::Sync(s) => s.blocks.len() + s.did.len(),
            EventKind::Identity(i) => i.did.len() + i.handle.as_ref().map_or(0, String::len),
            EventKind::Account(a) => a.did.len(),
            EventKind::Info { name, message }
            | EventKind::Error {
                error: name,
                message,
            } => name.len() + message.as_ref().map_or(0, String::len),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct W(usize);
    impl Weigh for W {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waits_for_bytes_not_only_for_slots() {
        let (tx, mut rx) = channel::<W>("test", 100, 1_000);
        tx.send(W(600)).await.ok().unwrap();
        assert_eq!((tx.queued_bytes(), tx.queued_items()), (600, 1));
        // 600 + 500 > 1,000: the second send waits although 99 slots are free.
        let blocked = tokio::time::timeout(Duration::from_secs(1), tx.send(W(500))).await;
        assert!(blocked.is_err(), "sent past the byte bound");
        assert_eq!(rx.recv().await.map(|w| w.0), Some(600));
        assert_eq!(tx.queued_bytes(), 0);
        tx.send(W(500)).await.ok().unwrap();
        // An item over the whole bound waits for an empty queue, then goes in alone.
        let heavy = tokio::spawn(async move {
            tx.send(W(5_000)).await.ok().unwrap();
            tx
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!heavy.is_finished());
        assert_eq!(rx.recv().await.map(|w| w.0), Some(500));
        let tx = heavy.await.unwrap();
        assert_eq!(tx.queued_bytes(), 1_000);
        assert_eq!(rx.recv().await.map(|w| w.0), Some(5_000));
        drop(tx);
        assert!(rx.recv().await.is_none());
    }
}

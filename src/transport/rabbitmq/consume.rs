//! Consuming: the consumer task (declares the topology, sets the prefetch, consumes every
//! queue of the group, and settles on the same channel), the acknowledgement ledger, and the
//! health reader.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::mpsc;

use super::{backoff, declare, hint, open, Shared};
use crate::transport::{Failure, Message, Sink, TransportError};

/// Acknowledgement bookkeeping of one channel: which delivered tags are still open, and the
/// fewest `basic.ack`s that settle what finished (one `multiple` ack below the lowest open
/// tag, single acks above it: handlers finish out of order).
#[derive(Debug, Default)]
pub struct Ledger {
    open: BTreeSet<u64>,
}

impl Ledger {
    /// A delivery arrived.
    pub fn delivered(&mut self, tag: u64) {
        self.open.insert(tag);
    }

    /// These tags finished -> the acks to send: (tag, multiple).
    pub fn settle(&mut self, tags: &[u64]) -> Vec<(u64, bool)> {
        let mut done: Vec<u64> = tags
            .iter()
            .copied()
            .filter(|t| self.open.remove(t))
            .collect();
        done.sort_unstable();
        let floor = self.open.first().copied().unwrap_or(u64::MAX);
        let below = done.partition_point(|t| *t < floor);
        let mut acks = Vec::with_capacity(done.len() - below + 1);
        match below {
            0 => {}
            1 => acks.push((done[0], false)),
            n => acks.push((done[n - 1], true)),
        }
        acks.extend(done[below..].iter().map(|t| (*t, false)));
        acks
    }

    /// Tags delivered and not settled.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether every delivered tag is settled.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// A settle request for the consumer task: the receipt, and dead letters to write first.
pub(super) struct Settle {
    pub(super) generation: u64,
    pub(super) tag: u64,
    pub(super) dead: Option<Box<Dead>>,
}

/// What goes to `<queue>.dead` for one message: its body once per failure.
pub(super) struct Dead {
    pub(super) source: String,
    pub(super) payload: String,
    pub(super) failures: Vec<Failure>,
}

/// A consuming channel: declares the topology, sets the prefetch, consumes every queue.
async fn open_consumer(
    shared: &Shared,
    reuse: Option<Connection>,
) -> Result<(Connection, Channel, Channel, Consumers), TransportError> {
    let conn = match reuse {
        Some(c) => c,
        None => open(shared).await?,
    };
    let err = |e: lapin::Error| shared.error(hint(&e));
    let ch = conn.create_channel().await.map_err(err)?;
    declare(shared, &ch).await.map_err(err)?;
    ch.basic_qos(shared.cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(err)?;
    let dead = conn.create_channel().await.map_err(err)?;
    dead.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(err)?;
    let mut streams = Vec::new();
    for (i, q) in shared.cfg.queues().into_iter().enumerate() {
        let consumer = ch
            .basic_consume(
                q.as_str().into(),
                consumer_tag(i),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err)?;
        let source: Arc<str> = q.into();
        let tag: Tagger = Box::new(move |d| (Arc::clone(&source), d));
        streams.push(consumer.map(tag));
    }
    Ok((conn, ch, dead, futures_util::stream::select_all(streams)))
}

/// This process's consumer tag on the group's i-th queue.
fn consumer_tag(i: usize) -> ShortString {
    format!("oxbus-{}-{i}", std::process::id()).into()
}

type Delivered = (Arc<str>, lapin::Result<lapin::message::Delivery>);
type Tagger = Box<dyn FnMut(lapin::Result<lapin::message::Delivery>) -> Delivered + Send>;
type Consumers =
    futures_util::stream::SelectAll<futures_util::stream::Map<lapin::Consumer, Tagger>>;

fn deliveries_of(d: &lapin::message::Delivery) -> u32 {
    let count = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n),
            AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
            AMQPValue::ShortShortInt(n) => u32::try_from(n).ok(),
            _ => None,
        });
    match count {
        Some(n) => n.saturating_add(1),
        None => 1 + u32::from(d.redelivered),
    }
}

/// Consumes the group's queues and settles what the bus finished, on one channel, across
/// reconnections.
pub(super) async fn consumer(
    shared: Arc<Shared>,
    mut reuse: Option<Connection>,
    mut rx: mpsc::UnboundedReceiver<Settle>,
    sink: Arc<dyn Sink>,
) {
    let mut attempt = 0;
    while !shared.stopping() {
        let (conn, ch, dead_ch, mut stream) = match open_consumer(&shared, reuse.take()).await {
            Ok(x) => x,
            Err(e) => {
                shared.note(false, Some(e.to_string()));
                drop_stale(&shared, &mut rx);
                shared.nap(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        shared.note(true, None);
        let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut ledger = Ledger::default();
        let mut cancelled = false;
        let broken = loop {
            let woken = shared.wake.notified();
            if shared.paused.load(Ordering::Acquire) && !cancelled {
                cancelled = true;
                for i in 0..shared.cfg.queues().len() {
                    let _ = ch
                        .basic_cancel(consumer_tag(i), BasicCancelOptions::default())
                        .await;
                }
            }
            if shared.stopping() {
                break None;
            }
            tokio::select! {
                d = stream.next(), if !cancelled => {
                    let (source, first) = match d {
                        Some((source, Ok(first))) => (source, first),
                        Some((_, Err(e))) => break Some(e.to_string()),
                        None => break Some("the broker cancelled the consumer".to_owned()),
                    };
                    let mut batch = vec![(source, first)];
                    while batch.len() < 512 {
                        match stream.next().now_or_never() {
                            Some(Some((s, Ok(d)))) => batch.push((s, d)),
                            _ => break,
                        }
                    }
                    let messages: Vec<Message> = batch
                        .into_iter()
                        .map(|(source, d)| {
                            ledger.delivered(d.delivery_tag);
                            Message {
                                source: source.to_string(),
                                id: format!("{generation}.{}", d.delivery_tag),
                                payload: String::from_utf8_lossy(&d.data).into_owned(),
                                deliveries: deliveries_of(&d),
                            }
                        })
                        .collect();
                    {
                        let mut h = shared.health.lock();
                        h.received += messages.len() as u64;
                        h.claimed += messages.iter().filter(|m| m.deliveries > 1).count() as u64;
                        h.pending = ledger.len() as u64;
                    }
                    sink.delivered(messages);
                }
                s = rx.recv() => {
                    let Some(first) = s else { break None };
                    let mut settles = vec![first];
                    while let Ok(s) = rx.try_recv() {
                        settles.push(s);
                    }
                    if let Err(e) = settle(&shared, &ch, &dead_ch, generation, &mut ledger, settles).await {
                        break Some(e);
                    }
                    shared.health.lock().pending = ledger.len() as u64;
                }
                () = woken => {}
            }
        };
        match broken {
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into()))
                    .await;
                return;
            }
            Some(e) => {
                // What was delivered and not settled is requeued by the broker.
                shared.health.lock().last_error = Some(e);
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into()))
                    .await;
                shared.nap(backoff(0)).await;
            }
        }
    }
}

/// Settles of a connection that is gone: the broker requeued those messages.
fn drop_stale(shared: &Shared, rx: &mut mpsc::UnboundedReceiver<Settle>) {
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    shared.acks_queued.fetch_sub(n, Ordering::AcqRel);
}

async fn settle(
    shared: &Shared,
    ch: &Channel,
    dead_ch: &Channel,
    generation: u64,
    ledger: &mut Ledger,
    settles: Vec<Settle>,
) -> Result<(), String> {
    let total = settles.len();
    let result = async {
        let mut tags = Vec::with_capacity(total);
        let dead_queue: ShortString = shared.cfg.dead_queue().into();
        let mut dead = 0;
        for s in settles {
            if s.generation != generation {
                continue; // requeued by the broker when its connection closed
            }
            if let Some(d) = s.dead {
                for failure in &d.failures {
                    let props = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into())
                        .with_headers(dead_headers(shared, &d.source, failure));
                    let confirm = dead_ch
                        .basic_publish(
                            "".into(),
                            dead_queue.clone(),
                            BasicPublishOptions::default(),
                            d.payload.as_bytes(),
                            props,
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    if !confirm.await.map_err(|e| e.to_string())?.is_ack() {
                        return Err("the broker refused a dead letter".to_owned());
                    }
                    dead += 1;
                }
            }
            tags.push(s.tag);
        }
        let acks = ledger
            .settle(&tags)
            .into_iter()
            .map(|(tag, multiple)| ch.basic_ack(tag, BasicAckOptions { multiple }));
        for r in futures_util::future::join_all(acks).await {
            r.map_err(|e| e.to_string())?;
        }
        shared.health.lock().dead += dead;
        Ok(())
    }
    .await;
    shared.acks_queued.fetch_sub(total, Ordering::AcqRel);
    result
}

/// The headers of a dead letter: the failure's fields, the queue it came from, the group.
fn dead_headers(shared: &Shared, source: &str, failure: &Failure) -> FieldTable {
    let mut headers = FieldTable::default();
    for (name, value) in failure.fields() {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    headers.insert("queue".into(), AMQPValue::LongString(source.into()));
    headers.insert(
        "group".into(),
        AMQPValue::LongString(shared.cfg.group.as_str().into()),
    );
    headers
}

/// Reads the depth of the group's queues every 2 s (passive declares, one small command
/// each; no busy loop).
pub(super) async fn health_reader(shared: Arc<Shared>) {
    let mut conn: Option<(Connection, Channel)> = None;
    while !shared.stopping() {
        if shared.cfg.consume {
            if conn.is_none() {
                match open(&shared).await {
                    Ok(c) => match c.create_channel().await {
                        Ok(ch) => conn = Some((c, ch)),
                        Err(e) => shared.note(false, Some(e.to_string())),
                    },
                    Err(e) => shared.note(false, Some(e.to_string())),
                }
            }
            if let Some((_, ch)) = &conn {
                let mut lag = 0u64;
                let mut failed = None;
                for q in shared.cfg.queues() {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    };
                    match ch
                        .queue_declare(q.as_str().into(), passive, FieldTable::default())
                        .await
                    {
                        Ok(info) => lag += u64::from(info.message_count()),
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                match failed {
                    None => {
                        let mut h = shared.health.lock();
                        h.reachable = true;
                        h.lag = lag;
                    }
                    Some(e) => {
                        shared.health.lock().last_error = Some(e);
                        conn = None; // read again on a new connection next time
                        continue;
                    }
                }
            }
        }
        shared.nap(Duration::from_secs(2)).await;
    }
    if let Some((c, _)) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.close(200, "bye".into())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_acks_a_settled_prefix_at_once_and_the_rest_one_by_one() {
        let mut l = Ledger::default();
        for t in 1..=6 {
            l.delivered(t);
        }
        // 1 and 2 finished: one multiple ack on 2.
        assert_eq!(l.settle(&[2, 1]), vec![(2, true)]);
        // 5 finished while 3 is open: alone.
        assert_eq!(l.settle(&[5]), vec![(5, false)]);
        // 3 finished: below the floor (4), alone.
        assert_eq!(l.settle(&[3]), vec![(3, false)]);
        // unknown or repeated tags are ignored.
        assert_eq!(l.settle(&[3, 99]), vec![]);
        assert_eq!(l.len(), 2);
        assert_eq!(l.settle(&[6, 4]), vec![(6, true)]);
        assert!(l.is_empty());
    }
}

//! Claiming entries left pending by dead consumers (`XPENDING` + `XCLAIM`), dead-lettering
//! those delivered too often, and the transport's side of the lease keeper (a hand-over
//! claims a partition at once).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamId;
use redis::Client;

use super::consume::{dead_xadd, entry_of};
use super::{connect, Shared};
use crate::transport::leases::{self, Table};
use crate::transport::{Message, Sink};

/// Claims entries idle on other consumers for `claim_idle`, sending those delivered more than
/// `max_deliveries` times to the dead-letter stream instead. With leases, only in the
/// partitions this member holds (a hand-over claims the rest of a partition at once).
pub(super) async fn claimer(shared: Arc<Shared>, client: Client, sink: Arc<dyn Sink>) {
    let cfg = &shared.cfg;
    let period = (cfg.claim_idle / 2).max(Duration::from_millis(100));
    let idle_ms = u64::try_from(cfg.claim_idle.as_millis()).unwrap_or(u64::MAX);
    let mut conn: Option<MultiplexedConnection> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shared.stopped.notified() => return,
        }
        if shared.stop.load(Ordering::Acquire) || shared.paused.load(Ordering::Acquire) {
            return;
        }
        if conn.is_none() {
            match connect(&client, Some(Duration::from_secs(5))).await {
                Ok(c) => conn = Some(c),
                Err(e) => shared.note(false, Some(e.to_string())),
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        // Marked as being read: a partition is not handed over while claims of it run.
        let parts = shared.parts.start_claim();
        for &i in &parts {
            if let Err(e) = claim_partition(&shared, c, i, idle_ms, false, &sink).await {
                shared.command_failed(&e);
                conn = None;
                break;
            }
        }
        shared.parts.end_read(&parts);
    }
}

/// Claims the entries of partition `i` pending on other consumers (and on this one when
/// `own`) for at least `idle_ms`, page by page in id order, and hands them on in id order;
/// those delivered `max_deliveries` times go to the dead-letter stream instead.
async fn claim_partition(
    shared: &Shared,
    c: &mut MultiplexedConnection,
    i: usize,
    idle_ms: u64,
    own: bool,
    sink: &Arc<dyn Sink>,
) -> redis::RedisResult<()> {
    let cfg = &shared.cfg;
    let stream = &cfg.streams[i];
    let mut from = "-".to_owned();
    loop {
        // [[id, consumer, idle, deliveries], ...]
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&cfg.group)
            .arg("IDLE")
            .arg(idle_ms)
            .arg(&from)
            .arg("+")
            .arg(cfg.batch)
            .query_async(c)
            .await?;
        let Some((last, ..)) = pending.last() else {
            return Ok(());
        };
        let full = pending.len() >= cfg.batch;
        from = format!("({last}");
        let mut claim = Vec::new();
        for (id, consumer, _, deliveries) in pending {
            if consumer == cfg.consumer && !own {
                continue; // ours: still being handled
            }
            if deliveries >= u64::from(cfg.max_deliveries) {
                dead_letter_pending(shared, c, stream, &id, deliveries).await?;
            } else {
                claim.push((id, deliveries));
            }
        }
        if !claim.is_empty() {
            let ids: Vec<&String> = claim.iter().map(|(id, _)| id).collect();
            let claimed: redis::streams::StreamClaimReply = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(&cfg.group)
                .arg(&cfg.consumer)
                .arg(idle_ms)
                .arg(&ids)
                .query_async(c)
                .await?;
            let mut entries: Vec<Message> = claimed
                .ids
                .iter()
                .map(|sid| {
                    let d = claim
                        .iter()
                        .find(|(id, _)| id == &sid.id)
                        .map_or(1, |(_, d)| d + 1);
                    entry_of(stream, sid, u32::try_from(d).unwrap_or(u32::MAX))
                })
                .collect();
            entries.sort_by_key(|e| id_order(&e.id));
            if !entries.is_empty() {
                let mut delivered = vec![0; cfg.streams.len()];
                delivered[i] = entries.len();
                shared.parts.delivered(&delivered);
                shared.in_flight.fetch_add(entries.len(), Ordering::AcqRel);
                shared.health.lock().claimed += entries.len() as u64;
                sink.delivered(entries);
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// Moves a pending entry delivered too often to the dead-letter stream, then acknowledges it.
async fn dead_letter_pending(
    shared: &Shared,
    c: &mut MultiplexedConnection,
    stream: &str,
    id: &str,
    deliveries: u64,
) -> redis::RedisResult<()> {
    let cfg = &shared.cfg;
    let entries: Vec<StreamId> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(id)
        .arg(id)
        .query_async::<redis::streams::StreamRangeReply>(c)
        .await?
        .ids;
    let payload = entries
        .first()
        .map(|e| entry_of(stream, e, 0).payload)
        .unwrap_or_default();
    let mut pipe = redis::pipe();
    dead_xadd(&mut pipe, cfg, payload, stream, id, deliveries)
        .arg("error")
        .arg(format!(
            "delivered {deliveries} times without being acknowledged"
        ))
        .ignore()
        .cmd("XACK")
        .arg(stream)
        .arg(&cfg.group)
        .arg(id)
        .ignore()
        .query_async::<()>(c)
        .await?;
    shared.health.lock().dead += 1;
    Ok(())
}

/// A stream entry id (`<ms>-<seq>`) as a sortable pair.
fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The transport's side of its lease keeper.
pub(super) struct Keeper {
    pub(super) shared: Arc<Shared>,
    pub(super) sink: Arc<dyn Sink>,
}

impl leases::Holder for Keeper {
    fn table(&self) -> &Table {
        &self.shared.parts
    }

    fn ending(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire) || self.shared.stop.load(Ordering::Acquire)
    }

    fn take_over(
        &self,
        conn: &mut MultiplexedConnection,
        i: usize,
        own: bool,
    ) -> impl std::future::Future<Output = redis::RedisResult<()>> + Send {
        claim_partition(&self.shared, conn, i, 0, own, &self.sink)
    }

    fn report(&self, members: Vec<String>, owners: Vec<Option<String>>) {
        let owned = self.shared.parts.owned();
        let mut h = self.shared.health.lock();
        h.owned = owned;
        h.members = members;
        h.assignment = owners;
    }

    fn failed(&self, e: &redis::RedisError) {
        self.shared.command_failed(e);
    }
}

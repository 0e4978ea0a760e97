//! Consuming: creating the group, reading new entries (`XREADGROUP`) while there is room
//! under `prefetch`, and the acker (batched `XACK`, dead letters written first).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use redis::{Client, Value};
use tokio::sync::mpsc;

use super::{backoff, connect, Config, Settle, Shared};
use crate::transport::{Message, Sink};

/// Creates the group if missing, at `start`: "$" (from now) when the bus starts, "0" (all
/// the stream holds) when a reconnecting reader finds it gone — Redis restarted empty, and
/// entries accepted since must not be skipped.
pub(super) async fn create_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    start: &str,
) -> redis::RedisResult<()> {
    let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) async fn acker(
    shared: Arc<Shared>,
    client: Client,
    mut conn: MultiplexedConnection,
    mut rx: mpsc::UnboundedReceiver<Settle>,
) {
    let cfg = &shared.cfg;
    while let Some(first) = rx.recv().await {
        let mut by_stream: Vec<Vec<String>> = vec![Vec::new(); cfg.streams.len()];
        let mut dead = Vec::new();
        let mut n = 0;
        let mut next = Some(first);
        while let Some(Settle { idx, id, dead: d }) = next {
            if let Some(d) = d {
                dead.push((idx, id.clone(), *d));
            }
            by_stream[idx].push(id);
            n += 1;
            next = rx.try_recv().ok();
        }
        let mut attempt = 0;
        // Dead letters are written first, in a pipeline of their own: only once Redis took
        // every one of them are their entries acknowledged (Redis runs the commands of one
        // pipeline each on its own, so an XACK beside a refused XADD would still run). A
        // failure writes them again: at least once, never lost.
        let mut written = dead.is_empty();
        let mut refused = None;
        loop {
            if !written {
                let mut pipe = redis::pipe();
                for (s, id, (payload, failures)) in &dead {
                    for failure in failures {
                        let xadd = dead_xadd(&mut pipe, cfg, payload, &cfg.streams[*s], id, 1);
                        for (name, value) in failure.fields() {
                            xadd.arg(name).arg(value);
                        }
                    }
                }
                let expected: usize = dead.iter().map(|(_, _, (_, f))| f.len()).sum();
                refused = match pipe.query_async::<Vec<String>>(&mut conn).await {
                    Ok(ids) if ids.len() == expected => None,
                    Ok(_) => Some(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "Redis did not take every dead letter",
                    ))),
                    Err(e) => Some(e),
                };
                written = refused.is_none();
            }
            let acked = if let Some(e) = refused.take() {
                Err(e)
            } else {
                let mut pipe = redis::pipe();
                for (s, ids) in by_stream.iter().enumerate().filter(|(_, i)| !i.is_empty()) {
                    pipe.cmd("XACK")
                        .arg(&cfg.streams[s])
                        .arg(&cfg.group)
                        .arg(ids)
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            };
            match acked {
                Ok(()) => {
                    shared.note(true, None);
                    if !dead.is_empty() {
                        shared.health.lock().dead += dead
                            .iter()
                            .map(|(_, _, (_, f))| f.len() as u64)
                            .sum::<u64>();
                    }
                    break;
                }
                Err(e) => {
                    shared.command_failed(&e);
                    if shared.stop.load(Ordering::Acquire) {
                        break; // unacked entries are claimed back later: at least once
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    match connect(&client, Some(Duration::from_secs(2))).await {
                        Ok(c) => conn = c,
                        Err(e) => shared.note(false, Some(e.to_string())),
                    }
                }
            }
        }
        let settled: Vec<usize> = by_stream.iter().map(Vec::len).collect();
        shared.parts.settled(&settled);
        shared.in_flight.fetch_sub(n, Ordering::AcqRel);
        shared.acks_queued.fetch_sub(n, Ordering::AcqRel);
        shared.room.notify_waiters();
    }
}

/// Adds to `pipe` the XADD of a dead letter to the group's dead-letter stream: the entry's
/// payload, where it came from and how often it was delivered; the caller adds why.
pub(super) fn dead_xadd<'p>(
    pipe: &'p mut redis::Pipeline,
    cfg: &Config,
    payload: impl redis::ToRedisArgs,
    stream: &str,
    id: &str,
    deliveries: u64,
) -> &'p mut redis::Pipeline {
    pipe.cmd("XADD")
        .arg(&cfg.dead_stream)
        .arg("*")
        .arg("d")
        .arg(payload)
        .arg("stream")
        .arg(stream)
        .arg("id")
        .arg(id)
        .arg("group")
        .arg(&cfg.group)
        .arg("deliveries")
        .arg(deliveries)
}

pub(super) fn entry_of(stream: &str, sid: &StreamId, deliveries: u32) -> Message {
    let payload = match sid.map.get("d") {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    };
    Message {
        source: stream.to_owned(),
        id: sid.id.clone(),
        payload,
        deliveries,
    }
}

async fn wait_for_room(shared: &Shared) {
    while shared.in_flight.load(Ordering::Acquire) >= shared.cfg.prefetch
        && !shared.stop.load(Ordering::Acquire)
    {
        let notified = shared.room.notified();
        if shared.in_flight.load(Ordering::Acquire) < shared.cfg.prefetch {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
    }
}

pub(super) async fn reader(shared: Arc<Shared>, client: Client, sink: Arc<dyn Sink>) {
    let cfg = &shared.cfg;
    let mut conn: Option<MultiplexedConnection> = None;
    let mut attempt = 0;
    while !shared.stop.load(Ordering::Acquire) && !shared.paused.load(Ordering::Acquire) {
        wait_for_room(&shared).await;
        if conn.is_none() {
            match connect(&client, None).await {
                Ok(mut c) => {
                    for s in &cfg.streams {
                        let _ = create_group(&mut c, s, &cfg.group, "0").await;
                    }
                    conn = Some(c);
                    attempt = 0;
                }
                Err(e) => {
                    shared.note(false, Some(e.to_string()));
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            }
        }
        // Only the partitions this member may read (all of them without leases).
        let parts = shared.parts.start_read();
        if parts.is_empty() {
            tokio::select! {
                () = shared.parts.changed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = shared.stopped.notified() => break,
            }
            continue;
        }
        let c = conn.as_mut().expect("connected above");
        let room = cfg
            .prefetch
            .saturating_sub(shared.in_flight.load(Ordering::Acquire))
            .clamp(1, cfg.batch);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&cfg.group)
            .arg(&cfg.consumer)
            .arg("COUNT")
            .arg(room)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS");
        for &p in &parts {
            cmd.arg(&cfg.streams[p]);
        }
        for _ in &parts {
            cmd.arg(">");
        }
        let read = tokio::select! {
            r = cmd.query_async::<Option<StreamReadReply>>(c) => r,
            () = shared.stopped.notified() => {
                shared.parts.end_read(&parts);
                break;
            }
        };
        let mut delivered = vec![0; cfg.streams.len()];
        match read {
            Ok(Some(reply)) => {
                shared.note(true, None);
                let entries: Vec<Message> = reply
                    .keys
                    .iter()
                    .flat_map(|k| k.ids.iter().map(move |id| entry_of(&k.key, id, 1)))
                    .collect();
                for k in &reply.keys {
                    delivered[shared.index(&k.key)] += k.ids.len();
                }
                if !entries.is_empty() {
                    // Counted in flight before they can be acknowledged, and before the read
                    // ends: a partition being given up is never seen quiet in between.
                    shared.parts.delivered(&delivered);
                    shared.in_flight.fetch_add(entries.len(), Ordering::AcqRel);
                    shared.health.lock().received += entries.len() as u64;
                    sink.delivered(entries);
                }
                shared.parts.end_read(&parts);
            }
            Ok(None) => {
                shared.parts.end_read(&parts);
                shared.note(true, None);
            }
            Err(e) => {
                shared.parts.end_read(&parts);
                shared.command_failed(&e);
                conn = None;
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
}

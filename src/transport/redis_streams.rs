//! A Redis Streams transport: pipelined `XADD` publishing, `XREADGROUP` consumption in a
//! consumer group, batched `XACK`, reclaiming of entries left pending by dead consumers
//! (`XPENDING` + `XCLAIM` after `claim_idle`), a dead-letter stream for entries delivered too
//! often, and a periodic health reading (`XINFO GROUPS`). With partition leases (see
//! `leases`), a member reads and claims only the partitions it holds.
//!
//! Threads: none of its own. The transport's tasks run on the tokio runtime whose handle it is
//! given (one runtime for the whole process; tests build their own). Publishing and acking
//! use a multiplexed connection (with a response timeout); the blocking reader has a connection
//! of its own with no response timeout, as `XREADGROUP BLOCK` needs. Every task reconnects on
//! error with a capped backoff; a publish batch that cannot reach Redis within
//! `publish_timeout` fails with an error instead of waiting forever.

pub mod dead;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, Value};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::leases::{self, LeaseConfig, Table};
use super::{Failure, Health, Message, Outgoing, Sink, Stopping, Transport, TransportError};

/// Settings of one transport.
#[derive(Debug, Clone)]
pub struct Config {
    /// `redis://[:password@]host:port/db` (or `rediss://` when built with TLS).
    pub url: String,
    /// Stream names; events are spread over them by key when there are several.
    pub streams: Vec<String>,
    /// Consumer group.
    pub group: String,
    /// This member's name in the group.
    pub consumer: String,
    /// Entries pending on a consumer for this long are claimed back.
    pub claim_idle: Duration,
    /// `MAXLEN ~` bound of each stream (0 = unbounded).
    pub maxlen: usize,
    /// Entries read per `XREADGROUP`.
    pub batch: usize,
    /// Entries delivered and not yet acknowledged, at most.
    pub prefetch: usize,
    /// Deliveries after which an entry goes to `dead_stream`.
    pub max_deliveries: u32,
    /// Where entries delivered too often go.
    pub dead_stream: String,
    /// How long a publish batch may wait for Redis before failing.
    pub publish_timeout: Duration,
    /// Whether to consume at all (a publish-only bus does not).
    pub consume: bool,
    /// Partition leases: each partition read by one member of the group at a time (`None`:
    /// every member reads every partition). Used only when consuming.
    pub leases: Option<LeaseConfig>,
}

struct Shared {
    cfg: Config,
    safe_url: String,
    stop: AtomicBool,
    stopped: Notify,
    in_flight: AtomicUsize,
    /// Acknowledgements queued and not yet sent (stop waits for them).
    acks_queued: AtomicUsize,
    /// Set by `pause`: the reader takes no new entries.
    paused: AtomicBool,
    room: Notify,
    health: Mutex<Health>,
    /// What each partition is doing here (leased, being read, entries in flight).
    parts: Table,
}

impl Shared {
    fn error(&self, e: &redis::RedisError) -> TransportError {
        TransportError::Broker {
            broker: "redis",
            url: self.safe_url.clone(),
            message: e.to_string(),
        }
    }

    /// A command failed. On a connection that broke (Redis restarted, a proxy dropped it) this
    /// says nothing of whether Redis is reachable now: the task reconnects, and only a failed
    /// connect (`note(false)`) marks it unreachable. Any other failure does.
    fn command_failed(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() {
            self.health.lock().last_error = Some(e.to_string());
        } else {
            self.note(false, Some(e.to_string()));
        }
    }

    /// The index of a stream name among the partitions (0 if unknown).
    fn index(&self, stream: &str) -> usize {
        self.cfg
            .streams
            .iter()
            .position(|s| s == stream)
            .unwrap_or(0)
    }

    fn note(&self, ok: bool, err: Option<String>) {
        let mut h = self.health.lock();
        h.reachable = ok;
        if err.is_some() {
            h.last_error = err;
        }
    }
}

/// A running Redis Streams transport.
pub struct RedisStreams {
    shared: Arc<Shared>,
    /// Its tasks on the runtime (taken by `stop`).
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub_tx: mpsc::UnboundedSender<(u64, Vec<(usize, String)>)>,
    ack_tx: mpsc::UnboundedSender<Settle>,
    /// With partition leases: the keeper task (stopped first by `stop`, which then releases
    /// the leases), and the client and keys to release them with.
    keeper: Mutex<Option<JoinHandle<()>>>,
    leases: Option<(Client, leases::Keys)>,
}

impl std::fmt::Debug for RedisStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("url", &self.shared.safe_url)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

async fn connect(
    client: &Client,
    timeout: Option<Duration>,
) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(timeout);
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// Installs rustls's crypto provider (ring) once, so `rediss://` URLs work.
pub fn ensure_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already: that one is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}

impl RedisStreams {
    /// Checks the settings, connects once (so a wrong URL fails here, clearly), creates the
    /// group on every stream, and starts the tasks on `runtime`.
    pub async fn connect(
        cfg: Config,
        sink: Arc<dyn Sink>,
        runtime: Handle,
    ) -> Result<Self, TransportError> {
        if cfg.streams.is_empty() {
            return Err(TransportError::Invalid(
                "at least one stream is needed".into(),
            ));
        }
        if cfg.group.is_empty() {
            return Err(TransportError::Invalid("group must not be empty".into()));
        }
        let safe_url = redact(&cfg.url);
        ensure_tls();
        let client = Client::open(cfg.url.as_str())
            .map_err(|e| TransportError::Invalid(format!("invalid Redis URL {safe_url}: {e}")))?;
        let leased = cfg.leases.clone().filter(|_| cfg.consume);
        let parts = Table::new(cfg.streams.len(), leased.is_some());
        let shared = Arc::new(Shared {
            cfg,
            safe_url,
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            in_flight: AtomicUsize::new(0),
            acks_queued: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            room: Notify::new(),
            health: Mutex::new(Health::default()),
            parts,
        });
        // Connect and create the groups up front (on the runtime: the connection's driver
        // task lives there).
        let setup = Arc::clone(&shared);
        let setup_client = client.clone();
        let conn = runtime
            .spawn(async move {
                let mut conn = connect(&setup_client, Some(Duration::from_secs(5)))
                    .await
                    .map_err(|e| setup.error(&e))?;
                if setup.cfg.consume {
                    for s in &setup.cfg.streams {
                        create_group(&mut conn, s, &setup.cfg.group, "$")
                            .await
                            .map_err(|e| setup.error(&e))?;
                    }
                }
                Ok::<_, TransportError>(conn)
            })
            .await
            .map_err(|_| TransportError::Stopped("redis"))??;
        shared.note(true, None);
        let (pub_tx, pub_rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut tasks = vec![runtime.spawn(publisher(
            Arc::clone(&shared),
            client.clone(),
            conn.clone(),
            pub_rx,
            Arc::clone(&sink),
        ))];
        tasks.push(runtime.spawn(acker(
            Arc::clone(&shared),
            client.clone(),
            conn.clone(),
            ack_rx,
        )));
        tasks.push(runtime.spawn(health_reader(Arc::clone(&shared), client.clone(), conn)));
        if shared.cfg.consume {
            tasks.push(runtime.spawn(reader(
                Arc::clone(&shared),
                client.clone(),
                Arc::clone(&sink),
            )));
            tasks.push(runtime.spawn(claimer(
                Arc::clone(&shared),
                client.clone(),
                Arc::clone(&sink),
            )));
        }
        let (mut keeper, mut lease_keys) = (None, None);
        if let Some(lc) = leased {
            let keys = leases::Keys::new(&lc.stream, &shared.cfg.group, shared.cfg.streams.len());
            let holder = Arc::new(Keeper {
                shared: Arc::clone(&shared),
                sink,
            });
            keeper = Some(runtime.spawn(leases::keep(
                holder,
                client.clone(),
                keys.clone(),
                shared.cfg.consumer.clone(),
                lc.ttl,
            )));
            lease_keys = Some((client, keys));
        }
        Ok(Self {
            shared,
            tasks: Mutex::new(tasks),
            pub_tx,
            ack_tx,
            keeper: Mutex::new(keeper),
            leases: lease_keys,
        })
    }

    /// Queues events (partition, JSON) as one request: one result, all ids or an error.
    fn queue(&self, token: u64, items: Vec<(usize, String)>) -> Result<(), TransportError> {
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(TransportError::Stopped("redis"));
        }
        self.pub_tx
            .send((token, items))
            .map_err(|_| TransportError::Stopped("redis"))
    }

    fn settle(&self, stream: &str, id: String, dead: Option<Box<(String, Vec<Failure>)>>) {
        let idx = self.shared.index(stream);
        self.shared.acks_queued.fetch_add(1, Ordering::AcqRel);
        if self.ack_tx.send(Settle { idx, id, dead }).is_err() {
            self.shared.acks_queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// With partition leases: ends the keeper, then releases what it held and leaves the
    /// group's members (waiting up to 2 s for Redis), so other members take the partitions
    /// over at once. Entries still pending here are claimed by the next holder.
    async fn release(&self) {
        let keeper = self.keeper.lock().take();
        let Some(keeper) = keeper else { return };
        keeper.abort();
        let _ = keeper.await;
        if let Some((client, keys)) = &self.leases {
            let owned = self.shared.parts.owned();
            let left = tokio::time::timeout(
                Duration::from_secs(2),
                leases::leave(client, keys, &self.shared.cfg.consumer, &owned),
            )
            .await;
            if let Ok(Err(e)) = &left {
                self.shared.command_failed(e);
            }
        }
        self.shared.health.lock().owned.clear();
    }

    /// Marks the transport stopped and cancels its tasks (at their next await); returns them.
    fn halt(&self) -> Vec<JoinHandle<()>> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stopped.notify_waiters();
        self.shared.room.notify_waiters();
        let mut tasks = std::mem::take(&mut *self.tasks.lock());
        tasks.extend(self.keeper.lock().take());
        for t in &tasks {
            t.abort();
        }
        tasks
    }
}

impl Transport for RedisStreams {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn group(&self) -> &str {
        self.shared.cfg.group.as_str()
    }

    /// One pipelined `XADD` per event, each on its key's partition stream.
    fn publish(&self, token: u64, batch: Vec<Outgoing>) -> Result<(), TransportError> {
        let n = self.shared.cfg.streams.len();
        let items = batch
            .iter()
            .map(|o| Ok((o.partition(n), o.payload()?)))
            .collect::<Result<Vec<_>, TransportError>>()?;
        self.queue(token, items)
    }

    fn ack(&self, message: &Message) {
        self.settle(&message.source, message.id.clone(), None);
    }

    /// To `dead_stream`, one entry per failure with its fields, then `XACK`.
    fn dead_letter(&self, message: Message, failures: Vec<Failure>) {
        self.settle(
            &message.source,
            message.id,
            Some(Box::new((message.payload, failures))),
        );
    }

    fn pause(&self) {
        self.shared.paused.store(true, Ordering::Release);
        self.shared.stopped.notify_waiters();
    }

    fn health(&self) -> Health {
        self.shared.health.lock().clone()
    }

    fn flush(&self) -> Stopping<'_> {
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.shared.acks_queued.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    }

    /// Waits up to 2 s for the acknowledgements still queued to reach Redis, then releases
    /// the partition leases (up to 2 s more).
    fn stop(&self) -> Stopping<'_> {
        Box::pin(async move {
            self.pause();
            self.flush().await;
            self.release().await;
            let tasks = self.halt();
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }
}

impl Drop for RedisStreams {
    /// Cancels the tasks without waiting (acknowledgements still queued are lost: Redis
    /// redelivers those entries, at least once).
    fn drop(&mut self) {
        self.halt();
    }
}

/// Creates the group if missing, at `start`: "$" (from now) when the bus starts, "0" (all
/// the stream holds) when a reconnecting reader finds it gone — Redis restarted empty, and
/// entries accepted since must not be skipped.
async fn create_group(
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

async fn publisher(
    shared: Arc<Shared>,
    client: Client,
    mut conn: MultiplexedConnection,
    mut rx: mpsc::UnboundedReceiver<(u64, Vec<(usize, String)>)>,
    sink: Arc<dyn Sink>,
) {
    let cfg = &shared.cfg;
    while let Some(first) = rx.recv().await {
        let mut n = first.1.len();
        let mut batch = vec![first];
        while n < 4096 {
            match rx.try_recv() {
                Ok(x) => {
                    n += x.1.len();
                    batch.push(x);
                }
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        for (part, payload) in batch.iter().flat_map(|(_, items)| items) {
            let c = pipe.cmd("XADD").arg(&cfg.streams[*part]);
            if cfg.maxlen > 0 {
                c.arg("MAXLEN").arg("~").arg(cfg.maxlen);
            }
            c.arg("*").arg("d").arg(payload);
        }
        let deadline = Instant::now() + cfg.publish_timeout;
        let mut attempt = 0;
        let result: Result<Vec<String>, TransportError> = loop {
            match pipe.query_async::<Vec<String>>(&mut conn).await {
                Ok(ids) => break Ok(ids),
                Err(e) => {
                    shared.command_failed(&e);
                    if Instant::now() >= deadline || shared.stop.load(Ordering::Acquire) {
                        break Err(shared.error(&e));
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    match connect(&client, Some(Duration::from_secs(2))).await {
                        Ok(c) => conn = c,
                        Err(e) => shared.note(false, Some(e.to_string())),
                    }
                }
            }
        };
        let results = match result {
            Ok(ids) => {
                shared.note(true, None);
                shared.health.lock().published += ids.len() as u64;
                let mut ids = ids.into_iter();
                batch
                    .iter()
                    .map(|(t, items)| (*t, Ok(ids.by_ref().take(items.len()).collect())))
                    .collect()
            }
            Err(e) => batch.iter().map(|(t, _)| (*t, Err(e.clone()))).collect(),
        };
        sink.confirmed(results);
    }
}

async fn acker(
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
                        let xadd = pipe
                            .cmd("XADD")
                            .arg(&cfg.dead_stream)
                            .arg("*")
                            .arg("d")
                            .arg(payload)
                            .arg("stream")
                            .arg(&cfg.streams[*s])
                            .arg("id")
                            .arg(id)
                            .arg("group")
                            .arg(&cfg.group)
                            .arg("deliveries")
                            .arg(1);
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

/// An acknowledgement for the acker, with the dead letter to write first, if any.
struct Settle {
    idx: usize,
    id: String,
    dead: Option<Box<(String, Vec<Failure>)>>,
}

fn entry_of(stream: &str, sid: &StreamId, deliveries: u32) -> Message {
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

async fn reader(shared: Arc<Shared>, client: Client, sink: Arc<dyn Sink>) {
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

/// Claims entries idle on other consumers for `claim_idle`, sending those delivered more than
/// `max_deliveries` times to the dead-letter stream instead. With leases, only in the
/// partitions this member holds (a hand-over claims the rest of a partition at once).
async fn claimer(shared: Arc<Shared>, client: Client, sink: Arc<dyn Sink>) {
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
    redis::pipe()
        .cmd("XADD")
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
struct Keeper {
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
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

/// Reads lag and pending of the group every few seconds (not a busy loop: one small command).
async fn health_reader(shared: Arc<Shared>, client: Client, mut conn: MultiplexedConnection) {
    let mut retried = false;
    loop {
        let (mut lag, mut pending, mut ok) = (0u64, 0u64, true);
        let mut failure = None;
        for s in &shared.cfg.streams {
            let r: redis::RedisResult<Vec<std::collections::HashMap<String, Value>>> =
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(s)
                    .query_async(&mut conn)
                    .await;
            match r {
                Ok(groups) => {
                    for g in groups {
                        let name = g
                            .get("name")
                            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
                        if name.as_deref() == Some(shared.cfg.group.as_str()) {
                            lag += g
                                .get("lag")
                                .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                                .unwrap_or(0);
                            pending += g
                                .get("pending")
                                .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                                .unwrap_or(0);
                        }
                    }
                }
                Err(e) => {
                    ok = false;
                    failure = Some(e.to_string());
                }
            }
        }
        if !ok && !retried {
            // A connection broken by a restart of Redis: read again at once on a new one
            // before saying Redis is unreachable (a stale connection is not an outage).
            if let Ok(c) = connect(&client, Some(Duration::from_secs(2))).await {
                conn = c;
                retried = true;
                continue;
            }
        }
        if let Some(e) = failure {
            shared.note(false, Some(e));
        }
        retried = false;
        {
            let mut h = shared.health.lock();
            if ok {
                h.reachable = true;
                h.lag = lag;
                h.pending = pending;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = shared.stopped.notified() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(10), Duration::from_secs(1));
    }

    /// Publish results and deliveries, sent on as they come.
    struct Collect(std::sync::mpsc::Sender<Result<Vec<String>, Message>>);

    impl Sink for Collect {
        fn confirmed(&self, results: Vec<crate::transport::Confirm>) {
            for (_, r) in results {
                let _ = self.0.send(Ok(r.expect("published")));
            }
        }
        fn delivered(&self, entries: Vec<Message>) {
            for e in entries {
                let _ = self.0.send(Err(e));
            }
        }
    }

    fn config(url: &str, stream: &str, consume: bool) -> Config {
        Config {
            url: url.into(),
            streams: vec![stream.into()],
            group: "g".into(),
            consumer: "c".into(),
            claim_idle: Duration::from_secs(30),
            maxlen: 0,
            batch: 16,
            prefetch: 64,
            max_deliveries: 3,
            dead_stream: format!("{stream}:dead"),
            publish_timeout: Duration::from_secs(5),
            consume,
            leases: None,
        }
    }

    fn test_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn connecting_to_a_server_that_is_down_fails_naming_it() {
        let rt = test_runtime();
        let (tx, _rx) = std::sync::mpsc::channel();
        let cfg = config("redis://:pw@127.0.0.1:1/0", "s", true);
        let err = rt
            .block_on(RedisStreams::connect(
                cfg,
                Arc::new(Collect(tx)),
                rt.handle().clone(),
            ))
            .expect_err("nothing listens on port 1");
        let text = err.to_string();
        assert!(
            matches!(
                err,
                TransportError::Broker {
                    broker: "redis",
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("pw"), "{text}");
    }

    #[test]
    fn transports_run_on_the_runtime_they_are_given_and_stop_ends_only_their_own_tasks() {
        const URL: &str = "redis://127.0.0.1:6379/0";
        if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
            assert!(
                std::env::var("OXBUS_CI").as_deref() != Ok("1"),
                "OXBUS_CI=1 forbids skipping: Redis at 127.0.0.1:6379 is unreachable"
            );
            eprintln!("skipped: Redis at 127.0.0.1:6379 is unreachable");
            return;
        }
        let stream = format!("oxbus-test:rust:{}", uuid::Uuid::new_v4().simple());
        let rt = test_runtime();
        let h = rt.handle().clone();
        let (tx_a, rx_a) = std::sync::mpsc::channel();
        let (tx_b, rx_b) = std::sync::mpsc::channel();
        let a = rt
            .block_on(RedisStreams::connect(
                config(URL, &stream, true),
                Arc::new(Collect(tx_a)),
                h.clone(),
            ))
            .expect("connects");
        let b = rt
            .block_on(RedisStreams::connect(
                config(URL, &format!("{stream}:b"), false),
                Arc::new(Collect(tx_b)),
                h,
            ))
            .expect("connects");
        let wait = Duration::from_secs(10);
        a.queue(1, vec![(0, "{\"n\":1}".into())]).expect("queued");
        let mut got = (None, None);
        while got.0.is_none() || got.1.is_none() {
            match rx_a.recv_timeout(wait).expect("a result or an entry") {
                Ok(ids) => got.0 = Some(ids),
                Err(e) => got.1 = Some(e),
            }
        }
        let (ids, entry) = (got.0.unwrap(), got.1.unwrap());
        assert_eq!(ids, vec![entry.id.clone()]);
        assert_eq!(entry.payload, "{\"n\":1}");
        a.ack(&entry);
        rt.block_on(a.stop());
        assert!(a.is_stopped());
        assert_eq!(
            a.queue(2, vec![(0, "{}".into())]),
            Err(TransportError::Stopped("redis"))
        );
        rt.block_on(a.stop()); // idempotent
                               // The runtime and the other transport go on.
        b.queue(3, vec![(0, "{}".into())]).expect("queued");
        assert!(matches!(rx_b.recv_timeout(wait), Ok(Ok(ids)) if ids.len() == 1));
        rt.block_on(b.stop());
        let h = a.health();
        assert_eq!((h.published, h.received), (1, 1));
        drop((a, b));
        // Clean up the streams.
        rt.block_on(async {
            let client = Client::open(URL).expect("url");
            let mut c = connect(&client, None).await.expect("connects");
            let _: () = redis::cmd("DEL")
                .arg(&stream)
                .arg(format!("{stream}:b"))
                .query_async(&mut c)
                .await
                .expect("DEL");
        });
    }
}

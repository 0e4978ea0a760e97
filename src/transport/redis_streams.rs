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
//!
//! Here: the settings, the shared state and the handle. The tasks are in `publish`, `consume`
//! (reader and acker), `claim` (with the lease keeper's side) and `health`; the dead-letter
//! stream's admin in `dead`.

mod claim;
mod consume;
pub mod dead;
mod health;
mod publish;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::leases::{self, LeaseConfig, Table};
use super::{Failure, Health, Message, Outgoing, Sink, Stopping, Transport, TransportError};
use claim::{claimer, Keeper};
use consume::{acker, create_group, reader};
use health::health_reader;
use publish::publisher;

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

/// An acknowledgement for the acker, with the dead letter to write first, if any.
struct Settle {
    idx: usize,
    id: String,
    dead: Option<Box<(String, Vec<Failure>)>>,
}

#[cfg(test)]
mod tests;

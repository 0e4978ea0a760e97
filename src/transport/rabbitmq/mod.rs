//! A RabbitMQ transport (AMQP 0.9.1, `lapin` on the shared tokio runtime): events go to a
//! durable topic exchange with their type key as routing key, persistent, under publisher
//! confirms; each consumer group reads a durable quorum queue bound with its subscriptions'
//! patterns (ours are AMQP's), acknowledges after the bus finished a message, and lets the
//! broker count deliveries (`x-delivery-count`) and dead-letter a message delivered
//! `max_deliveries` times (`x-delivery-limit` into `<queue>.dead`).
//!
//! With `partitions = N` the group's queue is N queues fed by a consistent-hash exchange on
//! the event's key, each with a single active consumer: one key, one consumer at a time.
//!
//! Tasks, each with its own connection, reconnecting with a capped backoff: the publisher
//! (one confirm channel; every batch queued meanwhile is published, then its confirms awaited:
//! one wait for many publishes), the consumer (declares the topology, consumes, and settles on
//! the same channel: a delivery tag belongs to its channel, so the receipt `Message::id` is
//! `<generation>.<tag>`, and settles of an older connection are dropped: the broker has
//! requeued those messages already), and a health reader (passive declares every 2 s).
//!
//! Files: this one (settings, connecting, the [`Transport`]), `topology` (what is declared),
//! `publish` (messages and confirms), `consume` (deliveries, acknowledgements, dead letters
//! written, health), `dead` (the dead-letter queue read, retried and purged).

mod consume;
pub mod dead;
mod publish;
mod topology;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::{Failure, Health, Message, Outgoing, Sink, Stopping, Transport, TransportError};
pub use consume::Ledger;
use consume::{consumer, health_reader, Dead, Settle};
pub use publish::HASH_HEADER;
use publish::{publisher, Batch};
use topology::{add_bindings, bind, declare, declare_exchange};
pub use topology::{binding_keys, inspect};

const KIND: &str = "rabbitmq";

/// Settings of one transport.
#[derive(Debug, Clone)]
pub struct Config {
    /// `amqp://user:password@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The durable topic exchange events are published to.
    pub exchange: String,
    /// The consumer group.
    pub group: String,
    /// The group's queue (`<queue>.<i>` for each partition, `<queue>.dead` for dead letters).
    pub queue: String,
    /// Queues of the group, fed by a consistent-hash exchange when more than 1.
    pub partitions: usize,
    /// Binding keys of the group's queue at start (see [`binding_keys`]; more may be added
    /// while it runs: [`Transport::bind`]).
    pub bindings: Vec<String>,
    /// Messages delivered and not yet acknowledged, at most (`basic.qos`).
    pub prefetch: u16,
    /// Deliveries after which the broker dead-letters a message.
    pub max_deliveries: u32,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long a publish batch may retry before failing.
    pub publish_timeout: Duration,
    /// Whether to consume at all (a publish-only bus does not).
    pub consume: bool,
    /// The AMQP bridge: queues of other systems to consume as they are (nothing is declared:
    /// they must exist); `group`, `queue`, `bindings` and `exchange` are unused then.
    pub existing: Option<Vec<String>>,
}

impl Config {
    /// The group's queues: `queue`, or `<queue>.<i>` for each partition.
    pub fn queues(&self) -> Vec<String> {
        if let Some(queues) = &self.existing {
            return queues.clone();
        }
        if self.partitions <= 1 {
            vec![self.queue.clone()]
        } else {
            (0..self.partitions)
                .map(|i| format!("{}.{i}", self.queue))
                .collect()
        }
    }

    /// Where messages delivered too often, or refused, go.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
}

/// The URL with its password replaced by `***` (the user name stays).
pub fn redact(url: &str) -> String {
    let Some(s) = url.find("://").map(|s| s + 3) else {
        return url.to_owned();
    };
    let end = url[s..].find('/').map_or(url.len(), |i| s + i);
    match url[s..end].rfind('@') {
        Some(at) => {
            let userinfo = &url[s..s + at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            format!("{}{user}{masked}{}", &url[..s], &url[s + at..])
        }
        None => url.to_owned(),
    }
}

struct Shared {
    cfg: Config,
    safe_url: String,
    stop: AtomicBool,
    paused: AtomicBool,
    wake: Notify,
    generation: AtomicU64,
    acks_queued: AtomicUsize,
    health: Mutex<Health>,
    /// The group's binding keys: those of the start and those added since (declared anew
    /// on every connection).
    bindings: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, message: impl std::fmt::Display) -> TransportError {
        TransportError::Broker {
            broker: KIND,
            url: self.safe_url.clone(),
            message: message.to_string(),
        }
    }

    fn note(&self, ok: bool, err: Option<String>) {
        let mut h = self.health.lock();
        h.reachable = ok;
        if err.is_some() {
            h.last_error = err;
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sleeps `d`, or less when the transport stops.
    async fn nap(&self, d: Duration) {
        let woken = self.wake.notified();
        if !self.stopping() {
            let _ = tokio::time::timeout(d, woken).await;
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}

fn short(s: &str) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

/// Connects within `connect_timeout`; errors name the broker, never the password.
async fn open(shared: &Shared) -> Result<Connection, TransportError> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("oxbus {} {}", shared.cfg.group, std::process::id()).into());
    match tokio::time::timeout(
        shared.cfg.connect_timeout,
        Connection::connect(&shared.cfg.url, props),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(shared.error(e)),
        Err(_) => Err(shared.error(format!(
            "no connection within connect_timeout ({:.1}s)",
            shared.cfg.connect_timeout.as_secs_f64()
        ))),
    }
}

/// A running RabbitMQ transport.
pub struct RabbitMq {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub_tx: mpsc::UnboundedSender<(u64, Batch)>,
    settle_tx: mpsc::UnboundedSender<Settle>,
}

impl std::fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMq")
            .field("url", &self.shared.safe_url)
            .finish_non_exhaustive()
    }
}

impl RabbitMq {
    /// Checks the settings, connects once and declares the topology (so a wrong URL, wrong
    /// credentials or a missing plugin fail here, clearly, within `connect_timeout`), then
    /// starts the tasks on `runtime`.
    pub async fn connect(
        cfg: Config,
        sink: Arc<dyn Sink>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, TransportError> {
        let bridge = cfg.existing.is_some();
        if !bridge && (cfg.group.is_empty() || cfg.exchange.is_empty() || cfg.queue.is_empty()) {
            return Err(TransportError::Invalid(
                "group, exchange and queue must not be empty".into(),
            ));
        }
        let safe_url = redact(&cfg.url);
        cfg.url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            TransportError::Invalid(format!("invalid RabbitMQ URL {safe_url}: {e}"))
        })?;
        let names = [("exchange", &cfg.exchange), ("queue", &cfg.queue)];
        for (what, name) in names
            .into_iter()
            .chain(cfg.existing.iter().flatten().map(|q| ("queue", q)))
        {
            if name.len() > 200 {
                return Err(TransportError::Invalid(format!(
                    "the {what} name must have at most 200 bytes, got {}: {name:.40}...",
                    name.len()
                )));
            }
        }
        super::redis_streams::ensure_tls();
        let shared = Arc::new(Shared {
            bindings: Mutex::new(cfg.bindings.clone()),
            cfg,
            safe_url,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            wake: Notify::new(),
            generation: AtomicU64::new(0),
            acks_queued: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
        });
        let setup = Arc::clone(&shared);
        let first = runtime
            .spawn(async move {
                let conn = open(&setup).await?;
                let ch = conn.create_channel().await.map_err(|e| setup.error(e))?;
                if setup.cfg.consume {
                    declare(&setup, &ch)
                        .await
                        .map_err(|e| setup.error(hint(&e)))?;
                    return Ok::<_, TransportError>((Some(conn), None));
                }
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| setup.error(e))?;
                if !setup.cfg.exchange.is_empty() {
                    declare_exchange(&setup, &ch)
                        .await
                        .map_err(|e| setup.error(e))?;
                }
                Ok((None, Some((conn, ch))))
            })
            .await
            .map_err(|_| TransportError::Stopped(KIND))??;
        shared.note(true, None);
        let (pub_tx, pub_rx) = mpsc::unbounded_channel();
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let (consuming, publishing) = first;
        let mut tasks = vec![runtime.spawn(publisher(
            Arc::clone(&shared),
            publishing,
            pub_rx,
            Arc::clone(&sink),
        ))];
        tasks.push(runtime.spawn(health_reader(Arc::clone(&shared))));
        if shared.cfg.consume {
            tasks.push(runtime.spawn(consumer(Arc::clone(&shared), consuming, settle_rx, sink)));
        }
        Ok(Self {
            shared,
            tasks: Mutex::new(tasks),
            pub_tx,
            settle_tx,
        })
    }

    /// Queues a plain message (the AMQP bridge): `body` to `exchange` with `routing_key`,
    /// persistent, as JSON; its confirm reaches [`Sink::confirmed`] under `token`.
    ///
    /// # Errors
    /// [`TransportError::Stopped`] after `stop`.
    pub fn publish_raw(
        &self,
        token: u64,
        exchange: String,
        routing_key: String,
        body: String,
    ) -> Result<(), TransportError> {
        self.queue(
            token,
            Batch::Raw {
                exchange,
                routing_key,
                body,
            },
        )
    }

    fn queue(&self, token: u64, batch: Batch) -> Result<(), TransportError> {
        if self.shared.stopping() {
            return Err(TransportError::Stopped(KIND));
        }
        self.pub_tx
            .send((token, batch))
            .map_err(|_| TransportError::Stopped(KIND))
    }

    fn settle(&self, message: &Message, dead: Option<Box<Dead>>) {
        let Some((generation, tag)) = message
            .id
            .split_once('.')
            .and_then(|(g, t)| Some((g.parse().ok()?, t.parse().ok()?)))
        else {
            return;
        };
        self.shared.acks_queued.fetch_add(1, Ordering::AcqRel);
        let s = Settle {
            generation,
            tag,
            dead,
        };
        if self.settle_tx.send(s).is_err() {
            self.shared.acks_queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn halt(&self) -> Vec<JoinHandle<()>> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_waiters();
        std::mem::take(&mut *self.tasks.lock())
    }
}

/// A missing consistent-hash plugin says so.
fn hint(e: &lapin::Error) -> String {
    let text = e.to_string();
    if text.contains("x-consistent-hash") || text.contains("invalid exchange type") {
        format!(
            "{text} (partitions > 1 need the consistent-hash exchange: \
             rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)"
        )
    } else {
        text
    }
}

impl Transport for RabbitMq {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn group(&self) -> &str {
        self.shared.cfg.group.as_str()
    }

    /// The batch goes to the publisher task as it is: encoding happens there, off the
    /// caller's thread.
    fn publish(&self, token: u64, batch: Vec<Outgoing>) -> Result<(), TransportError> {
        self.queue(token, Batch::Events(batch))
    }

    fn ack(&self, message: &Message) {
        self.settle(message, None);
    }

    /// To `<queue>.dead`, one message per failure with its fields as headers (confirmed),
    /// then acknowledged.
    fn dead_letter(&self, message: Message, failures: Vec<Failure>) {
        let dead = Box::new(Dead {
            source: message.source.clone(),
            payload: message.payload.clone(),
            failures,
        });
        self.settle(&message, Some(dead));
    }

    fn pause(&self) {
        self.shared.paused.store(true, Ordering::Release);
        self.shared.wake.notify_waiters();
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

    /// Waits up to 2 s for the acknowledgements still queued, then closes the connections
    /// (the broker requeues whatever is still unacknowledged).
    fn stop(&self) -> Stopping<'_> {
        Box::pin(async move {
            self.pause();
            self.flush().await;
            for mut t in self.halt() {
                // Tasks close their connections as they end; a broker that does not answer
                // the close does not hold the bus.
                if tokio::time::timeout(Duration::from_secs(3), &mut t)
                    .await
                    .is_err()
                {
                    t.abort();
                    let _ = t.await;
                }
            }
        })
    }

    fn is_stopped(&self) -> bool {
        self.shared.stopping()
    }

    /// The keys not bound yet are remembered (every later connection declares them) and
    /// queued to the publisher: bound before anything this transport publishes afterwards.
    fn bind(&self, token: u64, patterns: Vec<String>) -> Result<bool, TransportError> {
        if !self.shared.cfg.consume || self.shared.cfg.existing.is_some() {
            return Err(TransportError::Invalid(format!(
                "this RabbitMQ transport does not read the group {:?}: nothing to bind",
                self.shared.cfg.group
            )));
        }
        let added = add_bindings(&mut self.shared.bindings.lock(), patterns)?;
        if added.is_empty() {
            return Ok(false);
        }
        self.queue(token, Batch::Bind(added))?;
        Ok(true)
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        for t in self.halt() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqps://u@h/v"), "amqps://u@h/v");
        assert_eq!(redact("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(redact("amqp://a:b@c@h/x@y"), "amqp://a:***@h/x@y");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn queues_of_a_partitioned_group_are_numbered() {
        let cfg = Config {
            url: "amqp://h".into(),
            exchange: "x".into(),
            group: "g".into(),
            queue: "x.g".into(),
            partitions: 3,
            bindings: vec!["#".into()],
            prefetch: 10,
            max_deliveries: 5,
            connect_timeout: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(1),
            consume: true,
            existing: None,
        };
        assert_eq!(cfg.queues(), vec!["x.g.0", "x.g.1", "x.g.2"]);
        assert_eq!(cfg.dead_queue(), "x.g.dead");
        assert_eq!(
            Config {
                partitions: 1,
                ..cfg.clone()
            }
            .queues(),
            vec!["x.g"]
        );
        let bridge = Config {
            existing: Some(vec!["in.a".into(), "in.b".into()]),
            ..cfg
        };
        assert_eq!(bridge.queues(), vec!["in.a", "in.b"]);
    }
}

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

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::{Health, Message, Outgoing, Sink, Stopping, Transport, TransportError};

const KIND: &str = "rabbitmq";
/// The header the consistent-hash exchange hashes: the event's key, else its id.
pub const HASH_HEADER: &str = "x-oxbus-hash";

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
    /// Binding keys of the group's queue (see [`binding_keys`]).
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
}

impl Config {
    /// The group's queues: `queue`, or `<queue>.<i>` for each partition.
    pub fn queues(&self) -> Vec<String> {
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

/// The binding keys for a group's subscriptions: each pattern as it is (our patterns are
/// AMQP's), once, sorted; just `#` when one of them is `#` (it takes everything).
///
/// # Errors
/// An empty key, or one longer than AMQP's 255 bytes, naming it.
pub fn binding_keys<I: IntoIterator<Item = String>>(
    patterns: I,
) -> Result<Vec<String>, TransportError> {
    let mut keys = BTreeSet::new();
    for p in patterns {
        if p.is_empty() || p.len() > 255 {
            return Err(TransportError::Invalid(format!(
                "cannot bind a RabbitMQ queue with {p:?}: a binding key has 1 to 255 bytes"
            )));
        }
        keys.insert(p);
    }
    if keys.contains("#") {
        return Ok(vec!["#".to_owned()]);
    }
    Ok(keys.into_iter().collect())
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

/// A settle request for the consumer task: the receipt, and a dead letter to write first.
struct Settle {
    generation: u64,
    tag: u64,
    dead: Option<Box<(String, String, String)>>, // (source, payload, reason)
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

async fn declare_exchange(shared: &Shared, ch: &Channel) -> lapin::Result<()> {
    ch.exchange_declare(
        shared.cfg.exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

/// The group's topology, declared anew on every connection (a restarted broker keeps the
/// durable parts; declaring is idempotent).
async fn declare_group(shared: &Shared, ch: &Channel) -> lapin::Result<()> {
    let cfg = &shared.cfg;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    declare_exchange(shared, ch).await?;
    let dead = cfg.dead_queue();
    ch.queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(cfg.max_deliveries.saturating_sub(1))),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let source = if cfg.partitions > 1 {
        let hash = format!("{}.hash", cfg.queue);
        let mut hargs = FieldTable::default();
        hargs.insert(
            "hash-header".into(),
            AMQPValue::LongString(HASH_HEADER.into()),
        );
        ch.exchange_declare(
            hash.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            hargs,
        )
        .await?;
        for key in &cfg.bindings {
            ch.exchange_bind(
                hash.as_str().into(),
                cfg.exchange.as_str().into(),
                key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        Some(hash)
    } else {
        None
    };
    for q in cfg.queues() {
        ch.queue_declare(q.as_str().into(), durable, args.clone())
            .await?;
        match &source {
            Some(hash) => {
                ch.queue_bind(
                    q.as_str().into(),
                    hash.as_str().into(),
                    "1".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            None => {
                for key in &cfg.bindings {
                    ch.queue_bind(
                        q.as_str().into(),
                        cfg.exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

/// A running RabbitMQ transport.
pub struct RabbitMq {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub_tx: mpsc::UnboundedSender<(u64, Vec<Outgoing>)>,
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
        if cfg.group.is_empty() || cfg.exchange.is_empty() || cfg.queue.is_empty() {
            return Err(TransportError::Invalid(
                "group, exchange and queue must not be empty".into(),
            ));
        }
        if cfg.consume && cfg.bindings.is_empty() {
            return Err(TransportError::Invalid(
                "a consuming RabbitMQ transport needs at least one binding key".into(),
            ));
        }
        let safe_url = redact(&cfg.url);
        cfg.url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            TransportError::Invalid(format!("invalid RabbitMQ URL {safe_url}: {e}"))
        })?;
        for (what, name) in [("exchange", &cfg.exchange), ("queue", &cfg.queue)] {
            if name.len() > 200 {
                return Err(TransportError::Invalid(format!(
                    "the {what} name must have at most 200 bytes, got {}: {name:.40}...",
                    name.len()
                )));
            }
        }
        super::redis_streams::ensure_tls();
        let shared = Arc::new(Shared {
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
                    declare_group(&setup, &ch)
                        .await
                        .map_err(|e| setup.error(hint(&e)))?;
                    return Ok::<_, TransportError>((Some(conn), None));
                }
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| setup.error(e))?;
                declare_exchange(&setup, &ch)
                    .await
                    .map_err(|e| setup.error(e))?;
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

    fn settle(&self, message: &Message, dead: Option<Box<(String, String, String)>>) {
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

    /// The batch goes to the publisher task as it is: encoding happens there, off the
    /// caller's thread.
    fn publish(&self, token: u64, batch: Vec<Outgoing>) -> Result<(), TransportError> {
        if self.shared.stopping() {
            return Err(TransportError::Stopped(KIND));
        }
        self.pub_tx
            .send((token, batch))
            .map_err(|_| TransportError::Stopped(KIND))
    }

    fn ack(&self, message: &Message) {
        self.settle(message, None);
    }

    /// To `<queue>.dead` with the reason (confirmed), then acknowledged.
    fn dead_letter(&self, message: Message, reason: String) {
        let dead = Box::new((message.source.clone(), message.payload.clone(), reason));
        self.settle(&message, Some(dead));
    }

    fn pause(&self) {
        self.shared.paused.store(true, Ordering::Release);
        self.shared.wake.notify_waiters();
    }

    fn health(&self) -> Health {
        self.shared.health.lock().clone()
    }

    /// Waits up to 2 s for the acknowledgements still queued, then closes the connections
    /// (the broker requeues whatever is still unacknowledged).
    fn stop(&self) -> Stopping<'_> {
        Box::pin(async move {
            self.pause();
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.shared.acks_queued.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
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
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        for t in self.halt() {
            t.abort();
        }
    }
}

/// Correlation and causation out of an event's metadata.
#[derive(Deserialize, Default)]
struct Meta {
    correlation_id: Option<String>,
    causation_id: Option<String>,
}

/// One event as an AMQP message: routing key, properties, body.
fn message_of(o: &Outgoing) -> Result<(ShortString, BasicProperties, Vec<u8>), TransportError> {
    let e = &o.event;
    let routing_key = short(&e.event_type).ok_or_else(|| {
        TransportError::Invalid(format!(
            "the type key of event {} is longer than AMQP's 255 bytes: {:.60}...",
            e.event_id, e.event_type
        ))
    })?;
    let body = o.payload()?.into_bytes();
    let meta: Meta = serde_json::from_str(&e.metadata).unwrap_or_default();
    let mut headers = FieldTable::default();
    headers.insert(
        "event_version".into(),
        AMQPValue::LongLongInt(e.event_version),
    );
    if let Some(c) = &meta.causation_id {
        headers.insert(
            "causation_id".into(),
            AMQPValue::LongString(c.as_str().into()),
        );
    }
    if let Some(k) = &o.key {
        headers.insert("key".into(), AMQPValue::LongString(k.as_str().into()));
    }
    let hash: &str = o.key.as_deref().unwrap_or(&e.event_id);
    headers.insert(
        HASH_HEADER.into(),
        AMQPValue::LongString(LongString::from(hash)),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(now)
        .with_headers(headers);
    if let Some(t) = short(&e.event_type) {
        props = props.with_type(t);
    }
    if let Some(id) = short(&e.event_id) {
        props = props.with_message_id(id);
    }
    if let Some(c) = meta.correlation_id.as_deref().and_then(short) {
        props = props.with_correlation_id(c);
    }
    Ok((routing_key, props, body))
}

/// Publishes every batch queued, then waits for their confirms (one wait for all).
async fn publisher(
    shared: Arc<Shared>,
    mut conn: Option<(Connection, Channel)>,
    mut rx: mpsc::UnboundedReceiver<(u64, Vec<Outgoing>)>,
    sink: Arc<dyn Sink>,
) {
    loop {
        let woken = shared.wake.notified();
        if shared.stopping() {
            break;
        }
        let first = tokio::select! {
            m = rx.recv() => m,
            () = woken => continue,
        };
        let Some(first) = first else { break };
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
        // Encode; a token whose events cannot be encoded fails alone.
        let mut results = Vec::with_capacity(batch.len());
        let mut ready = Vec::with_capacity(batch.len());
        for (token, events) in batch {
            match events.iter().map(message_of).collect::<Result<Vec<_>, _>>() {
                Ok(msgs) => {
                    let ids = events.iter().map(|o| o.event.event_id.clone()).collect();
                    ready.push((token, msgs, ids));
                }
                Err(e) => results.push((token, Err(e))),
            }
        }
        if !ready.is_empty() {
            let outcome = publish_round(&shared, &mut conn, &ready).await;
            if outcome.is_ok() {
                let count = ready.iter().map(|(_, m, _)| m.len() as u64).sum::<u64>();
                shared.health.lock().published += count;
            }
            for (token, _, ids) in ready {
                results.push((token, outcome.clone().map(|()| ids)));
            }
        }
        sink.confirmed(results);
    }
    if let Some((c, _)) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.close(200, "bye".into())).await;
    }
}

type Ready = (
    u64,
    Vec<(ShortString, BasicProperties, Vec<u8>)>,
    Vec<String>,
);

/// One round of publishes and their confirms, retried on a new connection until
/// `publish_timeout` (at least once: a retried round may publish some events twice).
async fn publish_round(
    shared: &Shared,
    conn: &mut Option<(Connection, Channel)>,
    ready: &[Ready],
) -> Result<(), TransportError> {
    let deadline = Instant::now() + shared.cfg.publish_timeout;
    let exchange: ShortString = shared.cfg.exchange.as_str().into();
    let mut attempt = 0;
    loop {
        let round = async {
            if conn.is_none() {
                let c = open(shared).await?;
                let ch = c.create_channel().await.map_err(|e| shared.error(e))?;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| shared.error(e))?;
                declare_exchange(shared, &ch)
                    .await
                    .map_err(|e| shared.error(e))?;
                *conn = Some((c, ch));
            }
            let (_, ch) = conn.as_ref().expect("connected above");
            let mut confirms = Vec::new();
            for (_, msgs, _) in ready {
                for (key, props, body) in msgs {
                    let c = ch
                        .basic_publish(
                            exchange.clone(),
                            key.clone(),
                            BasicPublishOptions::default(),
                            body,
                            props.clone(),
                        )
                        .await
                        .map_err(|e| shared.error(e))?;
                    confirms.push(c);
                }
            }
            for c in confirms {
                let confirmation = c.await.map_err(|e| shared.error(e))?;
                if confirmation.is_nack() {
                    return Err(shared.error("the broker refused a message (basic.nack)"));
                }
            }
            Ok::<(), TransportError>(())
        };
        // Every step is bounded: a broker that accepts the connection and then does not
        // answer (starting up, blocked) fails the round at the deadline, never hangs it.
        let left = deadline.saturating_duration_since(Instant::now());
        let tried = tokio::time::timeout(left.max(Duration::from_millis(100)), round)
            .await
            .unwrap_or_else(|_| {
                Err(shared.error(format!(
                    "no publisher confirm within publish_timeout ({:.1}s)",
                    shared.cfg.publish_timeout.as_secs_f64()
                )))
            });
        match tried {
            Ok(()) => {
                shared.note(true, None);
                return Ok(());
            }
            Err(e) => {
                shared.note(false, Some(e.to_string()));
                *conn = None;
                if Instant::now() >= deadline || shared.stopping() {
                    return Err(e);
                }
                shared.nap(backoff(attempt)).await;
                attempt += 1;
            }
        }
    }
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
    declare_group(shared, &ch).await.map_err(err)?;
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
async fn consumer(
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
                let (source, payload, reason) = *d;
                let mut headers = FieldTable::default();
                headers.insert(
                    "error".into(),
                    AMQPValue::LongString(reason.as_str().into()),
                );
                headers.insert(
                    "queue".into(),
                    AMQPValue::LongString(source.as_str().into()),
                );
                headers.insert(
                    "group".into(),
                    AMQPValue::LongString(shared.cfg.group.as_str().into()),
                );
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_headers(headers);
                let confirm = dead_ch
                    .basic_publish(
                        "".into(),
                        dead_queue.clone(),
                        BasicPublishOptions::default(),
                        payload.as_bytes(),
                        props,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                if !confirm.await.map_err(|e| e.to_string())?.is_ack() {
                    return Err("the broker refused a dead letter".to_owned());
                }
                dead += 1;
            }
            tags.push(s.tag);
        }
        for (tag, multiple) in ledger.settle(&tags) {
            ch.basic_ack(tag, BasicAckOptions { multiple })
                .await
                .map_err(|e| e.to_string())?;
        }
        shared.health.lock().dead += dead;
        Ok(())
    }
    .await;
    shared.acks_queued.fetch_sub(total, Ordering::AcqRel);
    result
}

/// Reads the depth of the group's queues every 2 s (passive declares, one small command
/// each; no busy loop).
async fn health_reader(shared: Arc<Shared>) {
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
    fn binding_keys_are_the_patterns_once_and_hash_takes_all() {
        let keys = |v: &[&str]| binding_keys(v.iter().map(|s| (*s).to_owned()));
        assert_eq!(
            keys(&["order.*", "OrderPlaced", "order.*"]).unwrap(),
            vec!["OrderPlaced", "order.*"]
        );
        assert_eq!(keys(&["a.#", "#", "b"]).unwrap(), vec!["#"]);
        assert!(keys(&[]).unwrap().is_empty());
        let err = keys(&[""]).unwrap_err().to_string();
        assert!(err.contains("\"\""), "{err}");
        let long = "x".repeat(256);
        assert!(keys(&[long.as_str()])
            .unwrap_err()
            .to_string()
            .contains("255"));
    }

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

    fn outgoing(key: Option<&str>, event_type: &str) -> Outgoing {
        Outgoing {
            event: super::super::NewEvent {
                event_id: "e-1".into(),
                event_type: event_type.into(),
                event_version: 3,
                data: r#"{"n":1}"#.into(),
                metadata: r#"{"correlation_id":"c-1","causation_id":"e-0"}"#.into(),
                occurred_at: None,
            },
            key: key.map(Into::into),
        }
    }

    #[test]
    fn a_message_carries_the_type_key_as_routing_key_and_identity_in_properties() {
        let (rk, props, body) = message_of(&outgoing(Some("o-1"), "order.placed")).unwrap();
        assert_eq!(rk.as_str(), "order.placed");
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(
            props.message_id().as_ref().map(ShortString::as_str),
            Some("e-1")
        );
        assert_eq!(
            props.correlation_id().as_ref().map(ShortString::as_str),
            Some("c-1")
        );
        let h = props.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("key"), Some(&AMQPValue::LongString("o-1".into())));
        assert_eq!(
            h.get(HASH_HEADER),
            Some(&AMQPValue::LongString("o-1".into()))
        );
        assert_eq!(
            h.get("causation_id"),
            Some(&AMQPValue::LongString("e-0".into()))
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event_type"], "order.placed");
        // Without a key, the event id spreads the partitions.
        let (_, props, _) = message_of(&outgoing(None, "x")).unwrap();
        let h = props.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get(HASH_HEADER),
            Some(&AMQPValue::LongString("e-1".into()))
        );
        assert!(h.get("key").is_none());
    }

    #[test]
    fn a_type_key_too_long_for_a_routing_key_is_an_error_naming_the_event() {
        let err = message_of(&outgoing(None, &"t".repeat(300))).unwrap_err();
        assert!(err.to_string().contains("event e-1"), "{err}");
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
        };
        assert_eq!(cfg.queues(), vec!["x.g.0", "x.g.1", "x.g.2"]);
        assert_eq!(cfg.dead_queue(), "x.g.dead");
        assert_eq!(
            Config {
                partitions: 1,
                ..cfg
            }
            .queues(),
            vec!["x.g"]
        );
    }
}

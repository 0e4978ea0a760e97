//! A bridge to plain Redis Pub/Sub channels: messages on subscribed channels come in (in
//! batches), and `PUBLISH`es go out pipelined. Reconnects on its own; messages published while
//! it is disconnected are lost by Redis Pub/Sub's nature (at most once), which the docs say.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use redis::Client;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::transport::redis_streams::redact;
use crate::transport::TransportError;

/// Receives incoming messages, a batch at a time, on the bridge's thread.
pub trait ChannelSink: Send + Sync + 'static {
    /// (channel, payload) pairs in arrival order.
    fn messages(&self, messages: Vec<(String, String)>);
}

/// A running bridge; its tasks run on the tokio runtime whose handle it is given.
pub struct Bridge {
    tasks: Mutex<Vec<JoinHandle<()>>>,
    out: mpsc::UnboundedSender<(String, String)>,
    stop: Arc<(AtomicBool, Notify)>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").finish_non_exhaustive()
    }
}

impl Bridge {
    /// Connects (so a wrong URL or a down server fails here), subscribes, starts the tasks
    /// on `runtime`.
    pub async fn start(
        url: &str,
        channels: Vec<String>,
        sink: Arc<dyn ChannelSink>,
        runtime: Handle,
    ) -> Result<Self, TransportError> {
        let safe = redact(url);
        crate::transport::redis_streams::ensure_tls();
        let client = Client::open(url)
            .map_err(|e| TransportError::Invalid(format!("invalid Redis URL {safe}: {e}")))?;
        let err = move |e: redis::RedisError| TransportError::Broker {
            broker: "redis",
            url: safe.clone(),
            message: e.to_string(),
        };
        let (setup_client, setup_channels) = (client.clone(), channels.clone());
        let setup = async move {
            let (client, channels) = (setup_client, setup_channels);
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)));
            let conn = client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(&err)?;
            let mut pubsub = client.get_async_pubsub().await.map_err(&err)?;
            for c in &channels {
                pubsub.subscribe(c).await.map_err(&err)?;
            }
            Ok::<_, TransportError>((conn, pubsub))
        };
        // On the runtime: the connections' driver tasks live there.
        let (conn, pubsub) = runtime
            .spawn(setup)
            .await
            .map_err(|_| TransportError::Stopped("redis"))??;
        let stop = Arc::new((AtomicBool::new(false), Notify::new()));
        let (out, mut rx) = mpsc::unbounded_channel::<(String, String)>();
        let mut conn_out = conn;
        let mut tasks = vec![runtime.spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut pipe = redis::pipe();
                pipe.cmd("PUBLISH").arg(&first.0).arg(&first.1).ignore();
                while let Ok((c, p)) = rx.try_recv() {
                    pipe.cmd("PUBLISH").arg(c).arg(p).ignore();
                }
                // Pub/Sub is at most once: a failed PUBLISH is dropped after one retry.
                if pipe.query_async::<()>(&mut conn_out).await.is_err() {
                    let _ = pipe.query_async::<()>(&mut conn_out).await;
                }
            }
        })];
        let stop_in = Arc::clone(&stop);
        tasks.push(runtime.spawn(async move {
            let mut pubsub = Some(pubsub);
            while !stop_in.0.load(Ordering::Acquire) {
                let mut ps = if let Some(ps) = pubsub.take() {
                    ps
                } else {
                    let Ok(mut ps) = client.get_async_pubsub().await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let mut ok = true;
                    for c in &channels {
                        ok &= ps.subscribe(c).await.is_ok();
                    }
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    ps
                };
                let mut stream = ps.on_message();
                loop {
                    let next = tokio::select! {
                        m = stream.next() => m,
                        () = stop_in.1.notified() => return,
                    };
                    let Some(first) = next else { break };
                    let mut batch = vec![first];
                    while let Some(Some(m)) = stream.next().now_or_never() {
                        batch.push(m);
                        if batch.len() >= 1024 {
                            break;
                        }
                    }
                    let messages = batch
                        .iter()
                        .map(|m| {
                            let payload =
                                String::from_utf8_lossy(m.get_payload_bytes()).into_owned();
                            (m.get_channel_name().to_owned(), payload)
                        })
                        .collect();
                    sink.messages(messages);
                }
            }
        }));
        Ok(Self {
            tasks: Mutex::new(tasks),
            out,
            stop,
        })
    }

    /// Queues a `PUBLISH`.
    pub fn publish(&self, channel: String, payload: String) -> Result<(), TransportError> {
        if self.stop.0.load(Ordering::Acquire) {
            return Err(TransportError::Stopped("redis"));
        }
        self.out
            .send((channel, payload))
            .map_err(|_| TransportError::Stopped("redis"))
    }

    /// Ends the tasks and waits until they are gone (the sink is called no more). Idempotent.
    pub async fn stop(&self) {
        for t in self.halt() {
            let _ = t.await;
        }
    }

    /// Marks the bridge stopped and cancels its tasks (at their next await); returns them.
    fn halt(&self) -> Vec<JoinHandle<()>> {
        self.stop.0.store(true, Ordering::Release);
        self.stop.1.notify_waiters();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in &tasks {
            t.abort();
        }
        tasks
    }
}

impl Drop for Bridge {
    /// Cancels the tasks without waiting.
    fn drop(&mut self) {
        self.halt();
    }
}

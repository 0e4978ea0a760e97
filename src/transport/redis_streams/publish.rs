//! Publishing: the publisher task, pipelined `XADD`s of every request queued meanwhile, one
//! result per request, retried with a backoff until `publish_timeout`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::Client;
use tokio::sync::mpsc;

use super::{backoff, connect, Shared};
use crate::transport::{Sink, TransportError};

pub(super) async fn publisher(
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

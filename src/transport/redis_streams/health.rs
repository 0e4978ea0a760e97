//! The health reader: lag and pending of the group (`XINFO GROUPS`) every few seconds.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Client, Value};

use super::{connect, Shared};

/// Reads lag and pending of the group every few seconds (not a busy loop: one small command).
pub(super) async fn health_reader(
    shared: Arc<Shared>,
    client: Client,
    mut conn: MultiplexedConnection,
) {
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

//! What a group needs on the broker, declared anew on every connection: the topic exchange,
//! the dead-letter queue, the group's quorum queue(s) and their bindings (through a
//! consistent-hash exchange with partitions).

use std::collections::BTreeSet;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::{publish::HASH_HEADER, Shared};
use crate::transport::TransportError;

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

/// Adds the keys of `patterns` to `bound` (a group's binding keys) -> those not bound yet
/// (none once `#` is: it takes everything). Bindings are never removed: other members of
/// the group share the queue and may need them.
///
/// # Errors
/// A pattern that cannot be a binding key (see [`binding_keys`]); `bound` is unchanged.
pub fn add_bindings(
    bound: &mut Vec<String>,
    patterns: Vec<String>,
) -> Result<Vec<String>, TransportError> {
    let keys = binding_keys(patterns)?;
    if bound.iter().any(|k| k == "#") {
        return Ok(Vec::new());
    }
    let added: Vec<String> = keys.into_iter().filter(|k| !bound.contains(k)).collect();
    if !added.is_empty() {
        *bound = binding_keys(bound.iter().chain(&added).cloned())?;
    }
    Ok(added)
}

pub(super) async fn declare_exchange(shared: &Shared, ch: &Channel) -> lapin::Result<()> {
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
/// What the broker holds of some queues (for `oxbus health amqp://...`): per queue, its ready
/// messages and consumers, or `None` when it does not exist. Passive declares: nothing is
/// created or changed. The whole reading is bounded by `timeout`.
///
/// # Errors
/// The broker cannot be reached (or does not answer within `timeout`), naming it.
pub async fn inspect(
    url: &str,
    queues: &[String],
    timeout: std::time::Duration,
) -> Result<Vec<Option<(u32, u32)>>, TransportError> {
    let broker = |message: String| TransportError::Broker {
        broker: "rabbitmq",
        url: super::redact(url),
        message,
    };
    let read = async {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| broker(e.to_string()))?;
        let mut out = Vec::with_capacity(queues.len());
        let mut ch = None;
        for q in queues {
            if ch.is_none() {
                ch = Some(
                    conn.create_channel()
                        .await
                        .map_err(|e| broker(e.to_string()))?,
                );
            }
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let Some(c) = &ch else { continue };
            match c
                .queue_declare(q.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(info) => out.push(Some((info.message_count(), info.consumer_count()))),
                Err(e) if e.to_string().contains("NOT_FOUND") => {
                    out.push(None);
                    ch = None; // a 404 closes the channel
                }
                Err(e) => return Err(broker(e.to_string())),
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        Ok(out)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(broker(format!(
                "no answer within {:.1}s",
                timeout.as_secs_f64()
            )))
        })
}

/// What a consumer needs: the group's topology, or (the bridge) that the queues of other
/// systems exist (passive declares: nothing is created or changed).
pub(super) async fn declare(shared: &Shared, ch: &Channel) -> lapin::Result<()> {
    let Some(existing) = &shared.cfg.existing else {
        return declare_group(shared, ch).await;
    };
    for q in existing {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await?;
    }
    Ok(())
}

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
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        Some(hash)
    } else {
        None
    };
    for q in cfg.queues() {
        ch.queue_declare(q.as_str().into(), durable, args.clone())
            .await?;
        if let Some(hash) = &source {
            ch.queue_bind(
                q.as_str().into(),
                hash.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }
    // Bound once the queues exist; the keys added since start (see `RabbitMq::bind`) too.
    let keys = shared.bindings.lock().clone();
    for key in &keys {
        bind(shared, ch, key).await?;
    }
    Ok(())
}

/// Routes `key` to the group: its queue bound with it, or with partitions the exchange that
/// feeds the consistent-hash exchange (which spreads to every partition queue).
pub(super) async fn bind(shared: &Shared, ch: &Channel, key: &str) -> lapin::Result<()> {
    let cfg = &shared.cfg;
    if cfg.partitions > 1 {
        ch.exchange_bind(
            format!("{}.hash", cfg.queue).as_str().into(),
            cfg.exchange.as_str().into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
    } else {
        ch.queue_bind(
            cfg.queue.as_str().into(),
            cfg.exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn added_bindings_are_the_new_keys_only_and_hash_ends_them() {
        let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut bound = v(&["a.*"]);
        assert_eq!(
            add_bindings(&mut bound, v(&["a.*", "b"])).unwrap(),
            v(&["b"])
        );
        assert_eq!(bound, v(&["a.*", "b"]));
        assert!(add_bindings(&mut bound, v(&["b"])).unwrap().is_empty());
        assert!(add_bindings(&mut bound, v(&[""])).is_err());
        assert_eq!(bound, v(&["a.*", "b"]));
        assert_eq!(add_bindings(&mut bound, v(&["c", "#"])).unwrap(), v(&["#"]));
        assert_eq!(bound, v(&["#"]));
        assert!(add_bindings(&mut bound, v(&["d"])).unwrap().is_empty());
        let mut none = Vec::new();
        assert_eq!(add_bindings(&mut none, v(&["x"])).unwrap(), v(&["x"]));
    }
}

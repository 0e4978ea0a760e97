//! Publishing: an event as an AMQP message (routing key, properties, headers, body), and the
//! publisher task (one confirm channel; every batch queued meanwhile is published, then its
//! confirms awaited: one wait for many publishes).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{backoff, bind, declare_exchange, open, short, Shared};
use crate::transport::{Outgoing, Sink, TransportError};

/// The header the consistent-hash exchange hashes: the event's key, else its id.
pub const HASH_HEADER: &str = "x-oxbus-hash";

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
        headers.insert("key".into(), AMQPValue::LongString(k.text.as_str().into()));
    }
    let hash: &str = o.key.as_ref().map_or(&e.event_id, |k| &k.text);
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

/// What one publish token carries: events, or one plain message of the AMQP bridge.
pub(crate) enum Batch {
    /// Events for the bus's exchange.
    Events(Vec<Outgoing>),
    /// A JSON body for any exchange and routing key.
    Raw {
        exchange: String,
        routing_key: String,
        body: String,
    },
    /// Binding keys to add to the group's queue(s), before any later batch is published.
    Bind(Vec<String>),
}

impl Batch {
    fn len(&self) -> usize {
        match self {
            Self::Events(e) => e.len(),
            Self::Raw { .. } | Self::Bind(_) => 1,
        }
    }

    /// The messages to send (exchange, routing key, properties, body) and the receipts.
    fn encode(&self, exchange: &ShortString) -> Result<(Vec<Msg>, Vec<String>), TransportError> {
        match self {
            Self::Events(events) => {
                let msgs = events
                    .iter()
                    .map(|o| message_of(o).map(|(rk, p, b)| (exchange.clone(), rk, p, b)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((
                    msgs,
                    events.iter().map(|o| o.event.event_id.clone()).collect(),
                ))
            }
            Self::Raw {
                exchange,
                routing_key,
                body,
            } => {
                let name = |what: &str, s: &str| {
                    short(s).ok_or_else(|| {
                        TransportError::Invalid(format!(
                            "the {what} {s:.60}... is longer than AMQP's 255 bytes"
                        ))
                    })
                };
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2);
                let msg = (
                    name("exchange", exchange)?,
                    name("routing key", routing_key)?,
                    props,
                    body.as_bytes().to_vec(),
                );
                Ok((vec![msg], Vec::new()))
            }
            Self::Bind(_) => Ok((Vec::new(), Vec::new())),
        }
    }
}

type Msg = (ShortString, ShortString, BasicProperties, Vec<u8>);

/// Publishes every batch queued, then waits for their confirms (one wait for all). A bind
/// is done alone, in queue order: whatever this bus publishes after it is routed by it.
pub(super) async fn publisher(
    shared: Arc<Shared>,
    mut conn: Option<(Connection, Channel)>,
    mut rx: mpsc::UnboundedReceiver<(u64, Batch)>,
    sink: Arc<dyn Sink>,
) {
    let mut held = None;
    loop {
        let woken = shared.wake.notified();
        if shared.stopping() {
            break;
        }
        let first = if let Some(x) = held.take() {
            x
        } else {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(x) => x,
                    None => break,
                },
                () = woken => continue,
            }
        };
        if let (token, Batch::Bind(keys)) = &first {
            let outcome = round(&shared, &mut conn, Work::Bind(keys)).await;
            if outcome.is_err() {
                // Not bound (refused, or not confirmed in time): left out of what every
                // reconnect declares, so one refused key cannot keep the consumer out, and a
                // later subscription to it tries again. (Keys a `#` replaced stay replaced.)
                shared.bindings.lock().retain(|k| !keys.contains(k));
            }
            sink.confirmed(vec![(*token, outcome.map(|()| Vec::new()))]);
            continue;
        }
        let mut n = first.1.len();
        let mut batch = vec![first];
        while n < 4096 {
            match rx.try_recv() {
                Ok(x) if matches!(x.1, Batch::Bind(_)) => {
                    held = Some(x);
                    break;
                }
                Ok(x) => {
                    n += x.1.len();
                    batch.push(x);
                }
                Err(_) => break,
            }
        }
        // Encode; a token whose events cannot be encoded fails alone.
        let exchange: ShortString = short(&shared.cfg.exchange).unwrap_or_default();
        let mut results = Vec::with_capacity(batch.len());
        let mut ready = Vec::with_capacity(batch.len());
        for (token, b) in batch {
            match b.encode(&exchange) {
                Ok((msgs, ids)) => ready.push((token, msgs, ids)),
                Err(e) => results.push((token, Err(e))),
            }
        }
        if !ready.is_empty() {
            let outcome = round(&shared, &mut conn, Work::Publish(&ready)).await;
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

type Ready = (u64, Vec<Msg>, Vec<String>);

/// What one round does on the publisher's channel.
#[derive(Clone, Copy)]
enum Work<'a> {
    /// Publishes, then awaits their confirms.
    Publish(&'a [Ready]),
    /// Binds the group's queue(s) with these keys.
    Bind(&'a [String]),
}

/// One round of publishes and their confirms (or of bindings), retried on a new connection
/// until `publish_timeout` (at least once: a retried round may publish some events twice).
async fn round(
    shared: &Shared,
    conn: &mut Option<(Connection, Channel)>,
    work: Work<'_>,
) -> Result<(), TransportError> {
    let deadline = Instant::now() + shared.cfg.publish_timeout;
    let awaited = match work {
        Work::Publish(_) => "publisher confirm",
        Work::Bind(_) => "bind-ok",
    };
    let mut attempt = 0;
    loop {
        let round =
            async {
                if conn.is_none() {
                    let c = open(shared).await?;
                    let ch = c.create_channel().await.map_err(|e| shared.error(e))?;
                    ch.confirm_select(ConfirmSelectOptions::default())
                        .await
                        .map_err(|e| shared.error(e))?;
                    if !shared.cfg.exchange.is_empty() {
                        declare_exchange(shared, &ch)
                            .await
                            .map_err(|e| shared.error(e))?;
                    }
                    *conn = Some((c, ch));
                }
                let (_, ch) = conn.as_ref().expect("connected above");
                let ready = match work {
                    Work::Publish(ready) => ready,
                    Work::Bind(keys) => {
                        for key in keys {
                            bind(shared, ch, key).await.map_err(|e| shared.error(e))?;
                        }
                        return Ok(());
                    }
                };
                // All at once: lapin resolves each publish once the I/O loop wrote it, so awaiting
                // them one by one costs a loop round trip per message.
                // join_all polls them in order the first time: the frames go out in order.
                let sends = ready.iter().flat_map(|(_, msgs, _)| msgs).map(
                    |(exchange, key, props, body)| {
                        ch.basic_publish(
                            exchange.clone(),
                            key.clone(),
                            BasicPublishOptions::default(),
                            body,
                            props.clone(),
                        )
                    },
                );
                let confirms = futures_util::future::join_all(sends)
                    .await
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| shared.error(e))?;
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
                    "no {awaited} within publish_timeout ({:.1}s)",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(key: Option<&str>, event_type: &str) -> Outgoing {
        Outgoing {
            event: crate::transport::NewEvent {
                event_id: "e-1".into(),
                event_type: event_type.into(),
                event_version: 3,
                data: r#"{"n":1}"#.into(),
                metadata: r#"{"correlation_id":"c-1","causation_id":"e-0"}"#.into(),
                occurred_at: None,
            },
            key: key.map(|k| crate::transport::Key {
                text: k.into(),
                json: format!("{k:?}"),
            }),
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
}

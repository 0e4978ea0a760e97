//! A group's dead-letter queue, `<queue>.dead`, read, retried and purged (for
//! `bus.dead_letters` and `oxbus dlq amqp://...`), on a connection of its own.
//!
//! Reading takes the messages there with `basic.get` (as many as the queue held when it
//! began: dead letters arriving meanwhile wait for the next reading) and gives back those it
//! keeps with one `basic.nack` (requeue) at the end: they keep their place and their order. A
//! retried message is published to the queue it came from, and the broker's confirm comes
//! before its dead letter is acknowledged: a failure in between leaves it in both places (at
//! least once), never in neither.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::redact;
use crate::store::record::iso_of;
use crate::transport::{retry_payload, DeadEntry, TransportError};

/// Every dead letter in `queue`, oldest first (nothing changes on the broker).
///
/// # Errors
/// The broker cannot be reached, does not answer within `timeout`, or has no such queue.
pub async fn list(
    url: &str,
    queue: &str,
    timeout: Duration,
) -> Result<Vec<DeadEntry>, TransportError> {
    let mut out = Vec::new();
    walk(url, queue, timeout, None, |entry| {
        out.push(entry.clone());
        Action::Leave
    })
    .await?;
    Ok(out)
}

/// Sends the dead letters of `ids` (`None`: all) back to the queue each came from, for the
/// subscription that failed only (see [`retry_payload`]), and removes them from `queue`;
/// returns how many.
///
/// # Errors
/// As [`list`]; those retried before the error stay retried.
pub async fn retry(
    url: &str,
    queue: &str,
    ids: Option<&[String]>,
    timeout: Duration,
) -> Result<usize, TransportError> {
    walk(url, queue, timeout, Some(()), |entry| {
        if entry.chosen(ids) {
            Action::Retry
        } else {
            Action::Leave
        }
    })
    .await
}

/// Removes the dead letters of `ids` from `queue` (`None`: purges it); returns how many.
///
/// # Errors
/// As [`list`].
pub async fn remove(
    url: &str,
    queue: &str,
    ids: Option<&[String]>,
    timeout: Duration,
) -> Result<usize, TransportError> {
    if ids.is_some() {
        return walk(url, queue, timeout, None, |entry| {
            if entry.chosen(ids) {
                Action::Drop
            } else {
                Action::Leave
            }
        })
        .await;
    }
    bounded(url, timeout, async {
        let conn = connect(url).await?;
        let ch = conn.create_channel().await.map_err(|e| broker(url, &e))?;
        let n = match ch
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
        {
            Ok(n) => n,
            Err(e) if not_found(&e) => 0,
            Err(e) => return Err(broker(url, &e)),
        };
        let _ = conn.close(200, "bye".into()).await;
        Ok(n as usize)
    })
    .await
}

/// What to do with one dead letter.
enum Action {
    Leave,
    Retry,
    Drop,
}

fn broker(url: &str, e: &dyn std::fmt::Display) -> TransportError {
    TransportError::Broker {
        broker: "rabbitmq",
        url: redact(url),
        message: e.to_string(),
    }
}

fn not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

async fn connect(url: &str) -> Result<Connection, TransportError> {
    crate::transport::redis_streams::ensure_tls();
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| broker(url, &e))
}

async fn bounded<T>(
    url: &str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    crate::transport::dead::bounded("rabbitmq", &redact(url), timeout, work).await
}

/// Takes the messages `queue` holds now, one by one, and does what `decide` says with each;
/// those kept go back at the end. Returns how many were retried or dropped. `retrying`: open
/// a confirm channel to publish retries on.
async fn walk(
    url: &str,
    queue: &str,
    timeout: Duration,
    retrying: Option<()>,
    mut decide: impl FnMut(&DeadEntry) -> Action,
) -> Result<usize, TransportError> {
    bounded(url, timeout, async {
        let err = |e: lapin::Error| broker(url, &e);
        let conn = connect(url).await?;
        let ch = conn.create_channel().await.map_err(err)?;
        let publisher = match retrying {
            Some(()) => {
                let p = conn.create_channel().await.map_err(err)?;
                p.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(err)?;
                Some(p)
            }
            None => None,
        };
        let mut done = 0;
        let mut kept = None;
        let mut left: Option<u32> = None;
        let mut index = 0usize;
        while left != Some(0) {
            let got = match ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(got)) => got,
                Ok(None) => break,
                // No dead letter yet: the group's first consumer declares the queue.
                Err(e) if index == 0 && not_found(&e) => break,
                Err(e) => return Err(err(e)),
            };
            // Only what was there when the walk began: a retry that fails again comes back
            // here, and is not retried twice in one walk.
            left = Some(left.map_or(got.message_count, |n| n - 1));
            let d = got.delivery;
            let entry = entry_of(queue, index, &d);
            index += 1;
            match decide(&entry) {
                Action::Leave => {
                    kept = Some(d.delivery_tag);
                    continue;
                }
                Action::Retry => {
                    if let Some(p) = &publisher {
                        send_back(p, &entry, &d.properties)
                            .await
                            .map_err(|e| broker(url, &e))?;
                    }
                }
                Action::Drop => {}
            }
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(err)?;
            done += 1;
        }
        if let Some(tag) = kept {
            ch.basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .map_err(err)?;
        }
        let _ = conn.close(200, "bye".into()).await;
        Ok(done)
    })
    .await
}

/// Publishes a retried dead letter to the queue it came from and waits for the confirm.
async fn send_back(
    ch: &Channel,
    entry: &DeadEntry,
    original: &BasicProperties,
) -> Result<(), String> {
    // The queue is the group's: no group to name.
    let body = retry_payload(&entry.payload, None, entry.subscription());
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(id) = original.message_id() {
        props = props.with_message_id(id.clone());
    }
    let confirm = ch
        .basic_publish(
            "".into(),
            entry.source.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_nack() {
        return Err(format!(
            "the broker refused the retry of dead letter {} to {} (basic.nack)",
            entry.id, entry.source
        ));
    }
    Ok(())
}

/// A header as text (numbers too); `None` for tables and arrays.
fn text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        _ => return None,
    })
}

/// A dead letter as read: its fields from the headers; where RabbitMQ dead-lettered it itself
/// (`x-first-death-*` headers), `error_type` and `error_message` say why, `queue` where from
/// and `last_failed_at` when.
fn entry_of(queue: &str, index: usize, d: &lapin::message::Delivery) -> DeadEntry {
    let empty = FieldTable::default();
    let headers = d.properties.headers().as_ref().unwrap_or(&empty).inner();
    let mut fields: BTreeMap<String, String> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), text(v)?)))
        .collect();
    if !fields.contains_key("error_type") {
        // RabbitMQ moved it here itself (x-delivery-limit, a consumer's reject, a TTL), or an
        // older bus refused it (an `error` only).
        let (error_type, message) = match fields.get("x-first-death-reason") {
            Some(reason) => {
                let why = match reason.as_str() {
                    "delivery_limit" => "delivered max_deliveries times without being acknowledged",
                    "rejected" => "rejected by a consumer",
                    "expired" => "expired",
                    _ => "dead-lettered by RabbitMQ",
                };
                (format!("rabbitmq.{reason}"), why.to_owned())
            }
            None => ("oxbus.Refused".to_owned(), String::new()),
        };
        let message = fields.get("error").cloned().unwrap_or(message);
        fields.insert("error_type".into(), error_type);
        fields.insert("error_message".into(), message.clone());
        fields.entry("error".into()).or_insert(message);
    }
    if !fields.contains_key("last_failed_at") {
        // RabbitMQ's own record: x-death, newest first, each with its time in seconds.
        let time = headers.get("x-death").and_then(|v| match v {
            AMQPValue::FieldArray(a) => a.as_slice().first().and_then(|t| match t {
                AMQPValue::FieldTable(t) => match t.inner().get("time") {
                    Some(AMQPValue::Timestamp(s)) => i64::try_from(*s).ok(),
                    _ => None,
                },
                _ => None,
            }),
            _ => None,
        });
        if let Some(secs) = time {
            fields.insert("last_failed_at".into(), iso_of(secs, 0));
        }
    }
    let source = fields
        .get("queue")
        .or_else(|| fields.get("x-first-death-queue"))
        .cloned()
        .unwrap_or_else(|| queue.strip_suffix(".dead").unwrap_or(queue).to_owned());
    fields.insert("queue".into(), source.clone());
    let id = fields
        .get("dead_letter_id")
        .cloned()
        .or_else(|| d.properties.message_id().as_ref().map(ToString::to_string))
        .unwrap_or_else(|| index.to_string());
    DeadEntry {
        id,
        source,
        payload: String::from_utf8_lossy(&d.data).into_owned(),
        fields,
    }
}

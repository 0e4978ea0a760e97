//! A group's dead letters in the dead-letter stream (`<stream>:dead`, shared by every group
//! of the stream: each entry names its group), read, retried and removed (for
//! `bus.dead_letters` and `oxbus dlq redis://...`).
//!
//! A retried entry is added back to the stream it came from, for its group and the
//! subscription that failed only (other groups acknowledge it unhandled), and deleted from
//! the dead-letter stream in the same `MULTI`: it is in one place or the other, never both,
//! never neither.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::Value;

use super::{ensure_tls, redact};
use crate::store::record::iso_of;
use crate::transport::dead::bounded;
use crate::transport::{retry_payload, DeadEntry, TransportError};

/// The group's dead letters in `stream`, oldest first (nothing changes).
///
/// # Errors
/// Redis cannot be reached or does not answer within `timeout`, naming it.
pub async fn list(
    url: &str,
    stream: &str,
    group: &str,
    timeout: Duration,
) -> Result<Vec<DeadEntry>, TransportError> {
    let (safe, mut c) = (redact(url), connect(url, timeout).await?);
    bounded("redis", &safe, timeout, async {
        let entries = read(&mut c, stream, group)
            .await
            .map_err(|e| broker(&safe, &e))?;
        Ok(entries.into_iter().map(|(_, e)| e).collect())
    })
    .await
}

/// Adds the group's dead letters of `ids` (`None`: all) back to the streams they came from,
/// for this group and the subscription that failed only, and deletes them from `stream`;
/// returns how many.
///
/// # Errors
/// As [`list`]; those retried before the error stay retried.
pub async fn retry(
    url: &str,
    stream: &str,
    group: &str,
    ids: Option<&[String]>,
    timeout: Duration,
) -> Result<usize, TransportError> {
    let (safe, mut c) = (redact(url), connect(url, timeout).await?);
    let c = &mut c;
    bounded("redis", &safe, timeout, async {
        let err = |e: redis::RedisError| broker(&safe, &e);
        let mut n = 0;
        for (entry_id, e) in read(c, stream, group).await.map_err(err)? {
            if !e.chosen(ids) || e.source.is_empty() {
                continue;
            }
            let body = retry_payload(&e.payload, Some(group), e.subscription());
            redis::pipe()
                .atomic()
                .cmd("XADD")
                .arg(&e.source)
                .arg("*")
                .arg("d")
                .arg(body)
                .ignore()
                .cmd("XDEL")
                .arg(stream)
                .arg(&entry_id)
                .ignore()
                .query_async::<()>(c)
                .await
                .map_err(err)?;
            n += 1;
        }
        Ok(n)
    })
    .await
}

/// Deletes the group's dead letters of `ids` (`None`: all of the group's) from `stream`;
/// returns how many.
///
/// # Errors
/// As [`list`].
pub async fn remove(
    url: &str,
    stream: &str,
    group: &str,
    ids: Option<&[String]>,
    timeout: Duration,
) -> Result<usize, TransportError> {
    let (safe, mut c) = (redact(url), connect(url, timeout).await?);
    let c = &mut c;
    bounded("redis", &safe, timeout, async {
        let err = |e: redis::RedisError| broker(&safe, &e);
        let gone: Vec<String> = read(c, stream, group)
            .await
            .map_err(err)?
            .into_iter()
            .filter(|(_, e)| e.chosen(ids))
            .map(|(entry_id, _)| entry_id)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let n: usize = redis::cmd("XDEL")
            .arg(stream)
            .arg(&gone)
            .query_async(c)
            .await
            .map_err(err)?;
        Ok(n)
    })
    .await
}

fn broker(safe_url: &str, e: &redis::RedisError) -> TransportError {
    TransportError::Broker {
        broker: "redis",
        url: safe_url.to_owned(),
        message: e.to_string(),
    }
}

/// A connection within `timeout`; errors name the server, never the password.
async fn connect(url: &str, timeout: Duration) -> Result<MultiplexedConnection, TransportError> {
    let safe = redact(url);
    ensure_tls();
    let client = redis::Client::open(url).map_err(|e| broker(&safe, &e))?;
    bounded("redis", &safe, timeout, async {
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| broker(&safe, &e))
    })
    .await
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The group's entries of the dead-letter stream: (entry id, dead letter).
async fn read(
    c: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> redis::RedisResult<Vec<(String, DeadEntry)>> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(c)
        .await?;
    Ok(reply
        .ids
        .into_iter()
        .filter_map(|sid| {
            let mut fields: BTreeMap<String, String> = sid
                .map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), text(v)?)))
                .collect();
            if fields.get("group").map(String::as_str) != Some(group) {
                return None;
            }
            let entry = entry_of(&sid.id, &mut fields);
            Some((sid.id, entry))
        })
        .collect())
}

/// A dead letter from its entry's fields: where the transport moved it itself (delivered
/// `max_deliveries` times), `error_type` is `redis.delivery_limit`; `last_failed_at` is the
/// entry's time when it was not written.
fn entry_of(entry_id: &str, fields: &mut BTreeMap<String, String>) -> DeadEntry {
    let payload = fields.remove("d").unwrap_or_default();
    if !fields.contains_key("error_type") {
        let delivered = fields
            .get("deliveries")
            .and_then(|d| d.parse::<u64>().ok())
            .unwrap_or(1);
        let kind = if delivered > 1 {
            "redis.delivery_limit"
        } else {
            "oxbus.Refused"
        };
        let message = fields.get("error").cloned().unwrap_or_default();
        fields.insert("error_type".into(), kind.to_owned());
        fields.insert("error_message".into(), message);
    }
    if !fields.contains_key("last_failed_at") {
        let ms: i64 = entry_id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0);
        let micros = u32::try_from(ms.rem_euclid(1000) * 1000).unwrap_or(0);
        fields.insert("last_failed_at".into(), iso_of(ms.div_euclid(1000), micros));
    }
    DeadEntry {
        id: fields
            .get("dead_letter_id")
            .cloned()
            .unwrap_or_else(|| entry_id.to_owned()),
        source: fields.get("stream").cloned().unwrap_or_default(),
        payload,
        fields: std::mem::take(fields),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_moved_for_too_many_deliveries_reads_as_the_brokers_dead_letter() {
        let mut f: BTreeMap<String, String> = [
            ("d", "{}"),
            ("stream", "s:0"),
            ("group", "g"),
            ("deliveries", "5"),
            ("error", "delivered 5 times without being acknowledged"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let e = entry_of("86401000-0", &mut f);
        assert_eq!(e.id, "86401000-0");
        assert_eq!((e.source.as_str(), e.payload.as_str()), ("s:0", "{}"));
        assert_eq!(e.fields["error_type"], "redis.delivery_limit");
        assert!(e.fields["error_message"].starts_with("delivered 5 times"));
        assert_eq!(
            e.fields["last_failed_at"],
            "1970-01-02T00:00:01.000000+00:00"
        );
        assert_eq!(e.subscription(), None);
    }
}

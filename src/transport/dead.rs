//! Dead letters on a broker, the same for every kind: what is written beside a dead message
//! ([`Failure`], as AMQP headers or stream entry fields), what is read back ([`DeadEntry`]),
//! and the body of a retried message ([`retry_payload`]).
//!
//! A retried dead letter goes back to its group as a message whose payload names, under
//! [`RETRY_FIELD`], the subscription that failed: the member that receives it runs that
//! subscription only. One without a subscription (the broker dead-lettered it, or the bus
//! refused it) goes back to every subscription of the group. Where every group reads the same
//! stream (Redis), it names the group too, and the other groups acknowledge it unhandled.
//!
//! Whoever reads dead letters back sees the same fields from every broker: `error_type` is
//! the handler's exception, `oxbus.Refused` for a message the bus could not take, and
//! `<broker>.delivery_limit` (or another reason the broker gives) for one the broker moved
//! there itself; `error_message` says why; `last_failed_at` is always there.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::value::RawValue;

use super::TransportError;

/// The payload field of a retried message: `{"group": ..., "subscription": ...}`, the one
/// group (on a broker whose streams every group reads) and subscription it is for.
pub const RETRY_FIELD: &str = "retry";

/// A handler that gave up on a message: its subscription and the last error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerFailure {
    /// The dead letter's id (the same in `bus.dead_letters` before and after reading it back).
    pub id: String,
    /// The subscription's name.
    pub subscription: String,
    /// The exception's qualified type name.
    pub error_type: String,
    /// Its message.
    pub error_message: String,
    /// Its formatted traceback.
    pub traceback: String,
    /// Calls made, retries included.
    pub attempts: u32,
    /// ISO 8601 times of the first and the last failed call.
    pub first_failed_at: String,
    /// See `first_failed_at`.
    pub last_failed_at: String,
}

/// Why one dead letter was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The bus cannot take the message at all (not JSON, a key it refuses): the reason.
    Refused(String),
    /// A subscription's retry policy was spent.
    Handler(HandlerFailure),
}

impl Failure {
    /// The fields written beside the message: `error` (one line), `dead_letter_id` (a new
    /// UUID for a refusal), `error_type`, `error_message` and `last_failed_at` always; with a
    /// handler, `subscription`, `error_type`, `error_message`, `traceback`,
    /// `attempts`, `first_failed_at`, `last_failed_at`.
    #[must_use]
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Refused(reason) => vec![
                ("error", reason.clone()),
                ("dead_letter_id", uuid::Uuid::now_v7().to_string()),
                ("error_type", "oxbus.Refused".to_owned()),
                ("error_message", reason.clone()),
                ("last_failed_at", crate::store::record::now_iso()),
            ],
            Self::Handler(h) => vec![
                ("error", format!("{}: {}", h.error_type, h.error_message)),
                ("dead_letter_id", h.id.clone()),
                ("subscription", h.subscription.clone()),
                ("error_type", h.error_type.clone()),
                ("error_message", h.error_message.clone()),
                ("traceback", h.traceback.clone()),
                ("attempts", h.attempts.to_string()),
                ("first_failed_at", h.first_failed_at.clone()),
                ("last_failed_at", h.last_failed_at.clone()),
            ],
        }
    }
}

/// A dead letter read back from the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadEntry {
    /// Its id there: the `dead_letter_id` the bus wrote, else the broker's own.
    pub id: String,
    /// The queue or stream the message came from (where a retry sends it back).
    pub source: String,
    /// The message body (a [`crate::transport::Payload`] as JSON, unless it was refused as
    /// unreadable).
    pub payload: String,
    /// What was written beside it (see [`Failure::fields`]), and where the broker itself
    /// dead-lettered it, `error` saying why.
    pub fields: BTreeMap<String, String>,
}

impl DeadEntry {
    /// The subscription that failed, if a handler gave up.
    #[must_use]
    pub fn subscription(&self) -> Option<&str> {
        self.fields
            .get("subscription")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Whether it is one of `ids` (`None`: all).
    #[must_use]
    pub fn chosen(&self, ids: Option<&[String]>) -> bool {
        ids.map_or(true, |ids| ids.contains(&self.id))
    }
}

/// The body of a retried message: `payload` with [`RETRY_FIELD`] naming `group` and
/// `subscription` (taken out when both are `None`: every group and subscription handles it
/// again). A body that is not a JSON object goes back as it is (the bus refuses it again,
/// with the reason).
#[must_use]
pub fn retry_payload(payload: &str, group: Option<&str>, subscription: Option<&str>) -> String {
    let Ok(mut fields) = serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(payload) else {
        return payload.to_owned();
    };
    fields.remove(RETRY_FIELD);
    if group.is_some() || subscription.is_some() {
        let target = serde_json::json!({"group": group, "subscription": subscription});
        let Ok(raw) = serde_json::value::to_raw_value(&target) else {
            return payload.to_owned();
        };
        fields.insert(RETRY_FIELD.to_owned(), raw);
    }
    serde_json::to_string(&fields).unwrap_or_else(|_| payload.to_owned())
}

/// Bounds a reading of the broker by `timeout`; past it, an error naming the broker.
pub(crate) async fn bounded<T>(
    broker: &'static str,
    url: &str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(TransportError::Broker {
                broker,
                url: url.to_owned(),
                message: format!("no answer within {:.1}s", timeout.as_secs_f64()),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_payload_names_the_subscription_and_keeps_the_rest_as_it_was() {
        let p = r#"{"event_id":"e-1","data":{"n":12345678901234567890123},"metadata":{}}"#;
        let r = retry_payload(p, Some("g"), Some("billing.charge"));
        let v: BTreeMap<String, Box<RawValue>> = serde_json::from_str(&r).unwrap();
        assert_eq!(
            v["retry"].get(),
            r#"{"group":"g","subscription":"billing.charge"}"#
        );
        assert_eq!(v["data"].get(), r#"{"n":12345678901234567890123}"#);
        // Retried again for every group and subscription: the field goes.
        let again = retry_payload(&r, None, None);
        assert!(!again.contains("retry"), "{again}");
        assert!(again.contains(r#""event_id":"e-1""#));
        // Not an object: as it is.
        assert_eq!(retry_payload("not json", None, Some("s")), "not json");
    }

    #[test]
    fn a_handler_failure_writes_every_field_and_a_refusal_its_reason() {
        let f = Failure::Handler(HandlerFailure {
            id: "d-1".into(),
            subscription: "s".into(),
            error_type: "ValueError".into(),
            error_message: "boom".into(),
            traceback: "tb".into(),
            attempts: 3,
            first_failed_at: "t0".into(),
            last_failed_at: "t1".into(),
        });
        let fields: BTreeMap<_, _> = f.fields().into_iter().collect();
        assert_eq!(fields["error"], "ValueError: boom");
        assert_eq!(fields["attempts"], "3");
        assert_eq!(fields["subscription"], "s");
        assert_eq!(fields.len(), 9);
        let refused = Failure::Refused("bad".into()).fields();
        assert_eq!(refused[0], ("error", "bad".to_owned()));
        assert_eq!(refused[1].0, "dead_letter_id");
        assert_eq!(refused[2], ("error_type", "oxbus.Refused".to_owned()));
        assert_ne!(refused[1], Failure::Refused("bad".into()).fields()[1]);
        let e = DeadEntry {
            id: "d-1".into(),
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ..DeadEntry::default()
        };
        assert_eq!(e.subscription(), Some("s"));
        assert!(e.chosen(None));
        assert!(e.chosen(Some(&["d-1".to_owned()])));
        assert!(!e.chosen(Some(&["d-2".to_owned()])));
    }
}

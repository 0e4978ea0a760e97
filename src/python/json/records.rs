//! The records written around an event's data, as serde structs: the metadata kept with every
//! logged event, and the payload of a Redis stream entry.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// An event's metadata (the log's `metadata` column, and a stream payload's `metadata`):
/// `{"correlation_id": .., "causation_id": .., "subscription": ..}`. The ids are usually
/// strings, but any JSON value a caller passed is kept; `subscription` names the handler that
/// published the event (`oxbus flow` draws handler → event edges from it) and is left out
/// for an event published outside a handler.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub correlation_id: Option<Value>,
    pub causation_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
}

/// A Redis stream entry's payload: the event's identity, type, version and time, its data
/// (the encoder's JSON, spliced in as it is) and its [`Metadata`].
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamPayload<'a> {
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    #[serde(borrow)]
    pub event_type: Cow<'a, str>,
    pub event_version: i64,
    #[serde(borrow)]
    pub occurred_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub data: &'a RawValue,
    #[serde(borrow)]
    pub metadata: &'a RawValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_writes_null_ids_and_leaves_out_a_missing_subscription() {
        let meta = Metadata {
            correlation_id: Some(Value::from("c-1")),
            ..Metadata::default()
        };
        let text = serde_json::to_string(&meta).unwrap();
        assert_eq!(text, r#"{"correlation_id":"c-1","causation_id":null}"#);
        assert_eq!(serde_json::from_str::<Metadata>(&text).unwrap(), meta);
    }

    #[test]
    fn metadata_keeps_any_id_value_and_the_subscription() {
        let text = r#"{"correlation_id":123456789012345678901234567890,"causation_id":"e-1","subscription":"audit"}"#;
        let meta: Metadata = serde_json::from_str(text).unwrap();
        assert_eq!(meta.subscription.as_deref(), Some("audit"));
        assert_eq!(serde_json::to_string(&meta).unwrap(), text);
    }

    #[test]
    fn metadata_of_an_old_row_may_be_empty() {
        assert_eq!(
            serde_json::from_str::<Metadata>("{}").unwrap(),
            Metadata::default()
        );
    }

    #[test]
    fn stream_payload_splices_data_and_metadata_as_they_are() {
        let data = RawValue::from_string(r#"{"n":[1,2.5,"x"]}"#.to_owned()).unwrap();
        let metadata =
            RawValue::from_string(r#"{"correlation_id":"c","causation_id":null}"#.to_owned())
                .unwrap();
        let payload = StreamPayload {
            event_id: "e-1".into(),
            event_type: "Order\"Placed".into(),
            event_version: 2,
            occurred_at: None,
            data: &data,
            metadata: &metadata,
        };
        let text = serde_json::to_string(&payload).unwrap();
        assert_eq!(
            text,
            r#"{"event_id":"e-1","event_type":"Order\"Placed","event_version":2,"occurred_at":null,"data":{"n":[1,2.5,"x"]},"metadata":{"correlation_id":"c","causation_id":null}}"#
        );
        let back: StreamPayload<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(back.event_type, "Order\"Placed");
        assert_eq!(back.data.get(), data.get());
    }
}

//! The metadata kept with every logged event and in every broker message, as a serde struct.

use serde::{Deserialize, Serialize};
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
}

//! How a message type becomes bytes on the wire and back.
//!
//! A codec is generic over the message type so that one implementation can
//! cover every serde type (like [`Json`]) while another covers only the types
//! it knows (a protobuf codec for generated types, say).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The error a codec returns; boxed so codecs can use any error type.
pub type CodecError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A codec's error as text fit for logs, dead-letter headers and the
/// status page: serde's messages repeat the offending input (`invalid type:
/// string "4111…", expected i64`), which may be personal data or a secret,
/// so every quoted or back-quoted span is elided, except the field names a
/// type declares (`missing field `id``).
pub(crate) fn describe(error: &CodecError) -> String {
    elide_values(&error.to_string())
}

/// `text` with every quoted or back-quoted span elided (see [`describe`]).
pub(crate) fn elide_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        let (before, after) = rest.split_at(open);
        out.push_str(before);
        let Some(close) = after[1..].find(quote) else {
            // Unbalanced: nothing after it can be told apart from input.
            out.push(quote);
            out.push('…');
            return out;
        };
        let inner = &after[1..1 + close];
        let declared =
            quote == '`' && (out.ends_with("missing field ") || out.ends_with("duplicate field "));
        out.push(quote);
        out.push_str(if declared { inner } else { "…" });
        out.push(quote);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Encodes and decodes values of `T`.
///
/// Implementations must be cheap to call concurrently: kontext shares one
/// codec instance between every producer call and consumer of the topic.
pub trait Codec<T>: Send + Sync + 'static {
    /// The value written to the `content-type` header.
    fn content_type(&self) -> &'static str;

    /// Appends the encoded form of `value` to `buf`. `buf` may hold bytes
    /// from an earlier call that the caller cleared; reuse its capacity.
    fn encode(&self, value: &T, buf: &mut Vec<u8>) -> Result<(), CodecError>;

    /// Decodes one value from a record's payload.
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// JSON through `serde_json`; the default codec of every topic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T> Codec<T> for Json
where
    T: Serialize + DeserializeOwned + 'static,
{
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode(&self, value: &T, buf: &mut Vec<u8>) -> Result<(), CodecError> {
        serde_json::to_writer(buf, value).map_err(Into::into)
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn described_errors_keep_declared_field_names_and_lose_input_values() {
        let wrong =
            serde_json::from_str::<Paid>(r#"{"order_id": "4111-secret", "payment_id": "p"}"#);
        let text = describe(
            &wrong
                .map_err(CodecError::from)
                .err()
                .unwrap_or_else(|| panic!("decoded")),
        );
        assert!(!text.contains("4111"), "{text}");
        assert!(text.contains("invalid type: string \"…\""), "{text}");
        let missing = serde_json::from_str::<Paid>(r#"{"order_id": 7}"#);
        let text = describe(
            &missing
                .map_err(CodecError::from)
                .err()
                .unwrap_or_else(|| panic!("decoded")),
        );
        assert!(text.contains("missing field `payment_id`"), "{text}");
        let number = serde_json::from_str::<String>("987654321");
        let text = describe(
            &number
                .map_err(CodecError::from)
                .err()
                .unwrap_or_else(|| panic!("decoded")),
        );
        assert!(!text.contains("987654321"), "{text}");
        assert_eq!(elide_values("odd \"quote"), "odd \"…");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Paid {
        order_id: u64,
        payment_id: String,
    }

    #[test]
    fn json_round_trips_and_rejects_garbage() {
        let value = Paid {
            order_id: 7,
            payment_id: "p-1".into(),
        };
        let mut buf = Vec::new();
        Codec::<Paid>::encode(&Json, &value, &mut buf).unwrap();
        assert_eq!(buf, br#"{"order_id":7,"payment_id":"p-1"}"#);
        let back: Paid = Json.decode(&buf).unwrap();
        assert_eq!(back, value);

        let err = Codec::<Paid>::decode(&Json, b"{\"order_id\":").unwrap_err();
        assert!(err.to_string().contains("EOF"), "{err}");
    }
}

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
/// A `"` span ends at the first unescaped `"` (serde prints strings with
/// their escapes). A back-quoted span (a number, a map key, a variant from
/// the input) can hold anything, back quotes included, so it is elided up
/// to the last `, expected` (what the type wanted, its own words) or to the
/// end; only the names after `missing field ` and `duplicate field ` come
/// from the type and are kept.
pub(crate) fn elide_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find(['"', '`']) {
        let (before, after) = rest.split_at(open);
        out.push_str(before);
        if let Some(inside) = after.strip_prefix('"') {
            let mut escaped = false;
            let close = inside.char_indices().find_map(|(i, c)| {
                let ends = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                ends.then_some(i)
            });
            out.push_str("\"…\"");
            match close {
                Some(i) => rest = &inside[i + 1..],
                // Unbalanced: nothing after it can be told from input.
                None => return out,
            }
            continue;
        }
        let declared = out.ends_with("missing field ") || out.ends_with("duplicate field ");
        if declared && let Some(i) = after[1..].find('`') {
            out.push_str(&after[..i + 2]);
            rest = &after[i + 2..];
            continue;
        }
        out.push_str("`…`");
        match after.rfind(", expected") {
            Some(i) => rest = &after[i..],
            None => return out,
        }
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

    fn described(json: &str) -> String {
        let refused = serde_json::from_str::<Paid>(json)
            .map(|_| ())
            .map_err(CodecError::from);
        describe(&refused.err().unwrap_or_else(|| panic!("{json} decoded")))
    }

    #[test]
    fn described_errors_keep_declared_field_names_and_lose_input_values() {
        let text = described(r#"{"order_id": "4111-secret", "payment_id": "p"}"#);
        assert!(!text.contains("4111"), "{text}");
        assert!(
            text.contains("invalid type: string \"…\", expected u64"),
            "{text}"
        );
        let text = described(r#"{"order_id": 7}"#);
        assert!(text.contains("missing field `payment_id`"), "{text}");
        // Embedded JSON: escaped quotes do not end the span.
        let text = described(r#"{"order_id": "{\"card\":\"4111\"}", "payment_id": "p"}"#);
        assert!(!text.contains("4111") && !text.contains("card"), "{text}");
        // A value ending in a backslash, and non-ASCII text.
        let text = described(r#"{"order_id": "süß 4111\\", "payment_id": "p"}"#);
        assert!(!text.contains("4111") && !text.contains("süß"), "{text}");
        let number = serde_json::from_str::<String>("987654321").map_err(CodecError::from);
        let text = describe(&number.err().unwrap_or_else(|| panic!("decoded")));
        assert!(
            !text.contains("987654321") && text.contains("expected a string"),
            "{text}"
        );
    }

    #[test]
    fn back_quoted_input_is_elided_up_to_what_the_type_expected() {
        assert_eq!(
            elide_values("unknown field `a`4111`, expected one of `x`, `y`"),
            "unknown field `…`, expected one of `…`"
        );
        assert_eq!(
            elide_values("missing field `id` at line 1"),
            "missing field `id` at line 1"
        );
        assert_eq!(elide_values("odd \"quote"), "odd \"…\"");
        assert_eq!(elide_values("a `tick"), "a `…`");
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

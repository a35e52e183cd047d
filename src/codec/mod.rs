//! How a message type becomes bytes on the wire and back.
//!
//! A codec is generic over the message type so that one implementation can
//! cover every serde type (like [`Json`]) while another covers only the types
//! it knows (a protobuf codec for generated types, say).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The error a codec returns; boxed so codecs can use any error type.
pub type CodecError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

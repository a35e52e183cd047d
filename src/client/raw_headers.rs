//! Kafka headers read and written as bytes.
//!
//! rdkafka's header accessor (`BorrowedHeaders::try_get`, behind `get` and
//! `iter`) unwraps the name's UTF-8 conversion, so one record whose header
//! name is not UTF-8 (any producer can write one: the protocol does not
//! check) panics whoever reads its headers. kontext reads headers only
//! through [`RawHeaders`], which hands names over as bytes.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::ptr;

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedMessage, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

/// The headers of one message, in wire order, names as bytes.
pub(crate) struct RawHeaders<'m> {
    list: *const rdsys::rd_kafka_headers_t,
    next: usize,
    // The list belongs to the message and lives as long as it does.
    _message: std::marker::PhantomData<&'m BorrowedMessage<'m>>,
}

impl<'m> RawHeaders<'m> {
    /// `m`'s headers (librdkafka parses them on the first call per message).
    pub(crate) fn of(m: &'m BorrowedMessage<'_>) -> RawHeaders<'m> {
        let mut list: *mut rdsys::rd_kafka_headers_t = ptr::null_mut();
        // SAFETY: `m.ptr()` is a live message for `'m`; librdkafka returns
        // a list owned by the message (or an error and no list), valid until
        // the message is destroyed or its headers replaced, which kontext
        // never does.
        let err = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut list) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            list = ptr::null_mut();
        }
        RawHeaders {
            list,
            next: 0,
            _message: std::marker::PhantomData,
        }
    }
}

impl<'m> Iterator for RawHeaders<'m> {
    type Item = (&'m [u8], Option<&'m [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.list.is_null() {
            return None;
        }
        let mut name: *const c_char = ptr::null();
        let mut value: *const c_void = ptr::null();
        let mut size: usize = 0;
        // SAFETY: `list` is the message's header list (see `of`); an index
        // past its end is an error, not a read.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(self.list, self.next, &mut name, &mut value, &mut size)
        };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            self.list = ptr::null();
            return None;
        }
        self.next += 1;
        // librdkafka hands names over NUL-terminated and without their
        // length: a name with a NUL byte in it reads as its part before it.
        // SAFETY: librdkafka keeps each name NUL-terminated and each value
        // `size` bytes long, both inside the list, which lives for `'m`.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        Some((name, value))
    }
}

/// The first header name of `m` that is not UTF-8, shown lossily.
pub(crate) fn bad_name<'a>(
    mut headers: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> Option<String> {
    headers.find_map(|(name, _)| std::str::from_utf8(name).is_err().then(|| lossy(name)))
}

/// A header name as text: invalid bytes become U+FFFD and are listed in hex,
/// so an operator can tell which bytes the producer wrote.
pub(crate) fn lossy(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) => s.to_owned(),
        Err(_) => {
            let hex: Vec<String> = name.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{} (bytes {})",
                String::from_utf8_lossy(name),
                hex.join(" ")
            )
        }
    }
}

/// Adds a header whose name is any bytes (a test's record from a producer
/// that does not check its names).
pub(crate) fn add(headers: OwnedHeaders, name: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
    // rdkafka keeps the list's pointer private; its `BorrowedHeaders` view
    // is that pointer (a reference to a zero-sized type cast from it, as in
    // rdkafka 0.39's own `as_native_ptr`; the unit test below counts what
    // was added, so a change of that layout fails it).
    let list = headers.as_borrowed() as *const _ as *mut rdsys::rd_kafka_headers_t;
    let (value_ptr, value_len) = match value {
        Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
        None => (ptr::null(), 0),
    };
    // SAFETY: `list` is the owned, writable list `headers` keeps alive;
    // librdkafka copies the name and the value.
    unsafe {
        rdsys::rd_kafka_header_add(
            list,
            name.as_ptr().cast::<c_char>(),
            name.len() as isize,
            value_ptr,
            value_len,
        );
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_that_is_not_utf8_is_shown_with_its_bytes() {
        assert_eq!(lossy(b"ce_type"), "ce_type");
        assert_eq!(lossy(b"a\xffb"), "a\u{fffd}b (bytes 61 ff 62)");
        let names: [(&[u8], Option<&[u8]>); 2] = [(b"ok", None), (b"\xfe", Some(b"v"))];
        assert_eq!(
            bad_name(names.into_iter()).as_deref(),
            Some("\u{fffd} (bytes fe)")
        );
    }

    #[test]
    fn owned_headers_take_names_as_bytes() {
        use rdkafka::message::Headers;
        let h = add(OwnedHeaders::new(), b"x\xff", Some(b"1"));
        let h = add(h, b"plain", None);
        assert_eq!(h.count(), 2);
    }
}

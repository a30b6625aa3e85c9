//! Stored message blobs: any bytes decode or are refused without panicking, and a decoded
//! message encodes back to a blob that decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren::broker::persist::{decode_message, encode_message};

fuzz_target!(|data: &[u8]| {
    let blob = Bytes::copy_from_slice(data);
    if let Some(m) = decode_message(&blob, 1) {
        let again = decode_message(&encode_message(&m), 1).expect("round trip");
        assert_eq!(again.exchange, m.exchange);
        assert_eq!(again.routing_key, m.routing_key);
        assert_eq!(again.raw_properties, m.raw_properties);
        assert_eq!(again.body, m.body);
        assert_eq!(again.published_ms, m.published_ms);
    }
});

//! Stored definitions: any bytes decode or are refused without panicking, and what
//! decodes encodes back to a value that decodes to the same bytes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::broker::persist::{StoredBinding, StoredDefinition, StoredExchange, StoredQueue};

fn round_trip<T: StoredDefinition>(data: &[u8]) {
    if let Some(d) = T::decode(data) {
        let bytes = d.value.encode();
        let again = T::decode(&bytes).expect("what Warren writes it reads back");
        assert!(!again.legacy);
        assert_eq!(again.value.encode(), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<StoredQueue>(data);
    round_trip::<StoredExchange>(data);
    round_trip::<StoredBinding>(data);
});

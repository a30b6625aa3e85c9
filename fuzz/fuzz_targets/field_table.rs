//! The bounded walk over field tables and the parser agree: whatever the walk accepts
//! parses, and encodes back to the same bytes' meaning (parse . generate . parse is
//! stable), so a table Warren accepts can be stored and read back.
#![no_main]

use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use libfuzzer_sys::fuzz_target;
use warren::protocol::fieldtable::check_table;

fuzz_target!(|data: &[u8]| {
    let Ok(n) = check_table(data) else { return };
    let (_, table) = parse_field_table(&data[..n]).expect("what the walk accepts parses");
    let encoded = gen_field_table(&table)(Vec::new().into())
        .expect("encodes")
        .into_inner()
        .0;
    assert_eq!(check_table(&encoded), Ok(encoded.len()));
    let (_, again) = parse_field_table(&encoded[..]).expect("re-encoded table parses");
    let reencoded = gen_field_table(&again)(Vec::new().into())
        .expect("encodes")
        .into_inner()
        .0;
    assert_eq!(encoded, reencoded, "encoding is stable");
});

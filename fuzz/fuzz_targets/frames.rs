//! Any bytes a peer can send after the protocol header: frames are cut and parsed
//! (methods, content headers, field tables) without panicking, recursing without bound
//! or allocating more than the bytes given.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren::protocol::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut decoder = FrameDecoder { frame_max: 131072 };
    while let Ok(Some(_frame)) = decoder.decode_frame(&mut buf) {}
});

//! Content assembly behind the frame decoder: any bytes cut into frames and fed to a
//! publish's assembly (method, header, bodies, in whatever order the bytes say) end in
//! an error or in a message whose body is exactly the size its header announced.
#![no_main]

use amq_protocol::protocol::{AMQPClass, basic};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren::protocol::content::{ContentAssembly, Progress};
use warren::protocol::{FrameDecoder, InFrame};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut decoder = FrameDecoder { frame_max: 4096 };
    let mut publish: Option<ContentAssembly> = None;
    while let Ok(Some(frame)) = decoder.decode_frame(&mut buf) {
        let step = match (frame, publish.as_mut()) {
            (InFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Publish(p))), None) => {
                publish = Some(ContentAssembly::new(p));
                continue;
            }
            (InFrame::Header(_, h), Some(a)) => a.header(h),
            (InFrame::Body(_, b), Some(a)) => a.body(b),
            _ => return,
        };
        match step {
            Ok(Progress::Partial) => {}
            Ok(Progress::Complete) => {
                let done = publish.take().and_then(ContentAssembly::finish);
                let done = done.expect("complete content assembles");
                assert_eq!(done.body.len() as u64, done.header.body_size);
            }
            Err(_) => return,
        }
    }
});

//! Every decoder of the protocol on arbitrary bytes: frames, bare bodies, signed adverts,
//! receipts and tensors. Any panic, or an allocation beyond libFuzzer's limit, is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_protocol::codec::{decode_body, decode_frame, read_frame};
use potluck_protocol::messages::{CapacityAdvert, Message, StageOutputWire, ADVERT_DOMAIN};

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, _)) = decode_frame::<Message>(data) {
        match msg {
            Message::Advert(signed) => {
                let _ = signed.verify::<CapacityAdvert>(ADVERT_DOMAIN);
            }
            Message::Result(r) => {
                let _ = r.receipt.verify();
                if let StageOutputWire::Hidden(t) = r.output {
                    let _ = t.to_f32();
                }
            }
            _ => {}
        }
    }
    let _ = decode_body::<Message>(data);
    let mut reader = data;
    let _ = read_frame::<Message>(&mut reader);
});

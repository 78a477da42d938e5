//! Every decoder of the protocol on arbitrary bytes: frames, bare bodies, signed adverts,
//! receipts and tensors, admission hellos and answers (with their certificates and
//! revocations), and certificates' text forms. Any panic, or an allocation beyond
//! libFuzzer's limit, is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_protocol::codec::{decode_body, decode_frame, read_frame};
use potluck_protocol::membership::{Admission, Certificate, Hello};
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
            Message::Revoked(list) => {
                for r in &list {
                    let _ = r.verify(&r.pool);
                }
            }
            _ => {}
        }
    }
    // The checks readers run on an advert's text fields, on whatever decodes as one.
    if let Ok(advert) = decode_body::<CapacityAdvert>(data) {
        let _ = advert.check_text_fields();
        let _ = advert.check_current(&advert.pool, advert.issued_at);
    }
    let _ = decode_body::<Message>(data);
    let mut reader = data;
    let _ = read_frame::<Message>(&mut reader);
    // Admission: what a stranger sends before it is admitted.
    if let Ok(hello) = decode_body::<Hello>(data) {
        if let Some(cert) = hello.certificate {
            let _ = cert.admits(&cert.body.pool, &cert.body.member, 0, &[]);
            let _ = cert.to_text();
        }
    }
    if let Ok(answer) = decode_body::<Admission>(data) {
        for r in &answer.revocations {
            let _ = r.verify(&r.pool);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cert) = Certificate::from_text(text) {
            let _ = cert.admits(&cert.body.pool, &cert.body.member, u64::MAX, &[]);
        }
    }
});

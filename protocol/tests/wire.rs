//! Round trips of every message, and hostile bytes: nothing may panic or allocate without
//! bound, and every refusal is typed.

use potluck_protocol::codec::{
    decode_body, decode_frame, encode_body, encode_frame, read_frame, PROTOCOL_VERSION,
};
use potluck_protocol::membership::{Admission, Certificate, Hello, Membership, Revocation, Role};
use potluck_protocol::messages::*;
use potluck_protocol::receipt::content_id;
use potluck_protocol::signed::{Keypair, Signed};
use potluck_protocol::tensor::{WireDType, WireTensor};
use potluck_protocol::ProtocolError;
use proptest::prelude::*;

fn key(seed: u8) -> Keypair {
    Keypair::from_secret(&[seed; 32])
}

fn model() -> ModelRef {
    ModelRef {
        name: "smollm2-135m-instruct".into(),
        digest: [7; 32],
    }
}

fn advert(seq: u64) -> CapacityAdvert {
    CapacityAdvert {
        pool: "public".into(),
        device: DeviceKind::Cpu,
        memory_bytes: 8 << 30,
        gflops: 120.5,
        mem_gbps: 13.0,
        threads: 2,
        models: vec![model()],
        loaded: Some((model(), LayerRange { start: 0, end: 10 })),
        seq,
        issued_at: 1_700_000_000,
        expires_at: 1_700_000_030,
        name: Some("lab bench 2".into()),
        coordinator: Some(CoordinatorPointer {
            peer: "12D3KooWBeUMmiz6o5zZg5x64YonE5uzAs1FXmKXhAe6XZcd2Rca".into(),
            addrs: vec!["/ip4/10.0.0.1/tcp/7470".into()],
        }),
    }
}

fn receipt(k: &Keypair) -> Receipt {
    let body = ReceiptBody {
        job: [1; 32],
        input: [2; 32],
        output: [3; 32],
        model: [7; 32],
        layers: LayerRange { start: 10, end: 20 },
        numeric: NumericClass {
            weights: "Q4_1".into(),
            accumulation: "f32".into(),
            device: DeviceKind::Cpu,
        },
    };
    Receipt::sign(body, k).unwrap()
}

fn tensor_strategy() -> impl Strategy<Value = WireTensor> {
    (1usize..4, 1usize..9, prop::bool::ANY).prop_flat_map(|(rows, cols, half)| {
        prop::collection::vec(-1e4f32..1e4, rows * cols).prop_map(move |v| {
            let dtype = if half { WireDType::F16 } else { WireDType::F32 };
            WireTensor::from_f32(&v, &[rows, cols], dtype).unwrap()
        })
    })
}

fn message_strategy() -> impl Strategy<Value = Message> {
    let k = key(3);
    prop_oneof![
        any::<u64>().prop_map(move |seq| Message::Advert(
            Signed::sign(&advert(seq), ADVERT_DOMAIN, &key(1)).unwrap()
        )),
        (0u32..100, 1u32..100, any::<u64>()).prop_map(|(s, n, epoch)| Message::Assign(
            ShardAssignment {
                model: model(),
                layers: LayerRange {
                    start: s,
                    end: s + n
                },
                total_layers: 200,
                epoch,
            }
        )),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(any::<u32>(), 0..64),
            any::<bool>()
        )
            .prop_map(
                |(session, step, position, tokens, sample)| Message::Forward(StageForward {
                    session,
                    step,
                    position,
                    input: StageInputWire::Tokens(tokens.clone()),
                    sample: sample.then_some(SampleSpec {
                        temperature: 0.7,
                        top_k: 40,
                        top_p: 0.95,
                        min_p: 0.05,
                        repetition_penalty: 1.1,
                        seed: step,
                        top_logprobs: 5,
                        history: tokens,
                    }),
                })
            ),
        (any::<u64>(), tensor_strategy()).prop_map(|(session, t)| Message::Forward(StageForward {
            session,
            step: 1,
            position: 5,
            input: StageInputWire::Hidden(t),
            sample: None,
        })),
        (any::<u64>(), tensor_strategy()).prop_map(move |(session, t)| boxed_result(StageResult {
            session,
            step: 2,
            output: StageOutputWire::Hidden(t),
            receipt: receipt(&k),
        })),
        (any::<u32>(), -30f32..0.0).prop_map(|(token, logprob)| boxed_result(StageResult {
            session: 1,
            step: 3,
            output: StageOutputWire::Token {
                token,
                logprob,
                top: vec![(token, logprob), (1, -40.0)]
            },
            receipt: receipt(&key(4)),
        })),
        (any::<u64>(), any::<u64>())
            .prop_map(|(seq, sent_at_ms)| Message::Heartbeat(Heartbeat { seq, sent_at_ms })),
        ".{0,40}".prop_map(|reason| Message::Leave(Leave {
            reason,
            deadline_ms: 10_000
        })),
        (
            ".{0,40}",
            proptest::sample::select(vec![ErrorCode::Overloaded, ErrorCode::NotPermitted])
        )
            .prop_map(|(message, code)| Message::Error(WireError { code, message })),
        (".{0,70}", any::<bool>(), any::<u64>()).prop_map(|(pool, with_cert, serial)| {
            Message::Hello(Hello {
                pool,
                certificate: with_cert.then(|| certificate(serial)),
            })
        }),
        (proptest::option::of(".{0,40}"), 0u64..4).prop_map(|(refused, n)| {
            Message::Admission(Admission {
                refused,
                revocations: (0..n)
                    .map(|s| Revocation::issue(&key(5), s, 1_700_000_000).unwrap())
                    .collect(),
            })
        }),
        (0u64..4).prop_map(|n| Message::Revoked(
            (0..n)
                .map(|s| Revocation::issue(&key(5), s, 1_700_000_000).unwrap())
                .collect()
        )),
    ]
}

/// A pool certificate for `key(2)` signed by `key(5)`.
fn certificate(serial: u64) -> Certificate {
    let body = Membership {
        pool: key(5).public(),
        pool_name: "lab".into(),
        member: key(2).public(),
        role: Role::Trusted,
        issued_at: 1_700_000_000,
        expires_at: Some(1_800_000_000),
        serial,
        operator: Some("lab one".into()),
    };
    Certificate::issue(&key(5), body).unwrap()
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in message_strategy()) {
        let frame = encode_frame(&msg).unwrap();
        let (back, used) = decode_frame::<Message>(&frame).unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(&back, &msg);
        let mut reader = &frame[..];
        prop_assert_eq!(read_frame::<Message>(&mut reader).unwrap(), msg);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame::<Message>(&bytes);
        let _ = decode_body::<Message>(&bytes);
        let mut r = &bytes[..];
        let _ = read_frame::<Message>(&mut r);
    }

    #[test]
    fn corrupted_frames_never_panic(msg in message_strategy(), at in any::<usize>(), byte in any::<u8>()) {
        let mut frame = encode_frame(&msg).unwrap();
        let i = at % frame.len();
        frame[i] ^= byte | 1;
        // Either refused, or decoded to some message: never a panic.
        let _ = decode_frame::<Message>(&frame);
    }

    #[test]
    fn tensors_round_trip_exactly_in_f32(values in prop::collection::vec(-1e30f32..1e30, 1..64)) {
        let t = WireTensor::from_f32(&values, &[values.len()], WireDType::F32).unwrap();
        prop_assert_eq!(t.to_f32().unwrap(), values);
    }
}

#[test]
fn oversized_and_wrong_version_frames_are_refused_before_allocation() {
    let mut frame = encode_frame(&Message::Heartbeat(Heartbeat {
        seq: 1,
        sent_at_ms: 2,
    }))
    .unwrap();
    frame[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_frame::<Message>(&frame),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
    let mut r = &frame[..];
    assert!(matches!(
        read_frame::<Message>(&mut r),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
    let mut frame = encode_frame(&Message::Heartbeat(Heartbeat {
        seq: 1,
        sent_at_ms: 2,
    }))
    .unwrap();
    frame[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    assert_eq!(
        decode_frame::<Message>(&frame).unwrap_err(),
        ProtocolError::Version {
            got: PROTOCOL_VERSION + 1,
            want: PROTOCOL_VERSION
        }
    );
    assert!(matches!(
        decode_frame::<Message>(&frame[..3]),
        Err(ProtocolError::Truncated(_))
    ));
    let ok = encode_frame(&Message::Heartbeat(Heartbeat {
        seq: 1,
        sent_at_ms: 2,
    }))
    .unwrap();
    assert!(matches!(
        decode_frame::<Message>(&ok[..ok.len() - 1]),
        Err(ProtocolError::Truncated(_))
    ));
}

#[test]
fn a_lying_length_inside_the_body_does_not_allocate() {
    // A Forward whose token vector claims 2^40 elements in a tiny body.
    let msg = Message::Forward(StageForward {
        session: 1,
        step: 0,
        position: 0,
        input: StageInputWire::Tokens(vec![1, 2, 3]),
        sample: None,
    });
    let body = encode_body(&msg).unwrap();
    // Variant 4 (Forward), session 1, step 0, position 0, variant 0 (Tokens), then the length.
    let len_at = body.iter().position(|&b| b == 3).unwrap();
    let mut lying = body[..len_at].to_vec();
    lying.push(253); // varint marker: a u64 follows
    lying.extend_from_slice(&(1u64 << 40).to_le_bytes());
    lying.extend_from_slice(&[1, 2, 3]);
    assert!(decode_body::<Message>(&lying).is_err());
    // Trailing bytes are refused too.
    let mut trailing = body.clone();
    trailing.push(0);
    assert_eq!(
        decode_body::<Message>(&trailing).unwrap_err(),
        ProtocolError::Trailing(1)
    );
}

#[test]
fn signatures_bind_signer_body_and_domain() {
    let signed = Signed::sign(&advert(9), ADVERT_DOMAIN, &key(1)).unwrap();
    assert_eq!(
        signed.verify::<CapacityAdvert>(ADVERT_DOMAIN).unwrap(),
        advert(9)
    );
    // Another domain, a changed body, another signer, a flipped signature bit: all refused.
    assert!(matches!(
        signed.verify::<CapacityAdvert>(RECEIPT_DOMAIN),
        Err(ProtocolError::BadSignature(_))
    ));
    let mut body = signed.clone();
    body.body[0] ^= 1;
    assert!(matches!(
        body.verify::<CapacityAdvert>(ADVERT_DOMAIN),
        Err(ProtocolError::BadSignature(_))
    ));
    let mut signer = signed.clone();
    signer.signer = key(2).public();
    assert!(matches!(
        signer.verify::<CapacityAdvert>(ADVERT_DOMAIN),
        Err(ProtocolError::BadSignature(_))
    ));
    let mut sig = signed.clone();
    sig.signature.0[10] ^= 0x80;
    assert!(matches!(
        sig.verify::<CapacityAdvert>(ADVERT_DOMAIN),
        Err(ProtocolError::BadSignature(_))
    ));
    // An invalid public key is a typed refusal too.
    let mut bad_key = signed;
    bad_key.signer.0 = [0xFF; 32];
    assert!(bad_key.verify::<CapacityAdvert>(ADVERT_DOMAIN).is_err());
}

#[test]
fn receipts_verify_and_detect_tampering() {
    let k = key(5);
    let r = receipt(&k);
    r.verify().unwrap();
    let mut forged = r.clone();
    forged.body.output = content_id(&"something else").unwrap();
    assert!(forged.verify().is_err());
    assert_eq!(Keypair::from_secret(&k.secret()).public(), r.signer);
}

#[test]
fn tensors_check_shape_against_bytes() {
    let t = WireTensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], WireDType::F16).unwrap();
    assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(t.dims(), vec![2, 3]);
    let mut short = t.clone();
    short.data.pop();
    assert!(matches!(short.to_f32(), Err(ProtocolError::BadTensor(_))));
    let huge = WireTensor {
        dtype: WireDType::F32,
        shape: vec![u32::MAX, u32::MAX, u32::MAX],
        data: vec![],
    };
    assert!(matches!(huge.validate(), Err(ProtocolError::BadTensor(_))));
    let scalar = WireTensor {
        dtype: WireDType::F32,
        shape: vec![],
        data: vec![0; 4],
    };
    assert!(scalar.validate().is_err());
    let deep = WireTensor {
        dtype: WireDType::F32,
        shape: vec![1; 5],
        data: vec![0; 4],
    };
    assert!(deep.validate().is_err());
    assert!(WireTensor::from_f32(&[1.0], &[2], WireDType::F32).is_err());
}

fn boxed_result(r: StageResult) -> Message {
    Message::Result(Box::new(r))
}

#[test]
fn an_owners_name_keeps_only_what_reads_as_plain_text() {
    assert_eq!(
        clean_owner_name("ada's laptop").as_deref(),
        Some("ada's laptop")
    );
    assert_eq!(
        clean_owner_name("  lab   bench-2 ").as_deref(),
        Some("lab bench-2")
    );
    assert_eq!(clean_owner_name("<b>x</b>").as_deref(), Some("bxb"));
    assert_eq!(clean_owner_name("\u{1b}[31mred").as_deref(), Some("31mred"));
    assert_eq!(clean_owner_name("<>\n\t"), None);
    assert_eq!(
        clean_owner_name(&"a".repeat(100)).map(|n| n.len()),
        Some(MAX_OWNER_NAME)
    );
    // An advert carrying anything else is refused by its reader.
    let mut a = advert(1);
    a.name = Some("<script>".into());
    assert!(matches!(
        a.check_text_fields(),
        Err(AdvertFieldError::Name(_))
    ));
}

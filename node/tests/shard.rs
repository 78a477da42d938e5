//! Three stage servers holding SmolLM2's 30 blocks, driven through encoded frames as a pipeline
//! would: greedy tokens equal single-process generation, every receipt verifies and chains,
//! and bad requests are refused with typed errors while the servers keep serving.

use potluck_engine::generate::{generate, load_tokenizer, GenerateRequest};
use potluck_engine::llama::Stage;
use potluck_engine::sampling::{Sampler, SamplingParams};
use potluck_engine::weights::WeightFile;
use potluck_node::shard::ShardServer;
use potluck_protocol::codec::{decode_frame, encode_frame};
use potluck_protocol::messages::*;
use potluck_protocol::signed::Keypair;
use potluck_protocol::tensor::{WireDType, WireTensor};
use std::path::PathBuf;

fn smollm2() -> PathBuf {
    potluck_engine::cache::default_model_path().expect("no home directory")
}

fn model_ref() -> ModelRef {
    ModelRef {
        name: "smollm2-135m-instruct".into(),
        digest: [9; 32],
    }
}

fn servers(file: &WeightFile) -> Vec<ShardServer> {
    [0..10, 10..20, 20..30]
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let stage = Stage::load(file, r, 256 << 20).unwrap();
            ShardServer::new(
                stage,
                model_ref(),
                Keypair::from_secret(&[i as u8 + 1; 32]),
                "Q4_1",
            )
        })
        .collect()
}

/// Sends a request over the "wire" (an encoded frame each way) and returns the answer.
fn hop(server: &mut ShardServer, req: StageForward) -> Result<StageResult, WireError> {
    let frame = encode_frame(&Message::Forward(req)).unwrap();
    let (Message::Forward(req), _) = decode_frame::<Message>(&frame).unwrap() else {
        panic!("not a forward")
    };
    let answer = match server.handle(req.session, &req) {
        Ok(r) => Message::Result(Box::new(r)),
        Err(e) => Message::Error(e),
    };
    match decode_frame::<Message>(&encode_frame(&answer).unwrap())
        .unwrap()
        .0
    {
        Message::Result(r) => Ok(*r),
        Message::Error(e) => Err(e),
        other => panic!("unexpected {other:?}"),
    }
}

/// One step through the chain; returns the token and the receipts of every hop.
fn step(
    servers: &mut [ShardServer],
    session: u64,
    step: u64,
    position: u32,
    tokens: Vec<u32>,
) -> (u32, Vec<Receipt>) {
    let mut input = StageInputWire::Tokens(tokens);
    let mut receipts = Vec::new();
    let last = servers.len() - 1;
    for (i, s) in servers.iter_mut().enumerate() {
        let sample = (i == last).then(|| SampleSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            top_logprobs: 3,
            history: vec![],
        });
        let r = hop(
            s,
            StageForward {
                session,
                step,
                position,
                input: input.clone(),
                sample,
            },
        )
        .unwrap();
        receipts.push(r.receipt);
        match r.output {
            StageOutputWire::Hidden(t) => input = StageInputWire::Hidden(t),
            StageOutputWire::Token { token, top, .. } => {
                assert_eq!(top.len(), 3);
                assert_eq!(top[0].0, token);
                return (token, receipts);
            }
        }
    }
    panic!("no token");
}

#[test]
fn a_three_server_pipeline_over_frames_matches_local_generation() {
    let file = WeightFile::open(&smollm2()).unwrap();
    let tok = load_tokenizer(&file).unwrap();
    let mut chain = servers(&file);
    for (n, prompt) in [
        "The capital of France is",
        "Volunteers share their computers because",
    ]
    .iter()
    .enumerate()
    {
        let ids = tok.encode(prompt).unwrap();
        let mut local = vec![Stage::load(&file, 0..30, 256 << 20).unwrap()];
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        let req = GenerateRequest {
            prompt: &ids,
            max_tokens: 12,
            stop: &[],
        };
        let (want, _) = generate(&mut local, &tok, 1, &req, &mut sampler, |_| {}).unwrap();

        let session = 100 + n as u64;
        let (mut next, receipts) = step(&mut chain, session, 0, 0, ids.clone());
        let mut all_receipts = vec![receipts];
        let mut out = vec![next];
        for i in 0..11 {
            let (t, r) = step(
                &mut chain,
                session,
                i + 1,
                (ids.len() + i as usize) as u32,
                vec![next],
            );
            next = t;
            out.push(t);
            all_receipts.push(r);
        }
        assert_eq!(tok.decode(&out).unwrap(), want, "prompt {prompt:?}");
        for hops in &all_receipts {
            for (i, r) in hops.iter().enumerate() {
                r.verify().unwrap();
                assert_eq!(r.body.layers, chain[i].layers());
                if let Some(next) = hops.get(i + 1) {
                    assert_eq!(r.body.output, next.body.input, "hop {i} does not chain");
                }
            }
        }
    }
}

#[test]
fn bad_requests_get_typed_errors_and_serving_goes_on() {
    let file = WeightFile::open(&smollm2()).unwrap();
    let mut chain = servers(&file);
    let (good, _) = step(&mut chain, 1, 0, 0, vec![504, 3458, 282]);
    let forward = |input| StageForward {
        session: 7,
        step: 0,
        position: 0,
        input,
        sample: None,
    };
    let wide = WireTensor::from_f32(&vec![0.0; 2 * 575], &[2, 575], WireDType::F32).unwrap();
    let nan = WireTensor::from_f32(&[f32::NAN; 576], &[1, 576], WireDType::F16).unwrap();
    let mut short = WireTensor::from_f32(&[0.0; 576], &[1, 576], WireDType::F32).unwrap();
    short.data.truncate(100);
    let cases = [
        (
            0,
            forward(StageInputWire::Tokens(vec![999_999])),
            ErrorCode::BadRequest,
        ),
        (
            0,
            forward(StageInputWire::Tokens(vec![])),
            ErrorCode::BadRequest,
        ),
        (
            1,
            forward(StageInputWire::Hidden(wide)),
            ErrorCode::BadRequest,
        ),
        (
            1,
            forward(StageInputWire::Hidden(nan)),
            ErrorCode::BadRequest,
        ),
        (
            1,
            forward(StageInputWire::Hidden(short)),
            ErrorCode::BadRequest,
        ),
        (
            1,
            forward(StageInputWire::Tokens(vec![1])),
            ErrorCode::BadRequest,
        ),
        (
            0,
            StageForward {
                position: 40,
                ..forward(StageInputWire::Tokens(vec![1]))
            },
            ErrorCode::UnknownSession,
        ),
    ];
    for (server, req, code) in cases {
        let err = hop(&mut chain[server], req.clone()).unwrap_err();
        assert_eq!(err.code, code, "{req:?}: {}", err.message);
    }
    for s in chain.iter_mut() {
        s.end_session(1);
    }
    assert_eq!(step(&mut chain, 1, 0, 0, vec![504, 3458, 282]).0, good);
}

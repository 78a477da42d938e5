//! The stage scheduler: many sessions' steps submitted at once through two queues (a split
//! model) come back exactly as each session gets them alone, a long prefill is run in
//! chunks while decode steps beside it are answered, a bad step fails alone, and a cancelled
//! step is dropped.

use potluck_engine::llama::Stage;
use potluck_engine::rng::Rng;
use potluck_engine::synthetic::{write_gguf, SyntheticSpec};
use potluck_engine::weights::WeightFile;
use potluck_node::batcher::{BatchLimits, StageQueue};
use potluck_node::shard::ShardServer;
use potluck_protocol::messages::*;
use potluck_protocol::signed::Keypair;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const LAYERS: usize = 6;
const CUT: usize = 3;

fn model(dir: &tempfile::TempDir) -> WeightFile {
    let spec = SyntheticSpec {
        layers: LAYERS,
        context: 1024,
        dtype: candle_core::quantized::GgmlDType::Q8_0,
        ..SyntheticSpec::default()
    };
    let path = dir.path().join("m.gguf");
    write_gguf(&spec, &path).unwrap();
    WeightFile::open(&path).unwrap()
}

fn server(file: &WeightFile, range: std::ops::Range<usize>) -> ShardServer {
    let stage = Stage::load(file, range, 256 << 20).unwrap();
    let model = ModelRef {
        name: "synthetic".into(),
        digest: [3; 32],
    };
    ShardServer::new(stage, model, Keypair::from_secret(&[5; 32]), "Q8_0")
}

fn forward(session: u64, step: u64, position: usize, input: StageInputWire) -> StageForward {
    StageForward {
        session,
        step,
        position: position as u32,
        input,
        sample: None,
    }
}

/// Outputs of every step of one session: a prefill of `prompt`, then `decode` greedy tokens.
type Outputs = Vec<(StageOutputWire, StageOutputWire)>;

/// Runs one session's steps through `first` and `last`, alone or beside others.
async fn session<F, L>(id: u64, prompt: Vec<u32>, decode: usize, first: F, last: L) -> Outputs
where
    F: Fn(StageForward) -> tokio::sync::oneshot::Receiver<Result<StageResult, WireError>>,
    L: Fn(StageForward) -> tokio::sync::oneshot::Receiver<Result<StageResult, WireError>>,
{
    let mut out = Vec::new();
    let mut input = StageInputWire::Tokens(prompt.clone());
    let mut pos = 0;
    for step in 0..=decode as u64 {
        let n = match &input {
            StageInputWire::Tokens(t) => t.len(),
            StageInputWire::Hidden(_) => 1,
        };
        let a = first(forward(id, step, pos, input)).await.unwrap().unwrap();
        let StageOutputWire::Hidden(h) = a.output.clone() else {
            panic!("the first stage sent no hidden states")
        };
        let b = last(forward(id, step, pos, StageInputWire::Hidden(h)))
            .await
            .unwrap()
            .unwrap();
        let StageOutputWire::Token { token, .. } = b.output else {
            panic!("the last stage sent no token")
        };
        out.push((a.output, b.output.clone()));
        pos += n;
        input = StageInputWire::Tokens(vec![token]);
    }
    out
}

fn queues(file: &WeightFile, limits: BatchLimits) -> (Arc<StageQueue>, Arc<StageQueue>) {
    (
        Arc::new(StageQueue::start(server(file, 0..CUT), limits).unwrap()),
        Arc::new(StageQueue::start(server(file, CUT..LAYERS), limits).unwrap()),
    )
}

fn submitter(
    q: Arc<StageQueue>,
    cache: u64,
) -> impl Fn(StageForward) -> tokio::sync::oneshot::Receiver<Result<StageResult, WireError>> {
    move |req| q.submit(cache, req, Arc::new(AtomicBool::new(false)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_match_solo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(&dir);
    let mut rng = Rng::new(11);
    let scripts: Vec<(Vec<u32>, usize)> = (0..33)
        .map(|_| {
            let len = 1 + (rng.next_u64() % 60) as usize;
            let prompt = (0..len).map(|_| (rng.next_u64() % 250) as u32).collect();
            (prompt, 1 + (rng.next_u64() % 8) as usize)
        })
        .collect();
    // Alone: a fresh pair of queues per session, one step at a time.
    let mut alone = Vec::new();
    for (i, (prompt, decode)) in scripts.iter().enumerate() {
        let (a, b) = queues(&file, BatchLimits::DEFAULT);
        let id = i as u64;
        alone.push(
            session(
                id,
                prompt.clone(),
                *decode,
                submitter(a, id),
                submitter(b, id),
            )
            .await,
        );
    }
    // Together, with a small budget so prefills are chunked beside decode steps.
    let limits = BatchLimits {
        max_tokens: 24,
        max_sessions: 16,
    };
    let (a, b) = queues(&file, limits);
    let tasks: Vec<_> = scripts
        .iter()
        .enumerate()
        .map(|(i, (prompt, decode))| {
            let id = i as u64;
            tokio::spawn(session(
                id,
                prompt.clone(),
                *decode,
                submitter(a.clone(), id),
                submitter(b.clone(), id),
            ))
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let together = t.await.unwrap();
        assert!(
            together == alone[i],
            "session {i} got other outputs in a batch than alone"
        );
    }
    let stats = a.stats();
    assert!(
        stats.mean_rows() > 1.0,
        "steps were not batched (mean rows {})",
        stats.mean_rows()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prefill_runs_in_chunks_beside_decode_steps() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(&dir);
    let limits = BatchLimits {
        max_tokens: 32,
        max_sessions: 8,
    };
    let q = Arc::new(StageQueue::start(server(&file, 0..CUT), limits).unwrap());
    // A session that has prefilled and now decodes.
    let first = q
        .submit(
            1,
            forward(1, 0, 0, StageInputWire::Tokens(vec![4, 5])),
            Arc::default(),
        )
        .await
        .unwrap();
    assert!(first.is_ok());
    let long = q.submit(
        2,
        forward(2, 0, 0, StageInputWire::Tokens(vec![7; 600])),
        Arc::default(),
    );
    let decode = q.submit(
        1,
        forward(1, 1, 2, StageInputWire::Tokens(vec![9])),
        Arc::default(),
    );
    // The decode step is answered while the prefill still has chunks to run.
    tokio::pin!(long);
    tokio::select! {
        biased;
        d = decode => assert!(d.unwrap().is_ok()),
        _ = &mut long => panic!("the decode step waited for the whole prefill"),
    }
    let long = long.await.unwrap().unwrap();
    let StageOutputWire::Hidden(h) = long.output else {
        panic!("no hidden states")
    };
    assert_eq!(h.dims(), &[600, 64]);
    assert!(q.stats().batches.load(Ordering::Relaxed) >= 600 / 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_step_fails_alone_and_a_cancelled_one_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(&dir);
    let q = Arc::new(StageQueue::start(server(&file, 0..CUT), BatchLimits::DEFAULT).unwrap());
    let alone = q
        .submit(
            1,
            forward(1, 0, 0, StageInputWire::Tokens(vec![4, 5, 6])),
            Arc::default(),
        )
        .await
        .unwrap()
        .unwrap();
    q.end_session(1);
    let bad = [
        forward(2, 0, 0, StageInputWire::Tokens(vec![999_999])),
        forward(3, 0, 5, StageInputWire::Tokens(vec![1])),
        forward(4, 0, 0, StageInputWire::Tokens(vec![])),
        forward(5, 0, 1020, StageInputWire::Tokens(vec![1; 10])),
    ];
    let bad: Vec<_> = bad
        .into_iter()
        .enumerate()
        .map(|(i, r)| q.submit(10 + i as u64, r, Arc::default()))
        .collect();
    let good = q.submit(
        1,
        forward(1, 0, 0, StageInputWire::Tokens(vec![4, 5, 6])),
        Arc::default(),
    );
    for b in bad {
        let e = b.await.unwrap().unwrap_err();
        assert!(
            matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownSession),
            "{e:?}"
        );
    }
    assert_eq!(good.await.unwrap().unwrap().output, alone.output);
    // A cancelled step is never answered: its reply is dropped.
    let cancel = Arc::new(AtomicBool::new(true));
    let dropped = q.submit(
        20,
        forward(20, 0, 0, StageInputWire::Tokens(vec![3; 500])),
        cancel,
    );
    assert!(dropped.await.is_err());
}

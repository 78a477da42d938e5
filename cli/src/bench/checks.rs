//! `potluck bench --checks`: how far honest recomputations of stage results fall from the
//! originals, the numbers the spot checks' tolerances are set from. The model is cut into
//! two stages in this process; greedy sessions run step by step (as a pool runs them), then
//! each session is recomputed the two ways a checker can: replayed step by step (`exact`),
//! and as one batched request (`batched`, a prefill). Prints the distribution of each
//! distance and how many comparisons the tolerances would pass.

use crate::models::ModelCache;
use anyhow::{bail, Result};
use candle_core::Tensor;
use potluck_coordinator::compare::{compare, Verdict, SAME_CLASS};
use potluck_engine::llama::{Stage, StageInput, StageOutput};
use potluck_engine::sampling::top_logprobs;
use potluck_protocol::messages::StageOutputWire;
use potluck_protocol::tensor::{WireDType, WireTensor};

/// Distances of one kind, collected.
#[derive(Default)]
struct Dist {
    name: &'static str,
    values: Vec<f64>,
}

impl Dist {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            values: Vec::new(),
        }
    }

    fn print(&mut self) {
        if self.values.is_empty() {
            return;
        }
        self.values.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| self.values[((self.values.len() - 1) as f64 * p).round() as usize];
        println!(
            "  {:<22} n {:>6}  min {:.3e}  p50 {:.3e}  p99 {:.3e}  p99.9 {:.3e}  max {:.3e}",
            self.name,
            self.values.len(),
            q(0.0),
            q(0.5),
            q(0.99),
            q(0.999),
            q(1.0)
        );
    }
}

fn hidden_wire(t: &Tensor) -> Result<StageOutputWire> {
    let dims = t.dims().to_vec();
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(StageOutputWire::Hidden(WireTensor::from_f32(
        &v,
        &dims,
        WireDType::F32,
    )?))
}

fn token_wire(logits: &[f32]) -> StageOutputWire {
    let token = potluck_engine::llama::argmax(logits).unwrap_or(0);
    let (logprob, top) = top_logprobs(logits, token, 5);
    StageOutputWire::Token {
        token,
        logprob,
        top: top.into_iter().map(|t| (t.token, t.logprob)).collect(),
    }
}

/// One session's outputs, step by step: the first stage's hidden states and the last
/// stage's pick.
struct Run {
    inputs: Vec<Vec<u32>>,
    hidden: Vec<StageOutputWire>,
    tokens: Vec<StageOutputWire>,
}

fn run_session(stages: &mut [Stage], session: u64, prompt: &[u32], gen: usize) -> Result<Run> {
    let mut run = Run {
        inputs: Vec::new(),
        hidden: Vec::new(),
        tokens: Vec::new(),
    };
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..=gen {
        let StageOutput::Hidden(h) =
            stages[0].forward(session, pos, StageInput::Tokens(input.clone()))?
        else {
            bail!("the first stage returned logits");
        };
        run.hidden.push(hidden_wire(&h)?);
        let StageOutput::Logits(l) = stages[1].forward(session, pos, StageInput::Hidden(h))? else {
            bail!("the last stage returned hidden states");
        };
        let t = token_wire(&l);
        let StageOutputWire::Token { token, .. } = t else {
            bail!("no token");
        };
        run.tokens.push(t);
        pos += input.len();
        run.inputs.push(std::mem::take(&mut input));
        input.push(token);
    }
    for s in stages.iter_mut() {
        s.end_session(session);
    }
    Ok(run)
}

/// Runs `potluck bench --checks`: `sessions` greedy sessions of `gen` tokens.
pub fn run(cache: &ModelCache, model: &str, sessions: usize, gen: usize) -> Result<()> {
    let (mut stages, tok) = crate::generate::load_stages(cache, model, 2)?;
    let prompts = [
        "The capital of France is",
        "Write a haiku about sharing.",
        "1, 2, 3, 4, 5,",
        "Volunteers pool their idle computers so that",
        "What is the boiling point of water?",
        "Once upon a time",
    ];
    let mut d = [
        Dist::new("exact hidden 1-cos"),
        Dist::new("exact hidden rel_l2"),
        Dist::new("exact token logprob"),
        Dist::new("batched hidden 1-cos"),
        Dist::new("batched hidden rel_l2"),
        Dist::new("batched token logprob"),
    ];
    let mut verdicts = [[0usize; 3]; 2];
    let mut count = |i: usize, v: Verdict| verdicts[i][v as usize] += 1;
    for s in 0..sessions {
        let prompt = tok.encode(prompts[s % prompts.len()])?;
        let base = (s as u64 + 1) * 10;
        let orig = run_session(&mut stages, base, &prompt, gen)?;
        // Exact replay: the same requests, one by one, on a fresh session.
        let again = run_session(&mut stages, base + 1, &prompt, gen)?;
        for (a, b) in orig.hidden.iter().zip(&again.hidden) {
            let (c, _) = compare(a, b, &SAME_CLASS);
            d[0].values.push(1.0 - c.cos);
            d[1].values.push(c.rel_l2);
            count(0, c.verdict);
        }
        for (a, b) in orig.tokens.iter().zip(&again.tokens) {
            let (c, _) = compare(a, b, &SAME_CLASS);
            d[2].values.push(c.logprob);
            count(0, c.verdict);
        }
        // Batched: every input at once, every position's output.
        let all: Vec<u32> = orig.inputs.concat();
        let StageOutput::Hidden(h) = stages[0].forward(base + 2, 0, StageInput::Tokens(all))?
        else {
            bail!("the first stage returned logits");
        };
        let logits = stages[1].forward_all_logits(base + 2, 0, StageInput::Hidden(h.clone()))?;
        let mut at = 0;
        for (i, input) in orig.inputs.iter().enumerate() {
            let n = input.len();
            let rows = hidden_wire(&h.narrow(0, at, n)?)?;
            let (c, _) = compare(&orig.hidden[i], &rows, &SAME_CLASS);
            d[3].values.push(1.0 - c.cos);
            d[4].values.push(c.rel_l2);
            count(1, c.verdict);
            let row = logits.get(at + n - 1)?.to_vec1::<f32>()?;
            let (c, _) = compare(&orig.tokens[i], &token_wire(&row), &SAME_CLASS);
            d[5].values.push(c.logprob);
            count(1, c.verdict);
            at += n;
        }
        for st in stages.iter_mut() {
            st.end_session(base + 2);
        }
    }
    println!("honest distances, {sessions} sessions of {gen} tokens, model cut in two stages:");
    for x in &mut d {
        x.print();
    }
    for (name, v) in ["exact", "batched"].iter().zip(verdicts) {
        println!(
            "  {name:<8} verdicts at the same-class tolerance: {} pass, {} inconclusive, {} fail",
            v[0], v[1], v[2]
        );
    }
    Ok(())
}

/// Runs `potluck bench --detection`: how soon the pool's check policy (the real
/// [`potluck_coordinator::trust::Trust`]) catches a peer that corrupts a share `x` of its
/// jobs, for several floors `p_min`, over `trials` simulated peers, beside the
/// `1 - (1 - x p)^N` a fixed check rate `p` would give.
pub fn detection(trials: usize) -> Result<()> {
    use potluck_coordinator::trust::Trust;
    let horizons = [10usize, 50, 100, 500, 1000, 2000, 5000];
    println!(
        "detection probability within N jobs ({trials} simulated peers each; warm-up of {} checked jobs included)",
        potluck_coordinator::trust::WARMUP
    );
    println!(
        "  {:>6} {:>6}  {}",
        "p_min",
        "x",
        horizons
            .iter()
            .map(|n| format!("{:>15}", format!("N={n}")))
            .collect::<String>()
    );
    let mut rng = potluck_engine::rng::Rng::new(0x5EED);
    let max = *horizons.last().unwrap_or(&0);
    for p_min in [0.01, 0.05, 0.1] {
        for x in [0.01, 0.05, 0.2, 1.0] {
            // The job at which each simulated peer is caught (max + 1: never).
            let mut caught = Vec::with_capacity(trials);
            for t in 0..trials {
                let mut trust = Trust::new(p_min, t as u64);
                let mut at = max + 1;
                for job in 1..=max {
                    let checked = trust.pick(&0u8);
                    let corrupt = rng.next_f64() < x;
                    if checked && corrupt {
                        at = job;
                        break;
                    }
                    if checked {
                        trust.record(&0u8, potluck_coordinator::compare::Verdict::Pass, 0.0);
                    }
                }
                caught.push(at);
            }
            let cells: String = horizons
                .iter()
                .map(|&n| {
                    let got = caught.iter().filter(|&&c| c <= n).count() as f64 / trials as f64;
                    let formula = 1.0 - (1.0 - x * p_min).powi(n as i32);
                    format!("{:>15}", format!("{got:.3} ({formula:.3})"))
                })
                .collect();
            println!("  {p_min:>6} {x:>6}  {cells}");
        }
    }
    println!("  (each cell: simulated, and in brackets 1 - (1 - x p_min)^N)");
    Ok(())
}

//! Fault injection, for testing the pool's checks: a node told to corrupt a share of its
//! stage outputs (and signs them, as a real cheater would). The corrupting code exists
//! only in builds with the `fault-injection` cargo feature, which the test suite turns on;
//! other builds refuse the option.

use std::str::FromStr;

/// How an output is corrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Hidden states plus Gaussian noise (5% of their RMS); a wrong token.
    Noise,
    /// Hidden states all zero; token 0.
    Zeros,
    /// The stage's blocks skipped: its input handed on as its output (zeros after
    /// tokens); the token before.
    Skip,
    /// The session's previous output sent again (zeros when the shape differs).
    Stale,
    /// The output changed after the receipt was signed (the receipt no longer matches).
    Forge,
    /// The session's previous result, receipt and all, sent again as this step's answer.
    Replay,
    /// Work units only: the node takes the unit and never answers (a hung machine).
    Stall,
    /// Work units only: an honest output, but a token count one past `i64::MAX` claimed
    /// for credit (the count is outside the receipt).
    Inflate,
}

impl FaultKind {
    /// Whether this kind changes output values; the others work on receipts, time or
    /// claims.
    pub fn changes_values(self) -> bool {
        !matches!(
            self,
            FaultKind::Forge | FaultKind::Replay | FaultKind::Stall | FaultKind::Inflate
        )
    }
}

/// A node's fault plan: corrupt each output with probability `rate`, as `kind` says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// Share of outputs corrupted, 0..=1.
    pub rate: f64,
    /// How.
    pub kind: FaultKind,
    /// Seeds which outputs are hit.
    pub seed: u64,
}

/// Whether this build can inject faults.
pub const AVAILABLE: bool = cfg!(feature = "fault-injection");

impl FromStr for FaultPlan {
    type Err = String;

    /// `RATE:KIND[:SEED]`, e.g. `0.05:noise` or `1:stale:7`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let rate: f64 = parts
            .next()
            .and_then(|r| r.parse().ok())
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or("the rate must be a number from 0 to 1")?;
        let kind =
            match parts.next() {
                Some("noise") => FaultKind::Noise,
                Some("zeros") => FaultKind::Zeros,
                Some("skip") => FaultKind::Skip,
                Some("stale") => FaultKind::Stale,
                Some("forge") => FaultKind::Forge,
                Some("replay") => FaultKind::Replay,
                Some("stall") => FaultKind::Stall,
                Some("inflate") => FaultKind::Inflate,
                _ => return Err(
                    "the kind must be noise, zeros, skip, stale, forge, replay, stall or inflate"
                        .into(),
                ),
            };
        let seed = match parts.next() {
            None => 1,
            Some(n) => n.parse().map_err(|_| "the seed must be a number")?,
        };
        if parts.next().is_some() {
            return Err("expected RATE:KIND[:SEED]".into());
        }
        Ok(Self { rate, kind, seed })
    }
}

#[cfg(feature = "fault-injection")]
pub use inject::Injector;

#[cfg(feature = "fault-injection")]
mod inject {
    use super::{FaultKind, FaultPlan};
    use potluck_engine::rng::Rng;
    use potluck_protocol::messages::{StageInputWire, StageOutputWire, StageResult, WorkOutput};
    use potluck_protocol::tensor::{WireDType, WireTensor};
    use std::collections::HashMap;

    /// Applies a [`FaultPlan`] to a stage's outputs.
    pub struct Injector {
        plan: FaultPlan,
        rng: Rng,
        /// Each session's last honest output, for [`FaultKind::Stale`].
        last: HashMap<u64, StageOutputWire>,
        /// Each session's last signed result, for [`FaultKind::Replay`].
        last_result: HashMap<u64, StageResult>,
    }

    impl Injector {
        /// An injector for `plan`.
        pub fn new(plan: FaultPlan) -> Self {
            Self {
                plan,
                rng: Rng::new(plan.seed),
                last: HashMap::new(),
                last_result: HashMap::new(),
            }
        }

        /// A signed result for session `cache`, tampered with as receipt-level faults say.
        pub fn tamper(&mut self, cache: u64, mut result: StageResult) -> StageResult {
            let kind = self.plan.kind;
            if !matches!(kind, FaultKind::Forge | FaultKind::Replay) {
                return result;
            }
            let previous = self.last_result.insert(cache, result.clone());
            if self.rng.next_f64() >= self.plan.rate {
                return result;
            }
            match (kind, previous) {
                (FaultKind::Replay, Some(mut old)) => {
                    // The echo is rewritten; the receipt cannot be.
                    old.session = result.session;
                    old.step = result.step;
                    old
                }
                // Nothing to replay yet: the answer goes out honest.
                (FaultKind::Replay, None) => result,
                _ => {
                    if let StageOutputWire::Token { token, .. } = &mut result.output {
                        *token = token.checked_sub(1).unwrap_or(1);
                    } else if let StageOutputWire::Hidden(h) = &mut result.output {
                        if let Some(b) = h.data.first_mut() {
                            *b ^= 0x40;
                        }
                    }
                    result
                }
            }
        }

        /// Whether this work unit should hang instead of answering.
        pub fn stalls(&mut self) -> bool {
            self.plan.kind == FaultKind::Stall && self.rng.next_f64() < self.plan.rate
        }

        /// The token count a work unit claims: `tokens`, or one past `i64::MAX` when the
        /// plan inflates it.
        pub fn claimed_tokens(&mut self, tokens: u64) -> u64 {
            if self.plan.kind == FaultKind::Inflate && self.rng.next_f64() < self.plan.rate {
                return (i64::MAX as u64) + 1;
            }
            tokens
        }

        /// A work unit's output, corrupted or not: noise moves each vector (kept unit
        /// length, as a careful cheater would) or changes a completion's text; zeros and the
        /// rest return one constant answer. Receipt-level kinds leave work alone.
        pub fn corrupt_work(&mut self, output: WorkOutput) -> WorkOutput {
            if !self.plan.kind.changes_values() || self.rng.next_f64() >= self.plan.rate {
                return output;
            }
            match output {
                WorkOutput::Embeddings(t) => {
                    let dims = t.dims();
                    let Ok(mut v) = t.to_f32() else {
                        return WorkOutput::Embeddings(t);
                    };
                    let width = dims.get(1).copied().unwrap_or(1).max(1);
                    for row in v.chunks_mut(width) {
                        if self.plan.kind == FaultKind::Noise {
                            let rms =
                                (row.iter().map(|x| x * x).sum::<f32>() / width as f32).sqrt();
                            for x in row.iter_mut() {
                                *x += 0.3 * rms * self.rng.normal();
                            }
                        } else {
                            row.iter_mut().for_each(|x| *x = 0.0);
                            row[0] = 1.0;
                        }
                        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                        row.iter_mut().for_each(|x| *x /= norm);
                    }
                    match WireTensor::from_f32(&v, &dims, WireDType::F32) {
                        Ok(c) => WorkOutput::Embeddings(c),
                        Err(_) => WorkOutput::Embeddings(t),
                    }
                }
                WorkOutput::Completion {
                    text,
                    generated,
                    stopped,
                } => WorkOutput::Completion {
                    text: match self.plan.kind {
                        FaultKind::Noise => format!("{text} (and a made-up ending)"),
                        _ => String::new(),
                    },
                    generated,
                    stopped,
                },
            }
        }

        /// `output` as computed for session `cache` from `input`, corrupted or not.
        pub fn apply(
            &mut self,
            cache: u64,
            input: &StageInputWire,
            output: StageOutputWire,
        ) -> StageOutputWire {
            let previous = self.last.insert(cache, output.clone());
            if !self.plan.kind.changes_values() || self.rng.next_f64() >= self.plan.rate {
                return output;
            }
            tracing::debug!(kind = ?self.plan.kind, "corrupting an output");
            match output {
                StageOutputWire::Hidden(h) => {
                    let dims = h.dims();
                    let Ok(mut v) = h.to_f32() else {
                        return StageOutputWire::Hidden(h);
                    };
                    match self.plan.kind {
                        FaultKind::Noise => {
                            let rms = (v.iter().map(|x| x * x).sum::<f32>()
                                / v.len().max(1) as f32)
                                .sqrt();
                            for x in &mut v {
                                *x += 0.05 * rms * self.rng.normal();
                            }
                        }
                        FaultKind::Zeros => v.iter_mut().for_each(|x| *x = 0.0),
                        FaultKind::Skip => match input {
                            StageInputWire::Hidden(i) if i.dims() == dims => {
                                v = i.to_f32().unwrap_or_else(|_| vec![0.0; v.len()]);
                            }
                            _ => v.iter_mut().for_each(|x| *x = 0.0),
                        },
                        FaultKind::Stale => match previous {
                            Some(StageOutputWire::Hidden(p)) if p.dims() == dims => {
                                return StageOutputWire::Hidden(p);
                            }
                            _ => v.iter_mut().for_each(|x| *x = 0.0),
                        },
                        // Receipt-level faults: see `tamper`; stalls: see `stalls`.
                        FaultKind::Forge
                        | FaultKind::Replay
                        | FaultKind::Stall
                        | FaultKind::Inflate => {}
                    }
                    match WireTensor::from_f32(&v, &dims, WireDType::F32) {
                        Ok(t) => StageOutputWire::Hidden(t),
                        Err(_) => StageOutputWire::Hidden(h),
                    }
                }
                StageOutputWire::Token {
                    token,
                    logprob,
                    top,
                } => {
                    let wrong = match self.plan.kind {
                        // A neighbour id: valid in any vocabulary, never the right one.
                        FaultKind::Noise => token.checked_sub(1).unwrap_or(1),
                        FaultKind::Zeros => 0,
                        FaultKind::Skip | FaultKind::Stale => match previous {
                            Some(StageOutputWire::Token { token: t, .. }) => t,
                            _ => 0,
                        },
                        FaultKind::Forge
                        | FaultKind::Replay
                        | FaultKind::Stall
                        | FaultKind::Inflate => token,
                    };
                    StageOutputWire::Token {
                        token: wrong,
                        logprob,
                        top,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_bad_ones_say_why() {
        assert_eq!(
            "0.05:noise".parse(),
            Ok(FaultPlan {
                rate: 0.05,
                kind: FaultKind::Noise,
                seed: 1
            })
        );
        assert_eq!(
            "1:stale:7".parse::<FaultPlan>().map(|p| (p.kind, p.seed)),
            Ok((FaultKind::Stale, 7))
        );
        for bad in [
            "",
            "2:noise",
            "x:noise",
            "0.5",
            "0.5:melt",
            "0.5:zeros:x",
            "1:skip:1:2",
        ] {
            assert!(bad.parse::<FaultPlan>().is_err(), "{bad}");
        }
    }
}

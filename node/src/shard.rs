//! The stage server: holds the blocks a node was assigned, answers [`StageForward`] requests
//! from the wire with [`StageResult`]s, and signs a receipt for each. Bad requests get a typed
//! [`WireError`] and the server keeps serving every session.

use crate::wire::{engine_error, wire_error};
use candle_core::{Device, Tensor};
use potluck_engine::llama::{argmax, BatchItem, Stage, StageInput, StageOutput};
use potluck_engine::sampling::{top_logprobs, Sampler, SamplingParams};
use potluck_engine::EngineError;
use potluck_protocol::messages::{
    ErrorCode, LayerRange, ModelRef, NumericClass, Receipt, ReceiptBody, SampleSpec, StageForward,
    StageInputWire, StageOutputWire, StageResult, WireError,
};
use potluck_protocol::receipt::{input_id, job_id, output_id};
use potluck_protocol::signed::Keypair;
use potluck_protocol::tensor::{WireDType, WireTensor};

/// Most top log-probabilities a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A loaded stage plus what its receipts claim.
pub struct ShardServer {
    stage: Stage,
    model: ModelRef,
    layers: LayerRange,
    numeric: NumericClass,
    key: Keypair,
    #[cfg(feature = "fault-injection")]
    faults: Option<crate::fault::Injector>,
}

impl ShardServer {
    /// Serves `stage`, a slice of `model`, signing receipts with `key`. `weights` names the
    /// weight type for the receipts' numeric class (e.g. "Q4_1").
    pub fn new(stage: Stage, model: ModelRef, key: Keypair, weights: &str) -> Self {
        let blocks = stage.blocks();
        let layers = LayerRange {
            start: blocks.start as u32,
            end: blocks.end as u32,
        };
        let numeric = NumericClass {
            weights: weights.to_string(),
            accumulation: "f32".into(),
            device: potluck_protocol::messages::DeviceKind::Cpu,
        };
        Self {
            stage,
            model,
            layers,
            numeric,
            key,
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }

    /// Corrupts outputs as `plan` says (test builds only; see [`crate::fault`]).
    #[cfg(feature = "fault-injection")]
    pub fn with_faults(mut self, plan: Option<crate::fault::FaultPlan>) -> Self {
        self.faults = plan.map(crate::fault::Injector::new);
        self
    }

    /// The blocks served.
    pub fn layers(&self) -> LayerRange {
        self.layers
    }

    /// Forgets a session's cache.
    pub fn end_session(&mut self, session: u64) -> bool {
        self.stage.end_session(session)
    }

    /// Runs one request alone and signs the result (what [`ShardServer::advance`] does for a
    /// batch of one, all its positions at once).
    pub fn handle(&mut self, cache: u64, req: &StageForward) -> Result<StageResult, WireError> {
        let mut step = self.prepare(cache, req.clone())?;
        let take = step.remaining();
        self.advance(&mut [(&mut step, take)])
            .pop()
            .flatten()
            .unwrap_or_else(|| Err(wire_error(ErrorCode::Internal, "step did not finish")))
    }

    /// Checks a request and converts its input: a bad one fails here, alone.
    pub fn prepare(&self, cache: u64, req: StageForward) -> Result<Step, WireError> {
        // Before any tensor is widened: a frame past the context costs nothing to refuse.
        let context = self.stage.config().context;
        let needed = (req.position as usize).saturating_add(req.input.positions());
        if needed > context {
            return Err(engine_error(EngineError::ContextOverflow {
                needed,
                context,
            }));
        }
        let input = self.input(&req.input)?;
        let len = input.len();
        if len == 0 {
            return Err(wire_error(ErrorCode::BadRequest, "empty input"));
        }
        Ok(Step {
            cache,
            req,
            input,
            len,
            done: 0,
            hidden: Vec::new(),
        })
    }

    /// Runs the next `take` positions of every step as one batch through the stage. Per step:
    /// `None` while positions remain, else its signed result or its error (a bad step fails
    /// alone; the others go on).
    pub fn advance(
        &mut self,
        steps: &mut [(&mut Step, usize)],
    ) -> Vec<Option<Result<StageResult, WireError>>> {
        for (s, take) in steps.iter_mut() {
            *take = (*take).clamp(1, s.remaining().max(1));
        }
        let items: Vec<BatchItem> = steps
            .iter()
            .map(|(s, take)| s.next_item(*take))
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        if items.len() != steps.len() {
            return steps
                .iter()
                .map(|_| {
                    Some(Err(wire_error(
                        ErrorCode::Internal,
                        "cannot slice the input",
                    )))
                })
                .collect();
        }
        let total = self.stage.kv().budget();
        let refusal = |e| match e {
            // Never fits, however long it waits.
            EngineError::KvBudget { needed, .. } if needed > total => wire_error(
                ErrorCode::BadRequest,
                format!("the session needs {needed} bytes of cache; this stage has {total}"),
            ),
            e => engine_error(e),
        };
        let outputs = self.stage.forward_batch(items);
        let mut answers = Vec::with_capacity(steps.len());
        for ((step, take), out) in steps.iter_mut().zip(outputs) {
            let out = match out {
                Err(e) => {
                    answers.push(Some(Err(refusal(e))));
                    continue;
                }
                Ok(o) => o,
            };
            step.done += *take;
            let finished = step.done >= step.len;
            let output = match out {
                StageOutput::Hidden(h) => {
                    step.hidden.push(h);
                    if !finished {
                        answers.push(None);
                        continue;
                    }
                    self.hidden_output(std::mem::take(&mut step.hidden))
                }
                StageOutput::Logits(_) if !finished => {
                    answers.push(None);
                    continue;
                }
                StageOutput::Logits(logits) => pick(&logits, step.req.sample.as_ref()),
            };
            answers.push(Some(output.and_then(|o| self.finish(step, o))));
        }
        answers
    }

    /// A non-last stage's answer: every position's hidden states, chunks joined.
    fn hidden_output(&self, parts: Vec<Tensor>) -> Result<StageOutputWire, WireError> {
        let h = if parts.len() == 1 {
            parts
                .into_iter()
                .next()
                .ok_or_else(|| wire_error(ErrorCode::Internal, "no rows"))?
        } else {
            Tensor::cat(&parts, 0).map_err(|e| engine_error(e.into()))?
        };
        let dims = h.dims().to_vec();
        let values = h
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| engine_error(e.into()))?;
        let t = WireTensor::from_f32(&values, &dims, WireDType::F32)
            .map_err(|e| wire_error(ErrorCode::Internal, e.to_string()))?;
        Ok(StageOutputWire::Hidden(t))
    }

    /// Signs a finished step's output (after any injected fault, in test builds).
    fn finish(&mut self, step: &Step, output: StageOutputWire) -> Result<StageResult, WireError> {
        let (cache, req) = (step.cache, &step.req);
        #[cfg(feature = "fault-injection")]
        let output = match &mut self.faults {
            Some(f) => f.apply(cache, &req.input, output),
            None => output,
        };
        let signed = self.sign(req, output)?;
        #[cfg(feature = "fault-injection")]
        let signed = match &mut self.faults {
            Some(f) => f.tamper(cache, signed),
            None => signed,
        };
        #[cfg(not(feature = "fault-injection"))]
        let _ = cache;
        Ok(signed)
    }

    /// Signs `output` as the answer to `req`.
    fn sign(&self, req: &StageForward, output: StageOutputWire) -> Result<StageResult, WireError> {
        let bad =
            |e: potluck_protocol::ProtocolError| wire_error(ErrorCode::Internal, e.to_string());
        let body = ReceiptBody {
            job: job_id(req).map_err(bad)?,
            input: input_id(&req.input).map_err(bad)?,
            output: output_id(&output).map_err(bad)?,
            model: self.model.digest,
            layers: self.layers,
            numeric: self.numeric.clone(),
        };
        let receipt = Receipt::sign(body, &self.key).map_err(bad)?;
        Ok(StageResult {
            session: req.session,
            step: req.step,
            output,
            receipt,
        })
    }

    /// Checks and converts a wire input for this stage.
    fn input(&self, input: &StageInputWire) -> Result<StageInput, WireError> {
        let hidden = self.stage.config().hidden;
        match input {
            StageInputWire::Tokens(t) => Ok(StageInput::Tokens(t.clone())),
            StageInputWire::Hidden(w) => {
                let dims = w.dims();
                if dims.len() != 2 || dims[1] != hidden {
                    return Err(wire_error(
                        ErrorCode::BadRequest,
                        format!("hidden states must be (n, {hidden}), got {dims:?}"),
                    ));
                }
                let values = w
                    .to_f32()
                    .map_err(|e| wire_error(ErrorCode::BadRequest, e.to_string()))?;
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(wire_error(
                        ErrorCode::BadRequest,
                        "hidden states hold NaN or infinity",
                    ));
                }
                let t = Tensor::from_vec(values, (dims[0], hidden), &Device::Cpu)
                    .map_err(|e| engine_error(e.into()))?;
                Ok(StageInput::Hidden(t))
            }
        }
    }
}

/// A request being served: its input, checked, and how far it has run. Long prefills run a
/// chunk per batch so they never hold other sessions' next tokens back.
pub struct Step {
    cache: u64,
    req: StageForward,
    input: StageInput,
    len: usize,
    done: usize,
    hidden: Vec<Tensor>,
}

impl Step {
    /// The session cache it runs in.
    pub fn cache(&self) -> u64 {
        self.cache
    }

    /// Positions not yet run.
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Whether this is a one-position step (decode) rather than a prefill or replay.
    pub fn is_decode(&self) -> bool {
        self.len == 1
    }

    /// The engine's view of the next `take` positions.
    fn next_item(&self, take: usize) -> Result<BatchItem, WireError> {
        let input = match &self.input {
            StageInput::Tokens(t) => StageInput::Tokens(
                t.get(self.done..self.done + take)
                    .ok_or_else(|| wire_error(ErrorCode::Internal, "step past its input"))?
                    .to_vec(),
            ),
            StageInput::Hidden(h) => StageInput::Hidden(
                h.narrow(0, self.done, take)
                    .map_err(|e| engine_error(e.into()))?,
            ),
        };
        Ok(BatchItem {
            session: self.cache,
            pos: self.req.position as usize + self.done,
            input,
        })
    }
}

/// The last stage's choice: sampled as the request says, or greedy when it says nothing.
fn pick(logits: &[f32], spec: Option<&SampleSpec>) -> Result<StageOutputWire, WireError> {
    let (token, k) = match spec {
        None => (
            argmax(logits).ok_or_else(|| wire_error(ErrorCode::Internal, "no logits"))?,
            0,
        ),
        Some(s) => {
            let params = SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k as usize,
                top_p: s.top_p,
                min_p: s.min_p,
                repetition_penalty: s.repetition_penalty,
                seed: s.seed,
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(params).map_err(engine_error)?;
            (
                sampler.sample(logits, &s.history).map_err(engine_error)?,
                (s.top_logprobs as usize).min(MAX_TOP_LOGPROBS),
            )
        }
    };
    let (logprob, top) = top_logprobs(logits, token, k);
    Ok(StageOutputWire::Token {
        token,
        logprob,
        top: top.into_iter().map(|t| (t.token, t.logprob)).collect(),
    })
}

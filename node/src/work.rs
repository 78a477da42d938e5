//! Work units: whole-model jobs (embedding a slice of texts, a greedy completion) that a node
//! runs on a model it holds entirely, one at a time, signing a receipt for each result. Models load on first use
//! and stay loaded; a bad unit gets a typed error and the node keeps serving.

use crate::local_model::LocalModel;
use crate::wire::{engine_error, wire_error};
use potluck_engine::bert::Encoder;
use potluck_engine::generate::{generate, load_tokenizer, FinishReason, GenerateRequest};
use potluck_engine::llama::{Stage, DEFAULT_KV_BUDGET};
use potluck_engine::sampling::{Sampler, SamplingParams};
use potluck_engine::tokenizer::TextTokenizer;
use potluck_engine::weights::WeightFile;
use potluck_engine::EngineError;
use potluck_protocol::messages::{
    DeviceKind, ErrorCode, LayerRange, ModelRef, NumericClass, Receipt, ReceiptBody, WireError,
    WorkOutput, WorkRequest, WorkResult, WorkTask,
};
use potluck_protocol::receipt::work_ids;
use potluck_protocol::signed::Keypair;
use potluck_protocol::tensor::{WireDType, WireTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Most tokens one completion unit may ask for.
pub const MAX_UNIT_TOKENS: u32 = 4096;

/// A whole decoder model held for completion units.
struct Decoder {
    stage: Stage,
    tokenizer: TextTokenizer,
    weights: String,
}

/// Runs work units on the node's cached models.
pub struct Workers {
    models: Vec<LocalModel>,
    key: Keypair,
    encoders: Mutex<HashMap<ModelRef, Arc<Encoder>>>,
    decoders: Mutex<HashMap<ModelRef, Arc<Mutex<Decoder>>>>,
    // Units share the node's compute threads: one at a time keeps each fast and the owner's
    // thread limit true.
    gate: tokio::sync::Semaphore,
    /// Outputs to corrupt (test builds only).
    #[cfg(feature = "fault-injection")]
    faults: Option<Mutex<crate::fault::Injector>>,
}

impl Workers {
    /// Workers for the cached `models`, signing with `key`; `faults` corrupts results on
    /// purpose (test builds only, see [`crate::fault`]).
    pub fn new(
        models: Vec<LocalModel>,
        key: Keypair,
        #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))] faults: Option<
            crate::fault::FaultPlan,
        >,
    ) -> Self {
        Self {
            #[cfg(feature = "fault-injection")]
            faults: faults.map(|p| Mutex::new(crate::fault::Injector::new(p))),
            models,
            key,
            encoders: Mutex::new(HashMap::new()),
            decoders: Mutex::new(HashMap::new()),
            gate: tokio::sync::Semaphore::new(1),
        }
    }

    /// Runs `req` and signs its result.
    pub async fn run(&self, req: WorkRequest) -> Result<WorkResult, WireError> {
        let _turn = self
            .gate
            .acquire()
            .await
            .map_err(|_| wire_error(ErrorCode::Internal, "work queue closed"))?;
        #[cfg(feature = "fault-injection")]
        if self
            .faults
            .as_ref()
            .and_then(|f| f.lock().ok().map(|mut f| f.stalls()))
            .unwrap_or(false)
        {
            // Hung, as a machine that froze: the coordinator's timeout must notice.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        let (output, tokens, weights) = match &req.task {
            WorkTask::Embed(texts) => self.embed(&req.model, texts.clone()).await?,
            WorkTask::Complete { prompt, max_tokens } => {
                self.complete(&req.model, req.unit, prompt.clone(), *max_tokens)
                    .await?
            }
        };
        #[cfg(feature = "fault-injection")]
        let (output, tokens) = match &self.faults {
            Some(f) => match f.lock() {
                Ok(mut f) => (f.corrupt_work(output), f.claimed_tokens(tokens)),
                Err(_) => (output, tokens),
            },
            None => (output, tokens),
        };
        self.sign(&req, output, tokens, weights)
    }

    async fn embed(
        &self,
        model: &ModelRef,
        texts: Vec<String>,
    ) -> Result<(WorkOutput, u64, String), WireError> {
        let encoder = self.encoder(model).await?;
        let (vectors, tokens) = tokio::task::spawn_blocking(move || encoder.embed(&texts))
            .await
            .map_err(|e| wire_error(ErrorCode::Internal, e.to_string()))?
            .map_err(engine_error)?;
        let dims = vectors.first().map_or(0, Vec::len);
        let flat: Vec<f32> = vectors.concat();
        let tensor = WireTensor::from_f32(&flat, &[vectors.len(), dims], WireDType::F32)
            .map_err(|e| wire_error(ErrorCode::Internal, e.to_string()))?;
        Ok((WorkOutput::Embeddings(tensor), tokens, "F32".into()))
    }

    /// A greedy completion on the whole model; tokens counted are prompt plus generated.
    async fn complete(
        &self,
        model: &ModelRef,
        unit: u64,
        prompt: Vec<u32>,
        max_tokens: u32,
    ) -> Result<(WorkOutput, u64, String), WireError> {
        if max_tokens > MAX_UNIT_TOKENS {
            return Err(wire_error(
                ErrorCode::BadRequest,
                format!("{max_tokens} tokens asked; a unit may ask for at most {MAX_UNIT_TOKENS}"),
            ));
        }
        let decoder = self.decoder(model).await?;
        tokio::task::spawn_blocking(move || {
            let mut d = decoder
                .lock()
                .map_err(|_| wire_error(ErrorCode::Internal, "decoder poisoned"))?;
            let Decoder {
                stage,
                tokenizer,
                weights,
            } = &mut *d;
            let mut sampler = Sampler::new(SamplingParams::default()).map_err(engine_error)?;
            let req = GenerateRequest {
                prompt: &prompt,
                max_tokens: max_tokens as usize,
                stop: &[],
            };
            let (text, stats) = generate(
                std::slice::from_mut(stage),
                tokenizer,
                unit,
                &req,
                &mut sampler,
                |_| {},
            )
            .map_err(engine_error)?;
            let output = WorkOutput::Completion {
                text,
                generated: stats.generated_tokens as u32,
                stopped: stats.finish == FinishReason::Stop,
            };
            let tokens = (stats.prompt_tokens + stats.generated_tokens) as u64;
            Ok((output, tokens, weights.clone()))
        })
        .await
        .map_err(|e| wire_error(ErrorCode::Internal, e.to_string()))?
    }

    fn sign(
        &self,
        req: &WorkRequest,
        output: WorkOutput,
        tokens: u64,
        weights: String,
    ) -> Result<WorkResult, WireError> {
        let internal =
            |e: potluck_protocol::ProtocolError| wire_error(ErrorCode::Internal, e.to_string());
        let (job, input, out) = work_ids(req, &output).map_err(internal)?;
        let body = ReceiptBody {
            job,
            input,
            output: out,
            model: req.model.digest,
            // A whole-model unit: no layer range applies.
            layers: LayerRange { start: 0, end: 0 },
            numeric: NumericClass {
                weights,
                accumulation: "f32".into(),
                device: DeviceKind::Cpu,
            },
        };
        let receipt = Receipt::sign(body, &self.key).map_err(internal)?;
        Ok(WorkResult {
            unit: req.unit,
            output,
            tokens,
            receipt,
        })
    }

    /// Where `model` is in the cache.
    fn path_of(&self, model: &ModelRef) -> Result<PathBuf, WireError> {
        self.models
            .iter()
            .find(|m| &m.model == model)
            .map(|m| m.path.clone())
            .ok_or_else(|| {
                wire_error(
                    ErrorCode::NotServing,
                    format!("model {} is not in this node's cache", model.name),
                )
            })
    }

    /// The whole decoder `model`, loading it on first use.
    async fn decoder(&self, model: &ModelRef) -> Result<Arc<Mutex<Decoder>>, WireError> {
        self.load_once(&self.decoders, model, false, |path| {
            let file = WeightFile::open(path)?;
            let layers = file.config()?.layers;
            Ok(Mutex::new(Decoder {
                stage: Stage::load(&file, 0..layers, DEFAULT_KV_BUDGET)?,
                tokenizer: load_tokenizer(&file)?,
                weights: crate::local_model::weight_label(&file),
            }))
        })
        .await
    }

    /// The loaded encoder for `model`, loading it on first use.
    async fn encoder(&self, model: &ModelRef) -> Result<Arc<Encoder>, WireError> {
        self.load_once(&self.encoders, model, true, Encoder::load)
            .await
    }

    /// `model` as `loaded` holds it, loaded by `load` (off the async threads) on first use.
    /// `encoder` says whether it must be a sentence encoder or a decoder.
    async fn load_once<T: Send + Sync + 'static>(
        &self,
        loaded: &Mutex<HashMap<ModelRef, Arc<T>>>,
        model: &ModelRef,
        encoder: bool,
        load: impl FnOnce(&Path) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<Arc<T>, WireError> {
        if let Some(m) = loaded.lock().ok().and_then(|m| m.get(model).cloned()) {
            return Ok(m);
        }
        let path = self.path_of(model)?;
        if Encoder::is_encoder_dir(&path) != encoder {
            let is = if encoder {
                "is not a sentence encoder"
            } else {
                "is a sentence encoder, not a decoder"
            };
            return Err(wire_error(
                ErrorCode::NotServing,
                format!("model {} {is}", model.name),
            ));
        }
        let value = tokio::task::spawn_blocking(move || load(&path))
            .await
            .map_err(|e| wire_error(ErrorCode::Internal, e.to_string()))?
            .map_err(engine_error)?;
        let value = Arc::new(value);
        tracing::info!(model = %model.name, encoder, "model loaded for work units");
        if let Ok(mut m) = loaded.lock() {
            m.insert(model.clone(), value.clone());
        }
        Ok(value)
    }
}

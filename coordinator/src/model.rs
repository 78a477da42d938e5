//! The model a coordinator serves: its name and digest (what nodes must hold), its geometry
//! (what the planner sizes stages by) and its tokenizer and chat template (what sessions
//! need). The coordinator never loads the weights themselves.

use crate::capacity::KvGeometry;
use crate::planner::ModelShape;
use potluck_engine::config::LlamaConfig;
use potluck_engine::generate::load_tokenizer;
use potluck_engine::kv_cache::STAGE_SCRATCH_BYTES;
use potluck_engine::tokenizer::TextTokenizer;
use potluck_engine::weights::WeightFile;
use potluck_engine::EngineError;
use potluck_protocol::messages::ModelRef;
use std::path::Path;

/// Positions of KV cache the planner keeps room for on every block.
pub const PLANNED_CONTEXT: u64 = 2048;

/// Everything the coordinator knows about its model.
pub struct ServedModel {
    /// Name and digest, as nodes advertise it.
    pub model: ModelRef,
    /// What the planner needs.
    pub shape: ModelShape,
    /// What sizing the pool's session count needs.
    pub kv: KvGeometry,
    /// Geometry.
    pub config: LlamaConfig,
    /// Tokenizer and chat template.
    pub tokenizer: TextTokenizer,
}

impl ServedModel {
    /// Reads `path`'s metadata and tokenizer; `model` is its name and checked digest.
    pub fn open(path: &Path, model: ModelRef) -> Result<Self, EngineError> {
        let file = WeightFile::open(path)?;
        let config = file.config()?;
        let (block_bytes, edge_bytes) = file.footprint();
        let kv_per_block = config.kv_bytes_per_position() as u64;
        let shape = ModelShape {
            layers: config.layers as u32,
            layer_bytes: block_bytes + kv_per_block * PLANNED_CONTEXT,
            edge_bytes,
            reserve_bytes: STAGE_SCRATCH_BYTES,
        };
        let kv = KvGeometry {
            layers: shape.layers,
            block_bytes,
            edge_bytes,
            kv_bytes_per_block_position: kv_per_block,
        };
        let tokenizer = load_tokenizer(&file)?;
        Ok(Self {
            model,
            shape,
            kv,
            config,
            tokenizer,
        })
    }
}

/// The sentence encoder a pool serves embeddings with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingModel {
    /// Name and digest, as nodes advertise it.
    pub model: ModelRef,
    /// Multiply-adds per token, for credit.
    pub flops_per_token: u64,
}

impl EmbeddingModel {
    /// Reads the encoder folder at `path`; `model` is its name and checked digest.
    pub fn open(path: &Path, model: ModelRef) -> Result<Self, EngineError> {
        let config = potluck_engine::bert::BertConfig::load(path)?;
        Ok(Self {
            model,
            flops_per_token: config.flops_per_token(),
        })
    }
}

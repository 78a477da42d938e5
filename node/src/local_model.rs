//! A model file in the node's cache, as the pool names it: what the stage server loads
//! blocks from and the work runner loads whole models from, and the weight type receipts
//! name for it.

use potluck_engine::weights::WeightFile;
use potluck_protocol::messages::ModelRef;
use std::path::PathBuf;

/// A model file in the node's cache, as the pool names it.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// Name and digest.
    pub model: ModelRef,
    /// Where the weights are.
    pub path: PathBuf,
}

/// The weight type receipts name: the type of the first block's down projection in a GGUF,
/// the stored float type's stand-in for safetensors (held as f32).
pub(crate) fn weight_label(file: &WeightFile) -> String {
    match file {
        WeightFile::Gguf(g) => g
            .content()
            .tensor_infos
            .get("blk.0.ffn_down.weight")
            .map_or_else(|| "unknown".into(), |t| format!("{:?}", t.ggml_dtype)),
        WeightFile::Safetensors { .. } => "F32".into(),
    }
}

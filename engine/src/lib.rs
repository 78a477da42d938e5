//! Potluck's model engine: runs any contiguous range of a Llama-family model's blocks (a
//! *stage*) on candle, from GGUF or safetensors weights, with per-session KV caches, a
//! tokenizer, chat templates and seeded sampling. It knows nothing of networks or HTTP.

pub mod attention;
pub mod bert;
pub mod cache;
pub mod chat;
pub mod config;
pub mod dense;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod normalizer_growth;
mod parallel;
pub mod quant_matmul;
pub mod rng;
mod rows;
pub mod sampling;
pub mod simd;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};

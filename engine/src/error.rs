//! Typed errors for everything the engine can refuse: bad files, bad inputs, exhausted budgets.

use thiserror::Error;

/// Why the engine refused or failed a request. Every variant is recoverable for the caller:
/// a stage that returns one keeps serving other sessions.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The model file could not be read at all.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a well-formed model (truncated, bad magic, missing tensors, ...).
    #[error("invalid model file: {0}")]
    InvalidModel(String),
    /// The file is well-formed but describes something this engine does not run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A request that does not fit the stage (wrong shape, token id, position, ...).
    #[error("bad input: {0}")]
    BadInput(String),
    /// The prompt plus generated tokens would exceed the model's context window.
    #[error("context overflow: {needed} positions needed, the model's context is {context}")]
    ContextOverflow {
        /// Positions the request needs.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// A session's KV cache cannot fit in the stage's memory budget even alone.
    #[error("KV cache budget exceeded: session needs {needed} bytes, budget is {budget}")]
    KvBudget {
        /// Bytes the session would need.
        needed: usize,
        /// The configured budget.
        budget: usize,
    },
    /// The session is unknown to this stage (never started, or evicted).
    #[error("unknown session {0}")]
    UnknownSession(u64),
    /// Tokenizer or chat template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template failure.
    #[error("chat template: {0}")]
    Template(String),
    /// A stage on another peer failed, refused, or could not be reached.
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// A numeric failure inside candle.
    #[error("tensor op failed: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set: an
/// error a user reads stays one line (the backtrace is still in the error's `Debug`).
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_message(inner))
        }
        other => other.to_string(),
    }
}

/// Engine result type.
pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    /// Shorthand for an invalid-model error with a formatted message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        EngineError::InvalidModel(msg.into())
    }
    /// Shorthand for a bad-input error with a formatted message.
    pub fn bad_input(msg: impl Into<String>) -> Self {
        EngineError::BadInput(msg.into())
    }
}

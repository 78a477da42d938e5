//! The wire form of a node's refusals: typed codes the coordinator acts on, and a message
//! for people.

use potluck_engine::EngineError;
use potluck_protocol::messages::{ErrorCode, WireError};

/// A refusal with `code` and `message`.
pub(crate) fn wire_error(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError {
        code,
        message: message.into(),
    }
}

/// The wire form of an engine refusal: the request's fault, the session's, the node's
/// budget, or anything else.
pub(crate) fn engine_error(e: EngineError) -> WireError {
    let code = match &e {
        EngineError::BadInput(_)
        | EngineError::ContextOverflow { .. }
        | EngineError::Tokenizer(_) => ErrorCode::BadRequest,
        EngineError::UnknownSession(_) => ErrorCode::UnknownSession,
        EngineError::KvBudget { .. } => ErrorCode::Overloaded,
        _ => ErrorCode::Internal,
    };
    wire_error(code, e.to_string())
}

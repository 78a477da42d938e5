//! Where models are cached on this machine, shared by the binary, the node and tests.

use std::path::PathBuf;

/// The default model cache: `$POTLUCK_MODELS_DIR`, else `$XDG_DATA_HOME/potluck/models`, else
/// `~/.local/share/potluck/models`. `None` only when no home directory is known.
pub fn default_models_dir() -> Option<PathBuf> {
    let set = |k: &str| {
        std::env::var_os(k)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = set("POTLUCK_MODELS_DIR") {
        return Some(p);
    }
    let base =
        set("XDG_DATA_HOME").or_else(|| set("HOME").map(|h| h.join(".local").join("share")))?;
    Some(base.join("potluck").join("models"))
}

/// Where `potluck model fetch smollm2-135m-instruct` puts the default model's file.
pub fn default_model_path() -> Option<PathBuf> {
    Some(
        default_models_dir()?
            .join("smollm2-135m-instruct")
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
}

/// Where `potluck model fetch all-minilm-l6-v2` puts the default embedding model's folder.
pub fn default_embedding_model_path() -> Option<PathBuf> {
    Some(default_models_dir()?.join("all-minilm-l6-v2"))
}

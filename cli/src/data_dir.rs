//! Where daemons keep their state unless told: one folder per role beside the model cache.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// Where a daemon of `role` (node, coordinator, up, pools) keeps its state by default:
/// beside the model cache, in `$XDG_DATA_HOME/potluck/<role>`.
pub fn default_data_dir(role: &str) -> Result<PathBuf> {
    let models = potluck_engine::cache::default_models_dir()
        .context("cannot find a data folder; pass --data-dir")?;
    Ok(models.parent().unwrap_or(&models).join(role))
}

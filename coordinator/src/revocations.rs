//! A private pool's revocations, read from the pool's folder whenever `potluck pool revoke`
//! changes it, so that a revocation takes effect without restarting anything.

use potluck_protocol::membership::{PoolRecord, Revocation, POOL_RECORD_FILE};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Largest pool record read (a record is small; this bounds a corrupt or hostile file).
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// Watches a pool folder's record for changes.
pub struct RevocationWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl RevocationWatch {
    /// Watches the record in the pool folder `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(POOL_RECORD_FILE),
            seen: None,
        }
    }

    /// The record's revocations if the file changed since the last look (by modification
    /// time and size); `None` if it did not, or cannot be read (logged once per change).
    pub fn poll(&mut self) -> Option<Vec<Revocation>> {
        let meta = std::fs::metadata(&self.path).ok()?;
        let stamp = (meta.modified().ok()?, meta.len());
        if self.seen == Some(stamp) {
            return None;
        }
        self.seen = Some(stamp);
        if stamp.1 > MAX_RECORD_BYTES {
            tracing::warn!(path = %self.path.display(), "pool record over {MAX_RECORD_BYTES} bytes; ignored");
            return None;
        }
        let read = std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<PoolRecord>(&t).map_err(|e| e.to_string()));
        match read {
            Ok(record) => Some(record.revocations),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "pool record not read: {e}");
                None
            }
        }
    }
}

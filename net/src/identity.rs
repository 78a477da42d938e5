//! A node's persistent ed25519 identity: 32 secret bytes in `<data-dir>/identity.key`, file
//! mode 0600. The same key signs receipts and (with the swarm) derives the libp2p PeerId.

use potluck_protocol::signed::Keypair;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why an identity could not be loaded or created.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not 32 bytes.
    #[error("{0} is not a 32-byte identity key")]
    Malformed(PathBuf),
    /// Others can read the secret.
    #[error("{0} is readable by other users (mode {1:o}); run `chmod 600` on it")]
    Exposed(PathBuf, u32),
    /// The OS random source failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "identity.key";

/// Creates `dir` (and missing parents) readable by this user only, and takes group and
/// other access away from it if it already exists: a data folder holds keys, prompts and
/// outputs.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    tighten(dir, 0o700)
}

/// Creates `path` if it is missing, readable and writable by this user only, and takes group
/// and other access away from it if it exists (files that hold prompts, outputs or the audit
/// trail).
pub fn private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?;
    tighten(path, 0o600)
}

#[cfg(unix)]
fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let now = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if now & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(now & mode))?;
        tracing::info!(path = %path.display(), "took group and other access away from {}", path.display());
    }
    Ok(())
}

#[cfg(not(unix))]
fn tighten(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Loads the identity in `data_dir`, creating a fresh one (mode 0600) on first start. The
/// folder is made private first (see [`private_dir`]).
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    private_dir(data_dir).map_err(|source| IdentityError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    match std::fs::read(&path) {
        Ok(bytes) => {
            check_mode(&path)?;
            let secret: [u8; 32] = bytes
                .try_into()
                .map_err(|_| IdentityError::Malformed(path.clone()))?;
            Ok(Keypair::from_secret(&secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| IdentityError::Random(e.to_string()))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path).map_err(io)?;
            f.write_all(&secret).map_err(io)?;
            f.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), "created a new node identity");
            Ok(Keypair::from_secret(&secret))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn check_mode(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed(path.to_path_buf(), mode & 0o777));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &Path) -> Result<(), IdentityError> {
    Ok(())
}

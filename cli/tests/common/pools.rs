//! Private pools from the command line, as their admins make them: a pool, certificates
//! for members' machines, stored where each machine reads them.

use std::path::Path;

/// A path as a command-line argument.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A pool made in `dir/<name>`; its id.
pub fn create(dir: &Path, name: &str) -> String {
    super::potluck_ok(&["pool", "create", name, "--dir", path(&dir.join(name))])
}

/// A certificate of the pool in `dir/<pool>` for the machine whose data folder is
/// `dir/<member>`, with `extra` invite flags.
pub fn invite(dir: &Path, pool: &str, member: &str, extra: &[&str]) -> String {
    let key = super::potluck_ok(&["pool", "key", "--data-dir", path(&dir.join(member))]);
    let pool_dir = dir.join(pool);
    let mut args = vec![
        "pool",
        "invite",
        "--pool",
        pool,
        "--dir",
        path(&pool_dir),
        "--member-key",
        &key,
    ];
    args.extend_from_slice(extra);
    super::potluck_ok(&args)
}

/// Invites `member` (data folder `dir/<member>`) to the pool in `dir/<pool>` and stores the
/// certificate there; returns it.
pub fn join(dir: &Path, pool: &str, member: &str, extra: &[&str]) -> String {
    let cert = invite(dir, pool, member, extra);
    super::potluck_ok(&["pool", "join", &cert, "--data-dir", path(&dir.join(member))]);
    cert
}

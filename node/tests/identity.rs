//! The node identity persists, is private to its owner, and refuses a malformed key file.

use potluck_node::identity::{load_or_create, IdentityError, KEY_FILE};
use potluck_node::probe::{probe, Limits};

#[test]
fn identity_persists_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let a = load_or_create(dir.path()).unwrap();
    let b = load_or_create(dir.path()).unwrap();
    assert_eq!(a.public(), b.public());
    let other = tempfile::tempdir().unwrap();
    assert_ne!(load_or_create(other.path()).unwrap().public(), a.public());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Exposed(..))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Malformed(_))
        ));
    }
}

#[test]
fn the_probe_measures_and_honours_limits() {
    let c = probe(&Limits {
        max_memory: Some(1 << 30),
        threads: Some(1),
    });
    assert_eq!(c.threads, 1);
    assert!(c.memory_bytes <= 1 << 30 && c.memory_bytes > 0);
    assert!(c.gflops > 0.0 && c.mem_gbps > 0.0, "{c:?}");
}

//! A peer's identity persists, is private to its owner, and refuses a malformed key file.

use potluck_net::identity::{load_or_create, IdentityError, KEY_FILE};

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

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

#[cfg(unix)]
#[test]
fn a_data_folder_and_its_private_files_are_the_users_alone_even_if_they_were_not() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh/data");
    potluck_net::identity::load_or_create(&fresh).unwrap();
    assert_eq!(mode(&fresh), 0o700);

    // A folder and a store someone made world-readable are closed again.
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = old.join("jobs.sqlite");
    std::fs::write(&store, b"prompts").unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();
    potluck_net::identity::load_or_create(&old).unwrap();
    potluck_net::identity::private_file(&store).unwrap();
    assert_eq!(mode(&old), 0o700);
    assert_eq!(mode(&store), 0o600);
    assert_eq!(std::fs::read(&store).unwrap(), b"prompts", "contents kept");
    let created = old.join("audit.log");
    potluck_net::identity::private_file(&created).unwrap();
    assert_eq!(mode(&created), 0o600);
}

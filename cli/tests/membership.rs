//! `potluck pool create|invite|join|revoke|key` as an operator and a volunteer use them: a
//! certificate joins only the machine it names, and forged, altered, expired or mistyped ones
//! are refused with the reason.

use std::path::Path;
use std::process::Command;

/// Runs `potluck` with `args`: success, stdout, stderr.
fn potluck<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(args)
        .output()
        .expect("run potluck");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (good, out, err) = potluck(args);
    assert!(good, "potluck {args:?}: {err}");
    out
}

fn refused<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], why: &str) {
    let (good, out, err) = potluck(args);
    assert!(!good, "potluck {args:?} should fail: {out}");
    assert!(err.contains(why), "potluck {args:?}: {err}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn certificates_join_only_the_machine_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("lab-pool");
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let id = ok(&["pool", "create", "lab", "--dir", path(&pool)]);
    assert_eq!(id.len(), 64, "{id}");
    refused(
        &["pool", "create", "lab", "--dir", path(&pool)],
        "already holds a pool",
    );
    let alice_key = ok(&["pool", "key", "--data-dir", path(&alice)]);
    let bob_key = ok(&["pool", "key", "--data-dir", path(&bob)]);
    assert_ne!(alice_key, bob_key);

    // `potluck pool VERB --pool lab --dir POOL EXTRA...`
    let admin = |verb: &str, extra: &[&str]| -> Vec<String> {
        ["pool", verb, "--pool", "lab", "--dir", path(&pool)]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let invite = |key: &str, extra: &[&str]| {
        let mut args = vec!["--member-key", key];
        args.extend_from_slice(extra);
        ok(&admin("invite", &args))
    };
    let cert = invite(&alice_key, &["--role", "admin"]);
    assert!(cert.starts_with("potluck-cert-1:"), "{cert}");
    let joined = ok(&["pool", "join", &cert, "--data-dir", path(&alice)]);
    assert!(
        joined.contains("joined pool lab") && joined.contains("as admin"),
        "{joined}"
    );
    let stored = alice.join("membership").join(format!("{id}.cert"));
    assert_eq!(std::fs::read_to_string(&stored).unwrap().trim(), cert);

    // Alice's certificate does not admit Bob.
    refused(
        &["pool", "join", &cert, "--data-dir", path(&bob)],
        "another member key",
    );
    // One digit changed: no longer what the pool key signed (or no longer a certificate).
    let last = cert.len() - 3;
    let flipped = if &cert[last..last + 1] == "0" {
        "1"
    } else {
        "0"
    };
    let altered = format!("{}{}{}", &cert[..last], flipped, &cert[last + 1..]);
    let (good, _, err) = potluck(&["pool", "join", &altered, "--data-dir", path(&alice)]);
    assert!(
        !good && (err.contains("forged") || err.contains("not a certificate")),
        "{err}"
    );
    refused(
        &["pool", "join", "hello", "--data-dir", path(&bob)],
        "not a certificate",
    );
    // Expired by the time it is used.
    let short = invite(&bob_key, &["--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refused(
        &["pool", "join", &short, "--data-dir", path(&bob)],
        "expired",
    );
    refused(&admin("invite", &["--member-key", "abcd"]), "64 hex digits");
    refused(
        &admin("invite", &["--member-key", &bob_key, "--role", "owner"]),
        "member, trusted or admin",
    );

    // Revocation is recorded, signed, once.
    ok(&admin("revoke", &["--serial", "1"]));
    refused(&admin("revoke", &["--serial", "1"]), "already revoked");
    refused(&admin("revoke", &["--serial", "99"]), "never issued");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pool.join("pool.json")).unwrap()).unwrap();
    assert_eq!(record["next_serial"], 3, "{record}");
    assert_eq!(record["revocations"][0]["serial"], 1, "{record}");
}

//! The audit log holds up offline: a log written by the real writer verifies, with every
//! receipt inside; changing, dropping or reordering any line, forging a receipt, or signing
//! with another key is caught at the line where it happened; a log cut at a line boundary is
//! caught by its signed head; a line a crash cut short is cut off when the log is reopened,
//! and the chain goes on. A log past its size limit is rotated: the new file goes on from
//! the segment's last hash, only the newest segments are kept, and a cut new file is caught;
//! the kept segments verify as one chain and a missing one between is caught; a crash
//! between a rotation and the head's next write leaves a log that verifies and reopens.

use potluck_coordinator::audit::{
    from_hex, head_path, receipt_hex, segment_path, segments, to_hex, verify_chain, verify_file,
    AuditError, AuditLog, Record, Rotation,
};
use potluck_net::swarm::peer_id_of;
use potluck_protocol::codec::{decode_body, encode_body};
use potluck_protocol::messages::{DeviceKind, LayerRange, NumericClass, Receipt, ReceiptBody};
use potluck_protocol::signed::Keypair;
use std::path::Path;

fn receipt(key: &Keypair, n: u8) -> Receipt {
    let body = ReceiptBody {
        job: [n; 32],
        input: [n.wrapping_add(1); 32],
        output: [n.wrapping_add(2); 32],
        model: [7; 32],
        layers: LayerRange { start: 0, end: 30 },
        numeric: NumericClass {
            weights: "Q4_1".into(),
            accumulation: "f32".into(),
            device: DeviceKind::Cpu,
        },
    };
    Receipt::sign(body, key).unwrap()
}

fn result(node: &Keypair, step: u64) -> Record {
    Record::Result {
        peer: peer_id_of(&node.public()).unwrap().to_string(),
        session: 9,
        step,
        verdict: "verified".into(),
        detail: String::new(),
        receipt: Some(receipt_hex(&receipt(node, step as u8))),
    }
}

/// Writes `steps` results from `node` to a log at `path` signed by `coordinator`.
fn write(path: &Path, coordinator: [u8; 32], node: &Keypair, steps: std::ops::Range<u64>) {
    let log = AuditLog::open(path, Keypair::from_secret(&coordinator), "lab").unwrap();
    for step in steps {
        log.record(result(node, step));
    }
    log.sync();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn save(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn broken_at(path: &Path) -> (u64, String) {
    match verify_file(path, None) {
        Err(AuditError::Broken { line, why }) => (line, why),
        other => panic!("tampering not caught: {other:?}"),
    }
}

#[test]
fn a_written_log_verifies_and_every_tampering_is_caught_where_it_happened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let node = Keypair::from_secret(&[3; 32]);
    write(&path, [1; 32], &node, 0..20);
    let sum = verify_file(&path, None).unwrap();
    assert_eq!((sum.entries, sum.receipts), (21, 20));
    assert_eq!(sum.key, Some(Keypair::from_secret(&[1; 32]).public()));
    assert_eq!(sum.verdicts.get("result verified"), Some(&20));
    // Pinning the coordinator's key: the right one passes, another fails at line 1.
    assert!(verify_file(&path, sum.key).is_ok());
    let stranger = Keypair::from_secret(&[2; 32]).public();
    assert!(matches!(
        verify_file(&path, Some(stranger)),
        Err(AuditError::Broken { line: 1, .. })
    ));
    let good = lines(&path);

    // An edited verdict.
    let mut v = good.clone();
    v[5] = v[5].replace("\"verified\"", "\"rejected\"");
    save(&path, &v);
    assert_eq!(broken_at(&path).0, 6);
    // A dropped line.
    let mut v = good.clone();
    v.remove(7);
    save(&path, &v);
    assert_eq!(broken_at(&path).0, 8);
    // Two lines swapped.
    let mut v = good.clone();
    v.swap(3, 4);
    save(&path, &v);
    assert_eq!(broken_at(&path).0, 4);
    // A line rewritten with a matching hash and chain, but no coordinator key to sign it.
    let mut v = good.clone();
    let line: serde_json::Value = serde_json::from_str(&v[2]).unwrap();
    let mut entry = line["entry"].clone();
    entry["step"] = serde_json::json!(99);
    let raw = serde_json::to_string(&entry).unwrap();
    let forged = serde_json::json!({
        "hash": to_hex(blake3::hash(raw.as_bytes()).as_bytes()),
        "sig": line["sig"],
        "entry": entry,
    });
    v[2] = forged.to_string();
    save(&path, &v);
    let (at, why) = broken_at(&path);
    assert_eq!(at, 3);
    assert!(why.contains("signature") || why.contains("chain"), "{why}");

    // Cut at a line boundary: every line still chains, but the signed head beside the log
    // says how many there were. The coordinator will not append to it either.
    let mut v = good.clone();
    v.truncate(good.len() - 3);
    save(&path, &v);
    let (at, why) = broken_at(&path);
    assert_eq!(at, 18);
    assert!(why.contains("it was cut"), "{why}");
    assert!(AuditLog::open(&path, Keypair::from_secret(&[1; 32]), "lab").is_err());
    // The whole log checks out against its head; without a head, it says it could not.
    save(&path, &good);
    assert!(verify_file(&path, None).unwrap().head_checked);
    let head = std::fs::read(head_path(&path)).unwrap();
    std::fs::remove_file(head_path(&path)).unwrap();
    assert!(!verify_file(&path, None).unwrap().head_checked);
    // A head signed by another key is refused.
    let mut forged_head: serde_json::Value = serde_json::from_slice(&head).unwrap();
    forged_head["entries"] = serde_json::json!(3);
    std::fs::write(head_path(&path), forged_head.to_string()).unwrap();
    assert!(broken_at(&path).1.contains("not signed by"));
    std::fs::remove_file(head_path(&path)).unwrap();

    // A forged receipt: signed by the coordinator (a dishonest one), but the node never
    // signed what it claims.
    std::fs::remove_file(&path).unwrap();
    let log = AuditLog::open(&path, Keypair::from_secret(&[1; 32]), "lab").unwrap();
    let mut r = receipt(&node, 1);
    r.body.output = [0; 32];
    log.record(Record::Result {
        peer: peer_id_of(&node.public()).unwrap().to_string(),
        session: 9,
        step: 1,
        verdict: "verified".into(),
        detail: String::new(),
        receipt: Some(receipt_hex(&r)),
    });
    log.sync();
    let (at, why) = broken_at(&path);
    assert_eq!(at, 2);
    assert!(why.contains("receipt signature"), "{why}");
    // A real receipt credited to another node.
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(head_path(&path)).unwrap();
    let log = AuditLog::open(&path, Keypair::from_secret(&[1; 32]), "lab").unwrap();
    let other = Keypair::from_secret(&[4; 32]);
    log.record(Record::Result {
        peer: peer_id_of(&other.public()).unwrap().to_string(),
        session: 9,
        step: 1,
        verdict: "verified".into(),
        detail: String::new(),
        receipt: Some(receipt_hex(&receipt(&node, 1))),
    });
    log.sync();
    let (at, why) = broken_at(&path);
    assert_eq!(at, 2);
    assert!(why.contains("not signed by"), "{why}");
}

#[test]
fn a_reopened_log_continues_its_chain_and_a_torn_last_line_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let node = Keypair::from_secret(&[3; 32]);
    write(&path, [1; 32], &node, 0..5);
    // A crash mid-write leaves half a line.
    let mut text = std::fs::read_to_string(&path).unwrap();
    let half = lines(&path)[3].clone();
    text.push_str(&half[..half.len() / 2]);
    std::fs::write(&path, text).unwrap();
    assert!(verify_file(&path, None).is_err(), "a torn line is reported");
    write(&path, [1; 32], &node, 5..10);
    let sum = verify_file(&path, None).unwrap();
    assert_eq!((sum.entries, sum.receipts), (12, 10));
    assert_eq!(sum.verdicts.get("open"), Some(&2));
    // Another coordinator key cannot take the log over.
    assert!(AuditLog::open(&path, Keypair::from_secret(&[2; 32]), "lab").is_err());
    // Receipts inside decode to what was recorded.
    let line: serde_json::Value = serde_json::from_str(&lines(&path)[1]).unwrap();
    let bytes = from_hex(line["entry"]["receipt"].as_str().unwrap()).unwrap();
    let r: Receipt = decode_body(&bytes).unwrap();
    assert_eq!(encode_body(&r).unwrap(), bytes);
    assert_eq!(r, receipt(&node, 0));
}

#[test]
fn a_full_log_rotates_keeps_its_chain_and_only_the_newest_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let node = Keypair::from_secret(&[3; 32]);
    let rotation = Rotation {
        max_bytes: 4096,
        keep: 2,
    };
    let coordinator = Keypair::from_secret(&[1; 32]);
    for round in 0..6u64 {
        let log =
            AuditLog::open_with(&path, Keypair::from_secret(&[1; 32]), "lab", rotation).unwrap();
        for step in round * 10..round * 10 + 10 {
            log.record(result(&node, step));
        }
        log.sync();
    }
    let kept = segments(&path);
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(std::fs::metadata(&path).unwrap().len() < 4096 * 2);
    // The live file goes on from the newest segment, which ends where it says.
    let sum = verify_file(&path, None).unwrap();
    assert!(sum.head_checked);
    let (from, head) = sum
        .continues_from
        .expect("a rotated log says where it goes on from");
    let newest = kept.last().unwrap();
    assert_eq!(newest, &segment_path(&path, from));
    let seg = verify_file(newest, Some(coordinator.public())).unwrap();
    assert_eq!((seg.entries, seg.head), (from, head));
    // 60 results and 6 opens, and one line per rotation, in all.
    assert!(sum.entries > 66, "{}", sum.entries);
    // The whole chain: live file, then every kept segment, each joining the next.
    let chain = verify_chain(&path, None).unwrap();
    let walked: Vec<_> = chain.joined.iter().map(|(p, _)| p.clone()).rev().collect();
    assert_eq!(walked, kept);
    let oldest = &chain.joined.last().unwrap().1;
    assert_eq!(chain.earlier, oldest.continues_from.map(|(n, _)| n));
    assert!(chain.earlier.is_some(), "the oldest segments were removed");
    // A segment between the live file and an older kept one is a gap.
    let middle = std::fs::read(newest).unwrap();
    std::fs::remove_file(newest).unwrap();
    match verify_chain(&path, None) {
        Err(AuditError::Broken { why, .. }) => assert!(why.contains("missing"), "{why}"),
        other => panic!("a missing segment was not caught: {other:?}"),
    }
    // The oldest may go (that is what rotation does): the rest still verifies.
    std::fs::write(newest, &middle).unwrap();
    std::fs::remove_file(&kept[0]).unwrap();
    assert_eq!(verify_chain(&path, None).unwrap().joined.len(), 1);
    // A segment whose end was cut does not join the file after it.
    let mut seg = lines(newest);
    seg.pop();
    save(newest, &seg);
    match verify_chain(&path, None) {
        Err(AuditError::Broken { why, .. }) => assert!(why.contains("do not join"), "{why}"),
        other => panic!("a cut segment was not caught: {other:?}"),
    }
    // Its first line cannot be dropped: the head beside it counts what the chain holds.
    let mut all = lines(&path);
    all.remove(0);
    save(&path, &all);
    assert!(verify_file(&path, None).is_err());
}

#[test]
fn a_crash_between_a_rotation_and_its_head_leaves_a_log_that_verifies_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let node = Keypair::from_secret(&[3; 32]);
    let rotation = Rotation {
        max_bytes: 4096,
        keep: 4,
    };
    let log = AuditLog::open_with(&path, Keypair::from_secret(&[1; 32]), "lab", rotation).unwrap();
    let mut before = Vec::new();
    for step in 0..200 {
        log.sync();
        before = std::fs::read(head_path(&path)).unwrap();
        log.record(result(&node, step));
        log.sync();
        if !segments(&path).is_empty() {
            break;
        }
    }
    drop(log);
    assert_eq!(segments(&path).len(), 1, "the log never rotated");
    // The head on disk is the one from before the rotation, as a crash would leave it.
    std::fs::write(head_path(&path), &before).unwrap();
    assert_eq!(lines(&path).len(), 1, "only the new file's first line");
    let sum = verify_file(&path, None).unwrap();
    assert!(sum.continues_from.is_some());
    assert_eq!(verify_chain(&path, None).unwrap().joined.len(), 1);
    // Reopened, it goes on, and its head is checked again.
    write_rotating(&path, &node, rotation);
    let sum = verify_file(&path, None).unwrap();
    assert!(sum.head_checked);
    verify_chain(&path, None).unwrap();
}

fn write_rotating(path: &Path, node: &Keypair, rotation: Rotation) {
    let log = AuditLog::open_with(path, Keypair::from_secret(&[1; 32]), "lab", rotation).unwrap();
    log.record(result(node, 500));
    log.sync();
}

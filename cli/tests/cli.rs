//! The `potluck` binary end to end: golden outputs on the real default model, and every kind
//! of bad input answered with one clear `error:` line and a non-zero exit, never a panic.

use candle_core::quantized::GgmlDType;
use potluck_engine::synthetic::{write_gguf, SyntheticSpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn potluck(args: &[&str]) -> Output {
    potluck_in(Path::new("."), args)
}

/// `potluck args` run in the folder `dir`.
fn potluck_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(args)
        .current_dir(dir)
        // A backtrace must never reach an error line, even where one is asked for.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run potluck")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and asserts success; returns stdout.
fn ok(args: &[&str]) -> String {
    ok_in(Path::new("."), args)
}

/// [`ok`], run in the folder `dir`.
fn ok_in(dir: &Path, args: &[&str]) -> String {
    let o = potluck_in(dir, args);
    assert!(
        o.status.success(),
        "potluck {args:?} failed: {}",
        stderr(&o)
    );
    stdout(&o)
}

/// Runs and asserts a clean refusal: non-zero exit, one `error:` line containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let o = potluck(args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "potluck {args:?} should fail; stdout {}",
        stdout(&o)
    );
    assert!(
        !err.contains("panicked"),
        "potluck {args:?} panicked: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "potluck {args:?} should print one line, got: {err}"
    );
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].len() < 400, "not one clear line: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "potluck {args:?}: {err:?} lacks {needle:?}"
    );
}

/// `potluck args` whose stdout's reader has gone before it prints (`potluck ... | head -0`).
fn with_reader_gone(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run potluck");
    drop(child.stdout.take());
    child.wait_with_output().expect("wait for potluck")
}

fn tiny(dir: &Path, name: &str, spec: SyntheticSpec) -> PathBuf {
    let p = dir.join(name);
    write_gguf(&spec, &p).unwrap();
    p
}

#[test]
fn golden_paris_by_name_and_by_path() {
    let out = ok(&[
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ]);
    assert!(out.starts_with(" Paris"), "{out:?}");
    let path = ok(&["model", "verify", "smollm2-135m-instruct"]);
    let file = path
        .trim()
        .rsplit_once('(')
        .unwrap()
        .1
        .trim_end_matches(')')
        .to_string();
    let by_path = ok(&[
        "generate",
        "--model",
        &file,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ]);
    assert_eq!(out, by_path);
    // Split into three in-process stages: the same text.
    let split = ok(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--stages",
        "3",
    ]);
    assert_eq!(out, split);
}

#[test]
fn chat_answers_through_the_template() {
    let out = ok(&[
        "generate",
        "--chat",
        "--prompt",
        "What is 2+2?",
        "--max-tokens",
        "40",
    ]);
    assert!(out.contains('4'), "{out:?}");
    let o = potluck(&[
        "generate",
        "--chat",
        "--prompt",
        "What is 2+2?",
        "--max-tokens",
        "40",
    ]);
    assert!(
        stderr(&o).contains("decode:"),
        "speed report missing: {}",
        stderr(&o)
    );
}

#[test]
fn stop_strings_and_seeds() {
    let stopped = ok(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "20",
        "--stop",
        ".",
    ]);
    assert_eq!(stopped.trim_end(), " Paris");
    let args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "24",
        "--temperature",
        "0.9",
        "--seed",
        "11",
    ];
    assert_eq!(ok(&args), ok(&args));
    let mut other = args.to_vec();
    other[8] = "12";
    assert_ne!(ok(&args), ok(&other));
}

#[test]
fn bad_model_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny(
        dir.path(),
        "good.gguf",
        SyntheticSpec {
            dtype: GgmlDType::Q8_0,
            ..Default::default()
        },
    );
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p.to_string_lossy().into_owned()
    };
    let truncated = write("truncated.gguf", &bytes[..bytes.len() / 2]);
    let header_only = write("header.gguf", &bytes[..64]);
    let mut bad_magic_bytes = bytes.clone();
    bad_magic_bytes[..4].copy_from_slice(b"GGUX");
    let bad_magic = write("magic.gguf", &bad_magic_bytes);
    let empty = write("empty.gguf", &[]);
    let falcon = tiny(
        dir.path(),
        "falcon.gguf",
        SyntheticSpec {
            architecture: "falcon".into(),
            ..Default::default()
        },
    );
    let iq = write("iq.gguf", &gguf_with_tensor_type(23));
    // candle divides by the declared alignment: 0 used to panic the process.
    let unaligned = write("align0.gguf", &gguf_with(0, Some(0)));
    let odd = write("align3.gguf", &gguf_with(0, Some(3)));
    // Dimensions whose product overflows 64 bits.
    let vast = write("vast.gguf", &gguf_shaped(0, None, [1 << 33, 1 << 33]));
    let gen = |m: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            m.to_string(),
            "--prompt".into(),
            "hi".into(),
        ]
    };
    let cases: Vec<(String, &str)> = vec![
        (
            dir.path()
                .join("missing.gguf")
                .to_string_lossy()
                .into_owned(),
            "does not exist",
        ),
        (truncated, "the file is cut short"),
        (header_only, "invalid model"),
        (bad_magic, "bad magic"),
        (empty, "bad magic"),
        (
            falcon.to_string_lossy().into_owned(),
            "architecture 'falcon'",
        ),
        (iq, "unsupported"),
        (unaligned, "general.alignment is 0, not a power of two"),
        (odd, "general.alignment is 3, not a power of two"),
        (vast, "too large to address"),
    ];
    for (model, needle) in cases {
        let args = gen(&model);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, needle);
    }
    // The good file still works.
    ok(&[
        "generate",
        "--model",
        &good.to_string_lossy(),
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
    ]);
}

#[test]
fn a_wrong_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_s = cache.to_string_lossy().into_owned();
    let good = tiny(dir.path(), "tiny.gguf", SyntheticSpec::default());
    ok(&[
        "--models-dir",
        &cache_s,
        "model",
        "fetch",
        "tiny",
        "--from",
        &good.to_string_lossy(),
    ]);
    ok(&["--models-dir", &cache_s, "model", "verify", "tiny"]);
    // Cached and verified: fetched again, it is not downloaded (there is no source to
    // download it from, so a try would fail).
    let again = ok(&["--models-dir", &cache_s, "model", "fetch", "tiny"]);
    assert!(again.contains("already cached, verified"), "{again}");
    let generate = [
        "--models-dir",
        &cache_s,
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ];
    ok(&generate);
    // A file named like the cached model in the working folder does not stand in for it
    // (and skip its digest check).
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("tiny"), b"GGUF not a model").unwrap();
    ok_in(&work, &generate);
    let cached = cache.join("tiny/model.gguf");
    let mut b = std::fs::read(&cached).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x55;
    std::fs::write(&cached, b).unwrap();
    refused(
        &["--models-dir", &cache_s, "model", "verify", "tiny"],
        "integrity",
    );
    refused(
        &[
            "--models-dir",
            &cache_s,
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "hi",
        ],
        "integrity",
    );
    let list = ok(&["--models-dir", &cache_s, "model", "list"]);
    assert!(list.contains("tiny") && list.contains("path:"), "{list}");

    // A name may not lead out of the cache, or onto the cache folder itself.
    for name in ["..", ".", ".fetch-1", ""] {
        refused(
            &[
                "--models-dir",
                &cache_s,
                "model",
                "fetch",
                name,
                "--from",
                &good.to_string_lossy(),
            ],
            "cannot name a model",
        );
    }
    assert!(!dir.path().join("model.gguf").exists());
}

#[test]
fn a_reader_that_goes_away_ends_a_printing_command_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let key = potluck_protocol::signed::Keypair::from_secret(&[7; 32]);
    let audit = potluck_coordinator::audit::AuditLog::open(&log, key, "public").unwrap();
    audit.sync();
    drop(audit);
    // The reader leaves before the summary is printed (`potluck audit verify log | head -0`).
    let out = with_reader_gone(&["audit", "verify", &log.to_string_lossy()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_chat_renders_under_a_memory_limit_below_the_template_workers_own() {
    // Started under a 1.9 GB address-space limit, hard, which the worker's own 2 GiB cap
    // must not try to raise.
    let o = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1900000 && exec \"$0\" generate --chat --prompt 'What is 2+2?' --max-tokens 8")
        .arg(env!("CARGO_BIN_EXE_potluck"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("decode:"), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
}

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // A template that kills its renderer: the worker's death is logged as a warning.
    let spec = SyntheticSpec {
        chat_template: Some("{% set ns = namespace(s='x') %}{% for i in range(48) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}".into()),
        ..Default::default()
    };
    let model = tiny(dir.path(), "greedy.gguf", spec);
    let o = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args([
            "generate",
            "--chat",
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
            "--model",
        ])
        .arg(&model)
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("WARN") && err.contains("error: "), "{err}");
    assert!(
        !err.contains('\x1b'),
        "colour codes in a redirected log: {err:?}"
    );
}

#[test]
fn a_generation_whose_reader_goes_away_ends_quietly() {
    let out = with_reader_gone(&[
        "generate",
        "--chat",
        "--prompt",
        "Count to fifty.",
        "--max-tokens",
        "64",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?} {err}", out.status);
    assert!(
        !err.contains("panicked") && !err.contains("decode:"),
        "{err}"
    );
}

#[test]
fn a_rotated_audit_log_verifies_by_a_bare_file_name_in_its_folder() {
    use potluck_coordinator::audit::{AuditLog, Record, Rotation};
    let dir = tempfile::tempdir().unwrap();
    let rotation = Rotation {
        max_bytes: 2048,
        keep: 3,
    };
    let key = potluck_protocol::signed::Keypair::from_secret(&[7; 32]);
    let log = AuditLog::open_with(&dir.path().join("audit.log"), key, "public", rotation).unwrap();
    for i in 0..60u64 {
        log.record(Record::Quarantine {
            peer: format!("peer-{i}"),
            detail: "a test of rotation".into(),
        });
        log.sync();
    }
    drop(log);
    let out = ok_in(dir.path(), &["audit", "verify", "audit.log"]);
    assert_eq!(out.matches("verified, joined").count(), 3, "{out}");
}

#[test]
fn prompts_longer_than_the_context_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = tiny(
        dir.path(),
        "ctx.gguf",
        SyntheticSpec {
            context: 64,
            ..Default::default()
        },
    );
    let long = "word ".repeat(200);
    refused(
        &[
            "generate",
            "--model",
            &small.to_string_lossy(),
            "--prompt",
            &long,
        ],
        "context",
    );
    let very_long = "lorem ipsum dolor sit amet ".repeat(2000);
    refused(&["generate", "--prompt", &very_long], "context");
}

#[test]
fn bad_flags_are_refused() {
    let p = ["generate", "--prompt", "hi"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        p.iter().copied().chain(extra.iter().copied()).collect()
    };
    refused(&with(&["--temperature", "-1"]), "temperature");
    refused(&with(&["--top-p", "1.5"]), "top-p");
    refused(&with(&["--threads", "0"]), "threads");
    refused(&with(&["--max-tokens", "0"]), "max-tokens");
    refused(&with(&["--max-tokens", "lots"]), "invalid value");
    refused(&with(&["--frobnicate"]), "unexpected argument");
    refused(&with(&["--model", "no-such-model"]), "unknown model");
    refused(&["generate", "--prompt", "   "], "empty");
    refused(&["generate"], "--prompt");
    refused(&["model", "verify", "never-fetched"], "not cached");
}

/// A minimal GGUF v3 whose single tensor has type `code`, for refusal tests.
fn gguf_with_tensor_type(code: u32) -> Vec<u8> {
    gguf_with(code, None)
}

/// One tensor of type `code`, and `general.alignment` set to `alignment` (a u32) if given.
fn gguf_with(code: u32, alignment: Option<u32>) -> Vec<u8> {
    gguf_shaped(code, alignment, [256, 4])
}

/// [`gguf_with`], its tensor of shape `dims`.
fn gguf_shaped(code: u32, alignment: Option<u32>, dims: [u64; 2]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    let entries = 1 + u64::from(alignment.is_some());
    b.extend_from_slice(&entries.to_le_bytes()); // metadata entries
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"llama");
    if let Some(a) = alignment {
        let key = b"general.alignment";
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&4u32.to_le_bytes()); // u32
        b.extend_from_slice(&a.to_le_bytes());
    }
    let name = b"token_embd.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&2u32.to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&code.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len() + 4096, 0);
    b
}

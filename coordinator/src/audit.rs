//! The coordinator's audit log: every verdict on a node's work (each stage result checked,
//! each spot check, each quarantine) appended to a file as one JSON line, chained by blake3
//! and signed by the coordinator, with the node's signed receipt inside. Anyone holding the
//! file can check it offline ([`verify_file`], `potluck audit verify`): no line can be
//! changed, dropped or reordered without breaking the chain, and no receipt forged.
//!
//! A line is `{"hash": H, "sig": S, "entry": E}` where `H` is blake3 of `E`'s exact bytes,
//! `S` the coordinator's signature over `H`, and `E` carries the previous line's hash.
//!
//! A chain alone cannot tell a log cut at a line boundary from a whole one, so beside the
//! log (`audit.log.head`) the coordinator keeps a signed head: how many entries the log
//! held at its last write, and the last one's hash. A log shorter than its head says, or
//! whose entry there has another hash, was cut or rewritten; the coordinator refuses to
//! append to it and `potluck audit verify` fails. (Cutting the log and putting back an
//! older head goes unseen here: for that, copy heads elsewhere.)
//!
//! A log past its size limit is rotated: it becomes `audit.log.<N>` (N: the entries it
//! ends at) and a new `audit.log` goes on with the same chain, its first line a
//! [`Record::Continues`] naming the entries before it and their last hash. The newest few
//! rotated segments are kept; older ones are removed (copy them elsewhere to keep them).

use potluck_net::swarm::peer_id_of;
use potluck_protocol::codec::{decode_body, encode_body};
use potluck_protocol::messages::Receipt;
use potluck_protocol::signed::{digest, Keypair, PublicKey, Signature};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Domain of the coordinator's signatures over audit lines.
pub const AUDIT_DOMAIN: &str = "potluck/audit/1";
/// Domain of the coordinator's signatures over the log's head.
pub const AUDIT_HEAD_DOMAIN: &str = "potluck/audit-head/1";
/// File name of the log in the coordinator's data directory.
pub const AUDIT_FILE: &str = "audit.log";
/// Entries waiting for the writer before recording blocks (back-pressure, never loss).
const QUEUE: usize = 65_536;
/// Longest line accepted when reading a log back.
const MAX_LINE: usize = 1 << 20;
/// How often written entries are synced to disk.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What a line records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The coordinator (re)opened the log: its key signs every line.
    Open {
        /// The coordinator's public key, hex.
        key: String,
        /// The pool.
        pool: String,
    },
    /// A stage result was checked on arrival (signature, content ids, model, layers, shape).
    Result {
        /// The node, as a libp2p peer id.
        peer: String,
        /// The session.
        session: u64,
        /// The step.
        step: u64,
        /// `verified` or `rejected`.
        verdict: String,
        /// Why it was rejected, if it was.
        detail: String,
        /// The node's receipt (hex of its encoding), when it sent one.
        receipt: Option<String>,
    },
    /// A result was recomputed on another node and compared.
    Check {
        /// The node checked.
        peer: String,
        /// The node that recomputed it.
        checker: String,
        /// The session.
        session: u64,
        /// The step.
        step: u64,
        /// `pass`, `fail` or `inconclusive`.
        verdict: String,
        /// The measured distance.
        detail: String,
        /// Lowest row cosine similarity of hidden states (none: not finite).
        cos: Option<f64>,
        /// Highest row relative L2 error of hidden states (none: not finite).
        rel_l2: Option<f64>,
        /// Largest log-probability difference of tokens (none: not finite).
        logprob: Option<f64>,
        /// Both receipts (checked first), hex.
        receipts: Vec<String>,
    },
    /// A node was sent a job with a known answer (a canary) and its answer compared.
    Canary {
        /// The node.
        peer: String,
        /// The canary's (fresh) session.
        session: u64,
        /// The step of the worst result.
        step: u64,
        /// `pass`, `fail` or `inconclusive`.
        verdict: String,
        /// The measured distance.
        detail: String,
        /// The node's receipt for the worst result, hex.
        receipt: String,
    },
    /// A node was quarantined.
    Quarantine {
        /// The node.
        peer: String,
        /// Why.
        detail: String,
    },
    /// The first line of a rotated log: it goes on from `entries` earlier entries (in
    /// `audit.log.<entries>` and before) whose last hash is `head`.
    Continues {
        /// The coordinator's public key, hex.
        key: String,
        /// Entries before this one.
        entries: u64,
        /// The last one's hash, hex.
        head: String,
    },
}

impl Record {
    /// The verdict's name for summaries: the kind, and the verdict where there is one.
    fn label(&self) -> String {
        match self {
            Record::Open { .. } => "open".into(),
            Record::Result { verdict, .. } => format!("result {verdict}"),
            Record::Check { verdict, .. } => format!("check {verdict}"),
            Record::Canary { verdict, .. } => format!("canary {verdict}"),
            Record::Quarantine { .. } => "quarantine".into(),
            Record::Continues { .. } => "continues".into(),
        }
    }

    /// The receipts it carries, and the peer each must be signed by.
    fn receipts(&self) -> Vec<(&str, &str)> {
        match self {
            Record::Result {
                peer,
                receipt: Some(r),
                ..
            } => vec![(peer.as_str(), r.as_str())],
            Record::Check {
                peer,
                checker,
                receipts,
                ..
            } => receipts
                .iter()
                .zip([peer, checker])
                .map(|(r, p)| (p.as_str(), r.as_str()))
                .collect(),
            Record::Canary { peer, receipt, .. } => vec![(peer.as_str(), receipt.as_str())],
            _ => Vec::new(),
        }
    }
}

/// One entry: its place in the chain, when, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// Hash of the previous line's entry, hex (zeros for the first).
    pub prev: String,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub record: Record,
}

#[derive(Serialize)]
struct LineOut<'a> {
    hash: String,
    sig: String,
    entry: &'a RawValue,
}

#[derive(Deserialize)]
struct LineIn<'a> {
    hash: String,
    sig: String,
    #[serde(borrow)]
    entry: &'a RawValue,
}

/// Why a log cannot be opened or does not verify.
#[derive(Debug, Error)]
pub enum AuditError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A line is not what the log's rules demand.
    #[error("line {line}: {why}")]
    Broken {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        why: String,
    },
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Lines.
    pub entries: u64,
    /// Receipts whose signatures verified.
    pub receipts: u64,
    /// The coordinator key that signed every line.
    pub key: Option<PublicKey>,
    /// Lines per kind and verdict.
    pub verdicts: BTreeMap<String, u64>,
    /// Hash of the last line's entry (where the next line chains from).
    pub head: [u8; 32],
    /// Whether a signed head was found beside the log and matched (a log without one
    /// cannot be told from a cut one).
    pub head_checked: bool,
    /// Entries before this file and the last one's hash, when it goes on from a rotated
    /// log.
    pub continues_from: Option<(u64, [u8; 32])>,
    /// The signed head names an entry of an older segment (a crash came between a rotation
    /// and the head's next write): it cannot be checked against this file.
    pub head_stale: bool,
}

/// When a log is rotated and how many rotated segments are kept.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// Size past which the log is rotated.
    pub max_bytes: u64,
    /// Rotated segments kept; older ones are removed.
    pub keep: usize,
}

/// Size at which the log is rotated unless configured otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Rotated segments kept unless configured otherwise.
pub const DEFAULT_KEEP: usize = 8;

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
        }
    }
}

/// Where the log at `path` goes when it is rotated at `entries` entries.
pub fn segment_path(path: &Path, entries: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{entries:012}"));
    PathBuf::from(name)
}

/// The rotated segments of the log at `path`, oldest first.
pub fn segments(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{name}.");
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name();
            let n = file.to_str()?.strip_prefix(&prefix)?;
            let n = n.parse::<u64>().ok().filter(|_| n.len() == 12)?;
            // Named as `segment_path` names it (no `./` for a bare file name), so that the
            // two compare equal.
            Some((n, path.with_file_name(&file)))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// The signed head kept beside a log: its entries at the last write, and the last one's
/// hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Head {
    entries: u64,
    head: String,
    sig: String,
}

/// Where the head of the log at `path` is kept.
pub fn head_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

/// The bytes a head's signature covers.
fn head_message(entries: u64, head: &[u8; 32]) -> Vec<u8> {
    let mut m = entries.to_le_bytes().to_vec();
    m.extend_from_slice(head);
    m
}

/// The head beside `path`, checked against `key`: entries and hash; `None` when there is
/// none.
fn read_head(path: &Path, key: &PublicKey) -> Result<Option<(u64, [u8; 32])>, AuditError> {
    let hp = head_path(path);
    let text = match std::fs::read_to_string(&hp) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AuditError::Io { path: hp, source }),
    };
    let broken = |why: &str| AuditError::Broken {
        line: 0,
        why: format!("{}: {why}", hp.display()),
    };
    let h: Head = serde_json::from_str(&text).map_err(|_| broken("not a log head"))?;
    let head = from_hex_array::<32>(&h.head).ok_or_else(|| broken("bad hash"))?;
    let sig = from_hex_array::<64>(&h.sig)
        .map(Signature)
        .ok_or_else(|| broken("bad signature encoding"))?;
    key.verify(AUDIT_HEAD_DOMAIN, &head_message(h.entries, &head), &sig)
        .map_err(|_| broken("not signed by the log's coordinator"))?;
    Ok(Some((h.entries, head)))
}

/// Why a log does not reach its head: `entries` whole lines, the hash of the entry the head
/// names (if the log reaches it).
fn short_of_head(head: (u64, [u8; 32]), entries: u64, at_head: Option<[u8; 32]>) -> Option<String> {
    if entries < head.0 {
        return Some(format!(
            "the log holds {entries} entries but its signed head says {}: it was cut",
            head.0
        ));
    }
    if head.0 > 0 && at_head != Some(head.1) {
        return Some(format!(
            "entry {} is not the one its signed head names: the log was rewritten",
            head.0 - 1
        ));
    }
    None
}

pub use potluck_protocol::hex::{from_hex, to_hex};

fn from_hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    from_hex(s)?.try_into().ok()
}

/// The hex of a receipt's encoding, for a [`Record`].
pub fn receipt_hex(r: &Receipt) -> String {
    encode_body(r).map(|b| to_hex(&b)).unwrap_or_default()
}

/// One line taken apart: its entry, the entry's hash (checked against the line's) and the
/// signature over it (not yet verified).
fn read_line(text: &str) -> Result<(Entry, [u8; 32], Signature), String> {
    let line: LineIn<'_> =
        serde_json::from_str(text).map_err(|e| format!("not a log line: {e}"))?;
    let raw = line.entry.get();
    let hash = digest(raw.as_bytes());
    if from_hex_array::<32>(&line.hash) != Some(hash) {
        return Err("the entry does not match its hash".into());
    }
    let entry: Entry = serde_json::from_str(raw).map_err(|e| format!("not an entry: {e}"))?;
    let sig = from_hex_array::<64>(&line.sig)
        .map(Signature)
        .ok_or("bad signature encoding")?;
    Ok((entry, hash, sig))
}

/// Checks one line against the chain so far, updating `sum`.
fn check_line(line_no: u64, text: &str, sum: &mut Summary) -> Result<Entry, AuditError> {
    let broken = |why: String| AuditError::Broken { line: line_no, why };
    let (entry, hash, sig) = read_line(text).map_err(broken)?;
    if entry.seq != sum.entries {
        return Err(broken(format!(
            "entry {} where {} belongs (a line was dropped or moved)",
            entry.seq, sum.entries
        )));
    }
    if from_hex_array::<32>(&entry.prev) != Some(sum.head) {
        return Err(broken("does not chain from the line before".into()));
    }
    if let Record::Open { key, .. } | Record::Continues { key, .. } = &entry.record {
        let key = from_hex_array::<32>(key)
            .map(PublicKey)
            .ok_or_else(|| broken("bad coordinator key".into()))?;
        match sum.key {
            Some(k) if k != key => {
                return Err(broken("opened by another coordinator key".into()));
            }
            _ => sum.key = Some(key),
        }
    }
    let key = sum
        .key
        .ok_or_else(|| broken("the log does not start by naming its key".into()))?;
    key.verify(AUDIT_DOMAIN, &hash, &sig)
        .map_err(|_| broken("the coordinator's signature does not verify".into()))?;
    for (peer, hex) in entry.record.receipts() {
        let bytes = from_hex(hex).ok_or_else(|| broken("receipt is not hex".into()))?;
        let receipt: Receipt =
            decode_body(&bytes).map_err(|e| broken(format!("receipt does not decode: {e}")))?;
        receipt
            .verify()
            .map_err(|e| broken(format!("receipt signature: {e}")))?;
        if peer_id_of(&receipt.signer)
            .map(|p| p.to_string())
            .as_deref()
            != Some(peer)
        {
            return Err(broken(format!("receipt not signed by {peer}")));
        }
        sum.receipts += 1;
    }
    *sum.verdicts.entry(entry.record.label()).or_default() += 1;
    sum.entries += 1;
    sum.head = hash;
    Ok(entry)
}

fn empty_summary() -> Summary {
    Summary {
        entries: 0,
        receipts: 0,
        key: None,
        verdicts: BTreeMap::new(),
        head: [0; 32],
        head_checked: false,
        continues_from: None,
        head_stale: false,
    }
}

/// Checks a whole log offline: every hash, the chain, every coordinator signature (one key
/// throughout, `key` if given) and every receipt's signature and signer.
pub fn verify_file(path: &Path, key: Option<PublicKey>) -> Result<Summary, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut sum = empty_summary();
    sum.key = key;
    let mut buf = Vec::new();
    // The head is read once the log's key is known (its first line names it).
    let mut head: Option<Option<(u64, [u8; 32])>> = None;
    let mut at_head = None;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        let line_no = sum.entries + 1;
        if buf.last() != Some(&b'\n') {
            return Err(AuditError::Broken {
                line: line_no,
                why: if n > MAX_LINE {
                    "line too long".into()
                } else {
                    "the last line is cut short".into()
                },
            });
        }
        let text = std::str::from_utf8(&buf[..n - 1]).map_err(|_| AuditError::Broken {
            line: line_no,
            why: "not UTF-8".into(),
        })?;
        if line_no == 1 {
            continues(text, &mut sum);
        }
        check_line(line_no, text, &mut sum)?;
        if head.is_none() {
            if let Some(k) = sum.key {
                head = Some(read_head(path, &k)?);
                // A crash between a rotation and the head's next write leaves the head
                // naming an entry of an earlier segment: the one this file goes on from
                // checks here, an older one cannot be (the segment is checked alone).
                if let (Some(Some((n, _))), Some((from, h))) = (head, sum.continues_from) {
                    if n == from {
                        at_head = Some(h);
                    } else if n < from {
                        head = Some(None);
                        sum.head_stale = true;
                    }
                }
            }
        }
        if let Some(Some((n, _))) = head {
            if sum.entries == n {
                at_head = Some(sum.head);
            }
        }
    }
    if head.is_none() {
        if let Some(k) = sum.key {
            head = Some(read_head(path, &k)?);
        }
    }
    if let Some(Some(h)) = head {
        if let Some(why) = short_of_head(h, sum.entries, at_head) {
            return Err(AuditError::Broken {
                line: sum.entries,
                why,
            });
        }
        sum.head_checked = true;
    }
    Ok(sum)
}

/// What a log and the rotated segments kept beside it hold, checked as one chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// The live log.
    pub live: Summary,
    /// The kept segments it goes on from, newest first, each verified and ending where
    /// the next goes on.
    pub joined: Vec<(PathBuf, Summary)>,
    /// Entries before the oldest kept file, in segments no longer kept (removed as the
    /// rotation keeps only the newest): where that file goes on from.
    pub earlier: Option<u64>,
}

/// Checks the log at `path` ([`verify_file`]) and walks back through every kept segment:
/// each must verify under the same key and end exactly where the file after it goes on.
/// A segment missing while an older one is kept is a gap, and so is a kept segment the
/// walk never reached.
pub fn verify_chain(path: &Path, key: Option<PublicKey>) -> Result<Chain, AuditError> {
    let live = verify_file(path, key)?;
    let key = live.key;
    let kept = segments(path);
    let mut chain = Chain {
        live,
        joined: Vec::new(),
        earlier: None,
    };
    let mut from = chain.live.continues_from;
    while let Some((entries, head)) = from {
        let before = segment_path(path, entries);
        if !before.exists() {
            chain.earlier = Some(entries);
            break;
        }
        let seg = verify_file(&before, key)?;
        if (seg.entries, seg.head) != (entries, head) {
            return Err(AuditError::Broken {
                line: 0,
                why: format!(
                    "{} ends at entry {}, not at {entries}, where the file after it goes on: the logs do not join",
                    before.display(),
                    seg.entries
                ),
            });
        }
        from = seg.continues_from;
        chain.joined.push((before, seg));
    }
    let reached = |p: &PathBuf| chain.joined.iter().any(|(j, _)| j == p);
    if let Some(lost) = kept.iter().find(|p| !reached(p)) {
        return Err(AuditError::Broken {
            line: 0,
            why: format!(
                "{} is kept but the chain does not reach it: a segment between is missing",
                lost.display()
            ),
        });
    }
    Ok(chain)
}

/// Takes the chain up where a rotated log's first line says it goes on from.
fn continues(first: &str, sum: &mut Summary) {
    if let Ok((entry, _, _)) = read_line(first) {
        if let Record::Continues { entries, head, .. } = &entry.record {
            if let Some(h) = from_hex_array::<32>(head) {
                sum.entries = *entries;
                sum.head = h;
                sum.continues_from = Some((*entries, h));
            }
        }
    }
}

/// Where an existing log ends: its last entry's seq + 1 and hash. A last line cut short by
/// a crash is cut off; any other damage refuses to append (the operator decides).
fn tail(path: &Path, key: &PublicKey) -> Result<(u64, [u8; 32]), AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, [0; 32])),
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    let from = len.saturating_sub(2 * MAX_LINE as u64);
    f.seek(SeekFrom::Start(from)).map_err(io)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io)?;
    let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
        if from == 0 {
            // Nothing whole was ever written.
            f.set_len(0).map_err(io)?;
            return Ok((0, [0; 32]));
        }
        return Err(AuditError::Broken {
            line: 0,
            why: "no line end near the end of the log".into(),
        });
    };
    if end + 1 < bytes.len() {
        tracing::warn!(path = %path.display(), "cutting off a last line a crash left unfinished");
        f.set_len(from + end as u64 + 1).map_err(io)?;
    }
    let start = bytes[..end]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[start..end]).map_err(|_| AuditError::Broken {
        line: 0,
        why: "the last line is not UTF-8".into(),
    })?;
    let broken = |why: String| AuditError::Broken {
        line: 0,
        why: format!("the last line: {why}"),
    };
    let (entry, hash, sig) = read_line(text).map_err(broken)?;
    key.verify(AUDIT_DOMAIN, &hash, &sig)
        .map_err(|_| broken("not signed by this coordinator".into()))?;
    Ok((entry.seq + 1, hash))
}

/// The writing end of the log; cheap to clone. Lines are written in order by one thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    path: PathBuf,
}

enum Msg {
    Record(Record),
    /// Answer once everything before is on disk.
    Sync(std::sync::mpsc::Sender<()>),
}

impl AuditLog {
    /// Opens (or starts) the log at `path`, signing with `key`, and records that it did.
    pub fn open(path: &Path, key: Keypair, pool: &str) -> Result<Self, AuditError> {
        Self::open_with(path, key, pool, Rotation::default())
    }

    /// [`AuditLog::open`], rotating the log as `rotation` says.
    pub fn open_with(
        path: &Path,
        key: Keypair,
        pool: &str,
        rotation: Rotation,
    ) -> Result<Self, AuditError> {
        let next = next_path(path);
        if !path.exists() && next.exists() {
            // A rotation stopped between its two renames.
            std::fs::rename(&next, path).map_err(|source| AuditError::Io {
                path: next.clone(),
                source,
            })?;
        }
        let (seq, head) = tail(path, &key.public())?;
        if let Some(signed) = read_head(path, &key.public())? {
            // A crash may leave the log ahead of its head, never behind it.
            let at_head = (signed.0 == seq).then_some(head);
            if signed.0 > seq || (signed.0 == seq && at_head != Some(signed.1)) {
                let why = short_of_head(signed, seq, at_head)
                    .unwrap_or_else(|| "the log does not reach its signed head".into());
                return Err(AuditError::Broken { line: seq, why });
            }
        }
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        potluck_net::identity::private_file(path).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        let (tx, rx) = sync_channel(QUEUE);
        let open = Record::Open {
            key: to_hex(&key.public().0),
            pool: pool.to_string(),
        };
        let writer = Writer {
            out: BufWriter::new(file),
            key,
            seq,
            head,
            path: path.to_path_buf(),
            rotation,
        };
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        let log = Self {
            tx,
            path: path.to_path_buf(),
        };
        log.record(open);
        Ok(log)
    }

    /// Appends `record` (in the order records arrive; blocks only if the writer is far
    /// behind).
    pub fn record(&self, record: Record) {
        if self.tx.send(Msg::Record(record)).is_err() {
            tracing::error!(path = %self.path.display(), "the audit log writer stopped");
        }
    }

    /// Waits until everything recorded so far is written and synced to disk.
    pub fn sync(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Writer {
    out: BufWriter<File>,
    key: Keypair,
    seq: u64,
    head: [u8; 32],
    path: PathBuf,
    rotation: Rotation,
}

/// Where a rotation writes the new log's first line before it takes the log's place.
fn next_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut synced = Instant::now();
        let mut unsynced = false;
        loop {
            match rx.recv_timeout(SYNC_EVERY) {
                Ok(first) => {
                    // Whatever else is queued goes in the same write; then it reaches the
                    // OS, so a crash of the process loses nothing accepted.
                    let mut waiting = Vec::new();
                    for msg in std::iter::once(first).chain(rx.try_iter().take(1024)) {
                        match msg {
                            Msg::Record(r) => self.append_logged(r),
                            Msg::Sync(done) => waiting.push(done),
                        }
                    }
                    if let Err(e) = self.out.flush() {
                        tracing::error!(path = %self.path.display(), "audit log flush failed: {e}");
                    } else {
                        // The head names the log's end whether or not it rotated.
                        if let Err(e) = self.rotate_if_full() {
                            tracing::error!(path = %self.path.display(), "audit log not rotated: {e}");
                        }
                        if let Err(e) = self.write_head() {
                            tracing::error!(path = %self.path.display(), "audit log head not written: {e}");
                        }
                    }
                    unsynced = true;
                    if !waiting.is_empty() {
                        let _ = self.out.get_ref().sync_data();
                        synced = Instant::now();
                        unsynced = false;
                        for done in waiting {
                            let _ = done.send(());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if unsynced && synced.elapsed() >= SYNC_EVERY {
                let _ = self.out.get_ref().sync_data();
                synced = Instant::now();
                unsynced = false;
            }
        }
        let _ = self.out.flush();
        let _ = self.out.get_ref().sync_data();
    }

    /// Replaces the signed head beside the log with the log's end now (whole, by rename).
    fn write_head(&self) -> std::io::Result<()> {
        let head = Head {
            entries: self.seq,
            head: to_hex(&self.head),
            sig: to_hex(
                &self
                    .key
                    .sign(AUDIT_HEAD_DOMAIN, &head_message(self.seq, &self.head))
                    .0,
            ),
        };
        let path = head_path(&self.path);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        potluck_net::identity::private_file(&tmp)?;
        std::fs::write(
            &tmp,
            serde_json::to_vec(&head).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)
    }

    /// Past its size limit, the log becomes a segment and a new one goes on from it; the
    /// oldest segments past those kept are removed.
    fn rotate_if_full(&mut self) -> std::io::Result<()> {
        if self.out.get_ref().metadata()?.len() < self.rotation.max_bytes {
            return Ok(());
        }
        self.out.get_ref().sync_data()?;
        // The new log's first line is on disk before the old log moves; until both renames
        // are done, the writer keeps appending to the old one.
        let entries = self.seq;
        let (text, hash) = self.line(Record::Continues {
            key: to_hex(&self.key.public().0),
            entries,
            head: to_hex(&self.head),
        })?;
        let next = next_path(&self.path);
        let _ = std::fs::remove_file(&next);
        potluck_net::identity::private_file(&next)?;
        let mut file = OpenOptions::new().append(true).open(&next)?;
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&next);
            return Err(e);
        }
        let segment = segment_path(&self.path, entries);
        if let Err(e) = std::fs::rename(&self.path, &segment) {
            let _ = std::fs::remove_file(&next);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&next, &self.path) {
            // Put the old log back; a crash here is what `open` finishes.
            let _ = std::fs::rename(&segment, &self.path);
            return Err(e);
        }
        self.out = BufWriter::new(file);
        self.seq += 1;
        self.head = hash;
        let all = segments(&self.path);
        // Oldest first, so that a removal that fails leaves no gap behind newer ones.
        for old in all
            .iter()
            .take(all.len().saturating_sub(self.rotation.keep))
        {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::error!(path = %old.display(), "old audit segment not removed: {e}");
                break;
            }
        }
        tracing::info!(path = %self.path.display(), entries, "audit log rotated");
        Ok(())
    }

    fn append_logged(&mut self, record: Record) {
        if let Err(e) = self.append(record) {
            tracing::error!(path = %self.path.display(), "audit log write failed: {e}");
        }
    }

    fn append(&mut self, record: Record) -> std::io::Result<()> {
        let (text, hash) = self.line(record)?;
        self.out.write_all(text.as_bytes())?;
        self.seq += 1;
        self.head = hash;
        Ok(())
    }

    /// The next line for `record`, signed, and its entry's hash.
    fn line(&self, record: Record) -> std::io::Result<(String, [u8; 32])> {
        let entry = Entry {
            seq: self.seq,
            prev: to_hex(&self.head),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            record,
        };
        let raw = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
        let hash = digest(raw.as_bytes());
        let raw = RawValue::from_string(raw).map_err(std::io::Error::other)?;
        let line = LineOut {
            hash: to_hex(&hash),
            sig: to_hex(&self.key.sign(AUDIT_DOMAIN, &hash).0),
            entry: &raw,
        };
        let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        text.push('\n');
        Ok((text, hash))
    }
}

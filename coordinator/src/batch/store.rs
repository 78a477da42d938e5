//! The coordinator's durable job store, in SQLite: uploaded files, batches, their work units,
//! every assignment of a unit to a peer with what the peer returned, and the credit ledger.
//! Each change is one transaction, and the database is in WAL mode with full syncs, so a
//! coordinator killed at any instant restarts with every accepted batch and every validated
//! unit intact; assignments that were running are marked lost and their units run again.

use crate::origin::Origin;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use thiserror::Error;

/// The store's file name in the coordinator's data directory.
pub const STORE_FILE: &str = "jobs.sqlite";

/// Why the store refused or failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite failed (corrupt file, I/O error, ...).
    #[error("job store: {0}")]
    Sqlite(rusqlite::Error),
    /// There is no room for more: the store is at its size limit, its disk keeps too
    /// little free, or the disk is full. What the store holds is kept.
    #[error("{0}")]
    Full(String),
    /// The store's file could not be created or made private.
    #[error("job store {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No such file or batch.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the object's state.
    #[error("{0}")]
    Conflict(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(
                "the disk holding the job store is full; nothing stored was lost".into(),
            ),
            _ => StoreError::Sqlite(e),
        }
    }
}

/// Store result type.
pub type Result<T> = std::result::Result<T, StoreError>;

/// How much the store may hold, and how much of its disk it leaves free.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes the store's pages may hold.
    pub max_bytes: u64,
    /// Bytes of its disk kept free: new files and batches are refused below this.
    pub min_free_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_STORE_BYTES,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// The store's size limit unless configured otherwise.
pub const DEFAULT_MAX_STORE_BYTES: u64 = 16 << 30;
/// Disk space kept free unless configured otherwise.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 512 << 20;

/// What [`Store::expire`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Finished batches, with their units and results.
    pub batches: u64,
    /// Uploaded files no remaining batch reads.
    pub files: u64,
}

/// Free bytes on the file system holding the file `path`, if it can be asked.
fn free_bytes(path: &Path) -> Option<u64> {
    // A bare file name (`jobs.sqlite`) lies in the working directory.
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => free_bytes_in(d),
        _ => free_bytes_in(Path::new(".")),
    }
}

/// Free bytes on the file system holding the folder `dir`, if it can be asked.
fn free_bytes_in(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` is a writable statvfs the call fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// What a batch's units ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Greedy chat completions.
    Chat,
    /// Sentence embeddings.
    Embed,
}

impl Kind {
    /// Its name in the store and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Embed => "embed",
        }
    }

    /// The kind of a stored or typed name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat" => Some(Kind::Chat),
            "embed" => Some(Kind::Embed),
            _ => None,
        }
    }

    /// The OpenAI endpoint its lines name.
    pub fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Embed => "/v1/embeddings",
        }
    }

    /// The kind whose lines go to `endpoint`.
    pub fn of_endpoint(endpoint: &str) -> Option<Self> {
        [Kind::Chat, Kind::Embed]
            .into_iter()
            .find(|k| k.endpoint() == endpoint)
    }
}

/// An uploaded file.
#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    /// `file-…`.
    pub id: String,
    /// The name it was uploaded under.
    pub filename: String,
    /// What it is for (`batch`).
    pub purpose: String,
    /// Its size.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
}

/// A batch as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct BatchInfo {
    /// `batch_…`.
    pub id: String,
    /// What its units ask for.
    pub kind: Kind,
    /// The model its units run on.
    pub model: String,
    /// The uploaded file it was cut from.
    pub input_file_id: String,
    /// validating, in_progress, completed, failed, cancelling, cancelled.
    pub status: String,
    /// Unix seconds.
    pub created_at: u64,
    /// When it finished (completed, failed or cancelled), unix seconds.
    pub finished_at: Option<u64>,
    /// Units.
    pub total: u64,
    /// Units validated.
    pub completed: u64,
    /// Units that failed (or lines that could not be read).
    pub failed: u64,
    /// Why the whole batch failed, if it did.
    pub error: Option<String>,
    /// Results peers returned for its units, agreeing or not (a unit takes `quorum` or
    /// more).
    pub results: u64,
}

/// A unit still to be run.
#[derive(Debug, Clone)]
pub struct OpenUnit {
    /// Its id.
    pub id: i64,
    /// Its batch.
    pub batch: String,
    /// Kind of work.
    pub kind: Kind,
    /// The request body (JSON) of its line.
    pub body: String,
    /// Results returned so far: who gave each, and its output JSON.
    pub results: Vec<(Asked, String)>,
    /// Peers running it now.
    pub running: Vec<Asked>,
}

/// A peer a unit was sent to, and whose voice its result is.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    /// The peer's id.
    pub peer: String,
    /// Its origin when it was sent the unit.
    pub origin: Origin,
}

impl OpenUnit {
    fn asked_now(&self) -> impl Iterator<Item = &Asked> {
        self.running
            .iter()
            .chain(self.results.iter().map(|(a, _)| a))
    }

    /// Whether `peer` returned a result for it or is running it (replicas go elsewhere; a
    /// peer whose try failed or was lost may try again, the only way a small pool finishes).
    pub fn asked(&self, peer: &str) -> bool {
        self.asked_now().any(|a| a.peer == peer)
    }

    /// Whether a peer of `origin` returned a result for it or is running it: another of
    /// its peers would add no voice to the quorum.
    pub fn heard_from(&self, origin: &Origin) -> bool {
        self.asked_now().any(|a| &a.origin == origin)
    }
}

/// One peer's line of the credit ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Credit {
    /// The peer.
    pub peer: String,
    /// Units it helped validate.
    pub units: u64,
    /// Tokens of those units.
    pub tokens: u64,
    /// Work credited: tokens times the model's FLOPs per token.
    pub flops: f64,
    /// Credit voided because the peer was quarantined later.
    pub voided_flops: f64,
}

/// A line of a batch's input that could not become a unit.
#[derive(Debug, Clone)]
pub struct LineError {
    /// 1-based line number.
    pub line: u64,
    /// The line's custom_id, when it had one.
    pub custom_id: Option<String>,
    /// What was wrong.
    pub message: String,
}

/// A line that became a unit.
#[derive(Debug, Clone)]
pub struct NewUnit {
    /// 1-based line number.
    pub line: u64,
    /// The caller's id for it.
    pub custom_id: String,
    /// The request body, JSON.
    pub body: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, content BLOB NOT NULL,
    owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,
    input_file_id TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    finished_at INTEGER, error TEXT, owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY AUTOINCREMENT, batch TEXT NOT NULL, line INTEGER NOT NULL,
    custom_id TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL,          -- open, done, failed
    result TEXT,                  -- the response body (done) or error message (failed)
    tokens INTEGER NOT NULL DEFAULT 0,
    UNIQUE (batch, line));
CREATE INDEX IF NOT EXISTS units_open ON units (state, id);
CREATE TABLE IF NOT EXISTS line_errors (
    batch TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, message TEXT NOT NULL,
    PRIMARY KEY (batch, line));
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, unit INTEGER NOT NULL, peer TEXT NOT NULL,
    state TEXT NOT NULL,          -- running, returned, failed, lost
    started_at INTEGER NOT NULL, output TEXT, tokens INTEGER NOT NULL DEFAULT 0,
    receipt BLOB, detail TEXT, origin TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS assignments_unit ON assignments (unit);
CREATE TABLE IF NOT EXISTS credits (
    peer TEXT NOT NULL, unit INTEGER NOT NULL, tokens INTEGER NOT NULL,
    flops REAL NOT NULL, voided INTEGER NOT NULL DEFAULT 0, at INTEGER NOT NULL,
    PRIMARY KEY (peer, unit));
";

/// Gives stores from before unit and assignment ids were AUTOINCREMENT tables that are:
/// SQLite otherwise hands out the ids of expired rows again, and a credit for a new unit
/// that took an old one's id would be dropped as a duplicate of one already in the ledger.
fn never_reuse_ids(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction()?;
    let mut rebuilt = false;
    for (table, index) in [("units", "units_open"), ("assignments", "assignments_unit")] {
        let sql: String = tx.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )?;
        if sql.contains("AUTOINCREMENT") {
            continue;
        }
        let columns: Vec<String> = {
            let mut q = tx.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
            let names = q.query_map([table], |r| r.get(0))?;
            names.collect::<rusqlite::Result<_>>()?
        };
        let columns = columns.join(", ");
        tx.execute_batch(&format!(
            "DROP INDEX IF EXISTS {index}; ALTER TABLE {table} RENAME TO {table}_old;"
        ))?;
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(&format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_old; DROP TABLE {table}_old;"
        ))?;
        rebuilt = true;
    }
    if rebuilt {
        // Units expired before this store was rebuilt may have had higher ids than any
        // left; the ledger still names them.
        tx.execute(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'units', 0
             WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'units')",
            [],
        )?;
        tx.execute(
            "UPDATE sqlite_sequence SET seq = MAX(seq, (SELECT COALESCE(MAX(unit), 0) FROM credits))
             WHERE name = 'units'",
            [],
        )?;
        tracing::info!("the job store's unit and assignment ids are never reused from now on");
    }
    tx.commit()?;
    Ok(())
}

/// Rewrites a store made before incremental auto-vacuum (`VACUUM`), once, so that what it
/// removes goes back to the disk; only where the store's disk and the temporary folder
/// SQLite builds the copy in have room for it. A failure is logged, not fatal.
fn vacuum_once(conn: &Connection, path: &Path) {
    let mode: i64 = match conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("the job store's vacuum mode could not be read: {e}");
            return;
        }
    };
    if mode != 0 {
        return;
    }
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let room = |free: Option<u64>| free.is_none_or(|free| free > size.saturating_mul(3));
    if !room(free_bytes(path)) || !room(free_bytes_in(&std::env::temp_dir())) {
        tracing::warn!(
            "the job store ({}) is not rewritten to give removed pages back: its disk or the temporary folder lacks room for the copy",
            mib(size)
        );
        return;
    }
    tracing::info!(
        "rewriting the job store ({}) once, so that what it removes goes back to the disk",
        mib(size)
    );
    if let Err(e) = conn.execute_batch("VACUUM") {
        tracing::warn!(
            "the job store was not rewritten ({e}); it is tried again at the next start"
        );
    }
}

/// Returns the store's free pages to the disk. The pragma frees one page per step, so it
/// is stepped to its end (`execute_batch` steps once).
fn give_pages_back(conn: &Connection) -> rusqlite::Result<()> {
    let mut q = conn.prepare("PRAGMA incremental_vacuum")?;
    let mut rows = q.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh id with `prefix`: 12 random bytes in hex (the clock when no randomness is had).
fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    if getrandom::fill(&mut b).is_err() {
        b[..8].copy_from_slice(
            &std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .to_le_bytes(),
        );
    }
    format!("{prefix}{}", potluck_protocol::hex::to_hex(&b))
}

/// The job store; cheap to share behind an `Arc`.
pub struct Store {
    conn: Mutex<Connection>,
    path: std::path::PathBuf,
    limits: Limits,
}

/// Bytes set aside beside the store (`jobs.sqlite.reserve`) and given back when the disk
/// fills, so that deleting and expiring, which SQLite must journal, can still run.
const RESERVE_BYTES: usize = 1 << 20;

fn reserve_path(store: &Path) -> std::path::PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(".reserve");
    p.into()
}

/// Runs `f`, which SQLite must journal; if the disk is too full for that, gives back the
/// store's reserve and runs it again.
fn on_reserve_if_full<T>(store: &Path, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    match f() {
        Err(StoreError::Full(_)) if std::fs::remove_file(reserve_path(store)).is_ok() => {
            tracing::warn!(
                "the disk holding the job store is full: its reserve is given back so that the store can still journal"
            );
            f()
        }
        other => other,
    }
}

/// Sets the reserve aside if it is not (a failure to is no error: the disk is full).
fn set_reserve_aside(store: &Path) {
    let path = reserve_path(store);
    if path.exists() {
        return;
    }
    let made = potluck_net::identity::private_file(&path)
        .and_then(|()| std::fs::write(&path, vec![0u8; RESERVE_BYTES]));
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

impl Store {
    /// Opens (creating when needed) the store at `path`, and marks assignments that were
    /// running when the last process stopped as lost, so their units run again.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Limits::default())
    }

    /// [`Store::open`], holding at most what `limits` allow.
    pub fn open_with(path: &Path, limits: Limits) -> Result<Self> {
        // It holds prompts and outputs; SQLite gives its -wal and -shm files this mode too.
        potluck_net::identity::private_file(path).map_err(|source| StoreError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let mut conn = Connection::open(path)?;
        // Deleted files and expired batches give their pages back to the disk (a store
        // made before keeps its mode until `vacuum_once`).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // A write-ahead log swollen by a large upload shrinks back after its checkpoint.
        conn.pragma_update(None, "journal_size_limit", 8 << 20)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Stores from before owners were kept: their files and batches belong to no member;
        // from before origins were kept: each result is its peer's voice alone.
        for (table, column) in [
            ("files", "owner"),
            ("batches", "owner"),
            ("assignments", "origin"),
        ] {
            let has: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )?;
            if !has {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
                ))?;
            }
        }
        // Neither is worth a coordinator that does not start: each is tried again at the
        // next open.
        if let Err(e) = on_reserve_if_full(path, || never_reuse_ids(&mut conn)) {
            tracing::warn!("the job store's ids could not be made never to repeat yet ({e}); expired units' ids may be handed out again, and credit for them dropped");
        }
        vacuum_once(&conn, path);
        let lost = conn.execute(
            "UPDATE assignments SET state = 'lost', detail = 'coordinator restarted' WHERE state = 'running'",
            [],
        )?;
        if lost > 0 {
            tracing::info!(
                "{lost} running assignments lost in the last stop; their units run again"
            );
        }
        set_reserve_aside(path);
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            limits,
        })
    }

    /// Runs `f`, a removal, on the reserve if the disk is full ([`on_reserve_if_full`]),
    /// then gives the freed pages back to the disk.
    fn removing<T>(&self, f: impl FnMut() -> Result<T>) -> Result<T> {
        let done = on_reserve_if_full(&self.path, f);
        if done.is_ok() {
            // Free pages go back to the disk now, not at some later checkpoint; on a disk
            // still too full for that they wait, reused by the store's next writes.
            let conn = self.conn();
            if let Err(e) = give_pages_back(&conn) {
                tracing::debug!("store pages not given back yet: {e}");
            } else if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            {
                tracing::debug!("store checkpoint: {e}");
            }
        }
        done
    }

    /// Bytes the store's pages hold now (free pages not counted).
    pub fn used_bytes(&self) -> Result<u64> {
        let conn = self.conn();
        let pages: u64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: u64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(pages.saturating_sub(free).saturating_mul(size))
    }

    /// Whether `more` bytes fit: under the store's limit, and leaving its disk the free
    /// space it keeps; why not otherwise.
    fn room_for(&self, more: u64) -> Result<()> {
        set_reserve_aside(&self.path);
        let used = self.used_bytes()?;
        let max = self.limits.max_bytes;
        if used.saturating_add(more) > max {
            return Err(StoreError::Full(format!(
                "the job store holds {} of its {} limit; delete files (DELETE /v1/files/ID) or wait for finished batches to expire",
                mib(used),
                mib(max)
            )));
        }
        if let Some(free) = free_bytes(&self.path) {
            let keep = self.limits.min_free_bytes;
            // Written twice before a checkpoint: to the write-ahead log, then the store.
            if free.saturating_sub(more.saturating_mul(2)) < keep {
                return Err(StoreError::Full(format!(
                    "the disk holding the job store has {} free and {} is kept free",
                    mib(free),
                    mib(keep)
                )));
            }
        }
        Ok(())
    }

    /// Removes batches that finished before unix time `before`, with their units, results
    /// and line errors (their output files go with them), and uploaded files from before
    /// then that no remaining batch reads. The credit ledger is kept whole.
    pub fn expire(&self, before: u64) -> Result<Expired> {
        self.removing(|| self.expire_once(before))
    }

    fn expire_once(&self, before: u64) -> Result<Expired> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS expiring (id TEXT PRIMARY KEY); DELETE FROM expiring;",
        )?;
        let batches = tx.execute(
            "INSERT INTO expiring SELECT id FROM batches
             WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at IS NOT NULL AND finished_at < ?1",
            [before],
        )? as u64;
        tx.execute_batch(
            "DELETE FROM assignments WHERE unit IN (SELECT u.id FROM units u JOIN expiring e ON e.id = u.batch);
             DELETE FROM units WHERE batch IN (SELECT id FROM expiring);
             DELETE FROM line_errors WHERE batch IN (SELECT id FROM expiring);
             DELETE FROM batches WHERE id IN (SELECT id FROM expiring);
             DELETE FROM expiring;",
        )?;
        let files = tx.execute(
            "DELETE FROM files WHERE created_at < ?1 AND id NOT IN (SELECT input_file_id FROM batches)",
            [before],
        )? as u64;
        tx.commit()?;
        Ok(Expired { batches, files })
    }

    /// Deletes `owner`'s file `id`, unless a batch still running reads it.
    pub fn delete_file(&self, id: &str, owner: &str) -> Result<()> {
        self.removing(|| self.delete_file_once(id, owner))
    }

    fn delete_file_once(&self, id: &str, owner: &str) -> Result<()> {
        self.owns_file(id, owner)?;
        let conn = self.conn();
        let busy: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM batches WHERE input_file_id = ?1 AND status IN ('validating', 'in_progress', 'cancelling')",
            [id],
            |r| r.get(0),
        )?;
        if busy {
            return Err(StoreError::Conflict(format!(
                "file {id} is the input of a batch still running"
            )));
        }
        conn.execute("DELETE FROM files WHERE id = ?1", [id])?;
        Ok(())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a file `owner` (a member's name) uploaded.
    pub fn add_file(
        &self,
        filename: &str,
        purpose: &str,
        content: &[u8],
        owner: &str,
    ) -> Result<FileInfo> {
        self.room_for(content.len() as u64)?;
        let info = FileInfo {
            id: new_id("file-"),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes: content.len() as u64,
            created_at: now(),
        };
        self.conn().execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, content, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![info.id, info.filename, info.purpose, info.bytes, info.created_at, content, owner],
        )?;
        Ok(info)
    }

    /// Whether file `id` is `owner`'s; another member's file is not found, as a missing
    /// one is, so ids cannot be probed.
    pub fn owns_file(&self, id: &str, owner: &str) -> Result<()> {
        self.owns("files", "file", id, owner)
    }

    /// Whether batch `id` is `owner`'s (see [`Store::owns_file`]).
    pub fn owns_batch(&self, id: &str, owner: &str) -> Result<()> {
        self.owns("batches", "batch", id, owner)
    }

    fn owns(&self, table: &str, what: &str, id: &str, owner: &str) -> Result<()> {
        let sql = format!("SELECT COUNT(*) > 0 FROM {table} WHERE id = ?1 AND owner = ?2");
        let found: bool = self
            .conn()
            .query_row(&sql, params![id, owner], |r| r.get(0))?;
        if found {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("{what} {id}")))
        }
    }

    /// An uploaded file's description.
    pub fn file(&self, id: &str) -> Result<FileInfo> {
        self.conn()
            .query_row(
                "SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ?1",
                [id],
                |r| {
                    Ok(FileInfo {
                        id: r.get(0)?,
                        filename: r.get(1)?,
                        purpose: r.get(2)?,
                        bytes: r.get(3)?,
                        created_at: r.get(4)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("file {id}")))
    }

    /// An uploaded file's bytes.
    pub fn file_content(&self, id: &str) -> Result<Vec<u8>> {
        self.conn()
            .query_row("SELECT content FROM files WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("file {id}")))
    }

    /// Creates a batch of `units` (and the `errors` of lines that could not be read), all
    /// in one transaction. A batch with no units is finished at once.
    pub fn create_batch(
        &self,
        kind: Kind,
        model: &str,
        input_file_id: &str,
        units: &[NewUnit],
        errors: &[LineError],
        owner: &str,
    ) -> Result<BatchInfo> {
        let body_bytes: usize = units.iter().map(|u| u.body.len() + u.custom_id.len()).sum();
        self.room_for(body_bytes as u64)?;
        let id = new_id("batch_");
        let at = now();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // Checked here, in the transaction, not only by the caller before: a delete or an
        // expiry between the two would leave a batch whose input is gone.
        let input: bool = tx.query_row(
            "SELECT COUNT(*) > 0 FROM files WHERE id = ?1",
            [input_file_id],
            |r| r.get(0),
        )?;
        if !input {
            return Err(StoreError::NotFound(format!("file {input_file_id}")));
        }
        let (status, finished) = if units.is_empty() {
            ("failed", Some(at))
        } else {
            ("in_progress", None)
        };
        tx.execute(
            "INSERT INTO batches (id, kind, model, input_file_id, status, created_at, finished_at, error, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                kind.as_str(),
                model,
                input_file_id,
                status,
                at,
                finished,
                units.is_empty().then_some("no line of the file could be run"),
                owner
            ],
        )?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO units (batch, line, custom_id, body, state) VALUES (?1, ?2, ?3, ?4, 'open')",
            )?;
            for u in units {
                ins.execute(params![id, u.line, u.custom_id, u.body])?;
            }
            let mut err = tx.prepare(
                "INSERT INTO line_errors (batch, line, custom_id, message) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in errors {
                err.execute(params![id, e.line, e.custom_id, e.message])?;
            }
        }
        tx.commit()?;
        drop(conn);
        self.batch(&id)
    }

    /// A batch's description and counts.
    pub fn batch(&self, id: &str) -> Result<BatchInfo> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT kind, model, input_file_id, status, created_at, finished_at, error FROM batches WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, u64>(4)?,
                        r.get::<_, Option<u64>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("batch {id}")))?;
        let (units, done, failed): (u64, u64, u64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'failed'), 0) FROM units WHERE batch = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let bad_lines: u64 = conn.query_row(
            "SELECT COUNT(*) FROM line_errors WHERE batch = ?1",
            [id],
            |r| r.get(0),
        )?;
        let results: u64 = conn.query_row(
            "SELECT COUNT(*) FROM assignments a JOIN units u ON u.id = a.unit WHERE u.batch = ?1 AND a.state = 'returned'",
            [id],
            |r| r.get(0),
        )?;
        Ok(BatchInfo {
            id: id.to_string(),
            kind: Kind::parse(&row.0).unwrap_or(Kind::Chat),
            model: row.1,
            input_file_id: row.2,
            status: row.3,
            created_at: row.4,
            finished_at: row.5,
            total: units + bad_lines,
            completed: done,
            failed: failed + bad_lines,
            error: row.6,
            results,
        })
    }

    /// The newest `limit` batches, newest first: `owner`'s, or everyone's when `None`.
    pub fn batches(&self, limit: usize, owner: Option<&str>) -> Result<Vec<BatchInfo>> {
        let ids: Vec<String> = {
            let conn = self.conn();
            let mut q = conn.prepare(
                "SELECT id FROM batches WHERE ?2 IS NULL OR owner = ?2 ORDER BY created_at DESC, rowid DESC LIMIT ?1",
            )?;
            let rows = q.query_map(params![limit as i64, owner], |r| r.get(0))?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        ids.iter().map(|id| self.batch(id)).collect()
    }

    /// Cancels a batch: its open units are not run; what was validated stays in its output.
    pub fn cancel(&self, id: &str) -> Result<BatchInfo> {
        let changed = self.conn().execute(
            "UPDATE batches SET status = 'cancelled', finished_at = ?2 WHERE id = ?1 AND status = 'in_progress'",
            params![id, now()],
        )?;
        let info = self.batch(id)?;
        if changed == 0 && info.status != "cancelled" {
            return Err(StoreError::Conflict(format!(
                "batch {id} is {}, it cannot be cancelled",
                info.status
            )));
        }
        Ok(info)
    }

    /// Open units of running batches, oldest first, at most `limit`, with their results
    /// and assignments so far.
    pub fn open_units(&self, limit: usize) -> Result<Vec<OpenUnit>> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT u.id, u.batch, b.kind, u.body FROM units u JOIN batches b ON b.id = u.batch
             WHERE u.state = 'open' AND b.status = 'in_progress' ORDER BY u.id LIMIT ?1",
        )?;
        let rows = q.query_map([limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        let mut a = conn.prepare(
            "SELECT peer, state, output, origin FROM assignments WHERE unit = ?1 ORDER BY id",
        )?;
        for row in rows {
            let (id, batch, kind, body) = row?;
            let mut unit = OpenUnit {
                id,
                batch,
                kind: Kind::parse(&kind).unwrap_or(Kind::Chat),
                body,
                results: Vec::new(),
                running: Vec::new(),
            };
            let assigned = a.query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            for x in assigned {
                let (peer, state, output, origin) = x?;
                let asked = Asked {
                    origin: Origin::from_stored(&origin, &peer),
                    peer,
                };
                match (state.as_str(), output) {
                    ("running", _) => unit.running.push(asked),
                    ("returned", Some(o)) => unit.results.push((asked, o)),
                    _ => {}
                }
            }
            out.push(unit);
        }
        Ok(out)
    }

    /// Records that `unit` was sent to `peer` of `origin`; returns the assignment's id.
    pub fn start_assignment(&self, unit: i64, peer: &str, origin: &Origin) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO assignments (unit, peer, state, started_at, origin) VALUES (?1, ?2, 'running', ?3, ?4)",
            params![unit, peer, now(), origin.to_stored()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Records an assignment's answer: its output (JSON), tokens and receipt.
    pub fn returned(
        &self,
        assignment: i64,
        output: &str,
        tokens: u64,
        receipt: &[u8],
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE assignments SET state = 'returned', output = ?2, tokens = ?3, receipt = ?4 WHERE id = ?1 AND state = 'running'",
            params![assignment, output, tokens, receipt],
        )?;
        Ok(())
    }

    /// Records that an assignment failed (timed out, refused, or answered wrongly).
    pub fn failed(&self, assignment: i64, why: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE assignments SET state = 'failed', detail = ?2 WHERE id = ?1 AND state = 'running'",
            params![assignment, why],
        )?;
        Ok(())
    }

    /// Validates `unit` with `result` (the response body), crediting each of `credited`
    /// peers `tokens` tokens worth `flops`, and finishes its batch if this was its last
    /// open unit; one transaction. Returns false if the unit was no longer open.
    pub fn validate(
        &self,
        unit: i64,
        result: &str,
        tokens: u64,
        flops: f64,
        credited: &[String],
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE units SET state = 'done', result = ?2, tokens = ?3 WHERE id = ?1 AND state = 'open'",
            params![unit, result, tokens],
        )?;
        if changed == 0 {
            return Ok(false);
        }
        let at = now();
        for peer in credited {
            tx.execute(
                "INSERT OR IGNORE INTO credits (peer, unit, tokens, flops, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![peer, unit, tokens, flops, at],
            )?;
        }
        finish_if_done(&tx, unit)?;
        tx.commit()?;
        Ok(true)
    }

    /// Gives up on `unit` with `why`; finishes its batch if this was its last open unit.
    pub fn fail_unit(&self, unit: i64, why: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE units SET state = 'failed', result = ?2 WHERE id = ?1 AND state = 'open'",
            params![unit, why],
        )?;
        finish_if_done(&tx, unit)?;
        tx.commit()?;
        Ok(())
    }

    /// Voids the credit of a peer caught cheating.
    pub fn void_credit(&self, peer: &str) -> Result<usize> {
        Ok(self
            .conn()
            .execute("UPDATE credits SET voided = 1 WHERE peer = ?1", [peer])?)
    }

    /// The ledger, biggest contributors first.
    pub fn credits(&self) -> Result<Vec<Credit>> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT peer, SUM(voided = 0), SUM(CASE WHEN voided = 0 THEN tokens ELSE 0 END),
                    SUM(CASE WHEN voided = 0 THEN flops ELSE 0 END),
                    SUM(CASE WHEN voided = 1 THEN flops ELSE 0 END)
             FROM credits GROUP BY peer ORDER BY 4 DESC, peer",
        )?;
        let rows = q.query_map([], |r| {
            Ok(Credit {
                peer: r.get(0)?,
                units: r.get(1)?,
                tokens: r.get(2)?,
                flops: r.get(3)?,
                voided_flops: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// A batch's output, one JSON line per validated unit in input order, and its error
    /// lines (unreadable lines and failed units), in OpenAI's batch output shape.
    pub fn outputs(&self, batch: &str) -> Result<(String, String)> {
        let conn = self.conn();
        let mut out = String::new();
        let mut errors: Vec<(u64, String)> = Vec::new();
        let mut q = conn.prepare(
            "SELECT id, line, custom_id, state, result FROM units WHERE batch = ?1 AND state != 'open' ORDER BY line",
        )?;
        let rows = q.query_map([batch], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        for row in rows {
            let (id, line, custom_id, state, result) = row?;
            let result = result.unwrap_or_default();
            if state == "done" {
                let body: serde_json::Value =
                    serde_json::from_str(&result).unwrap_or(serde_json::Value::Null);
                let v = serde_json::json!({
                    "id": format!("{batch}-{id}"),
                    "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": format!("{batch}-{id}"), "body": body},
                    "error": null,
                });
                out.push_str(&v.to_string());
                out.push('\n');
            } else {
                let v = serde_json::json!({
                    "id": format!("{batch}-{id}"),
                    "custom_id": custom_id,
                    "response": null,
                    "error": {"code": "unit_failed", "message": result, "line": line},
                });
                errors.push((line, v.to_string()));
            }
        }
        let mut e =
            conn.prepare("SELECT line, custom_id, message FROM line_errors WHERE batch = ?1")?;
        let rows = e.query_map([batch], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (line, custom_id, message) = row?;
            let v = serde_json::json!({
                "id": format!("{batch}-line-{line}"),
                "custom_id": custom_id,
                "response": null,
                "error": {"code": "invalid_line", "message": message, "line": line},
            });
            errors.push((line, v.to_string()));
        }
        errors.sort_by_key(|e| e.0);
        let errors = errors.into_iter().map(|(_, l)| l + "\n").collect();
        Ok((out, errors))
    }
}

/// Marks the batch of `unit` completed once none of its units is open.
fn finish_if_done(tx: &rusqlite::Transaction<'_>, unit: i64) -> Result<()> {
    tx.execute(
        "UPDATE batches SET status = 'completed', finished_at = ?2
         WHERE id = (SELECT batch FROM units WHERE id = ?1) AND status = 'in_progress'
           AND NOT EXISTS (SELECT 1 FROM units WHERE batch = batches.id AND state = 'open')",
        params![unit, now()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(line: u64) -> NewUnit {
        NewUnit {
            line,
            custom_id: format!("req-{line}"),
            body: format!("{{\"input\": \"text {line}\"}}"),
        }
    }

    #[test]
    fn a_full_store_refuses_new_work_and_keeps_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let kept = {
            let s = Store::open(&path).unwrap();
            s.add_file("a.jsonl", "batch", &[b'x'; 5000], "alice")
                .unwrap()
                .id
        };
        let used = Store::open(&path).unwrap().used_bytes().unwrap();
        let tight = Limits {
            max_bytes: used + 20_000,
            min_free_bytes: 0,
        };
        let s = Store::open_with(&path, tight).unwrap();
        let refused = s.add_file("b.jsonl", "batch", &[b'y'; 50_000], "alice");
        assert!(
            matches!(&refused, Err(StoreError::Full(why)) if why.contains("limit")),
            "{refused:?}"
        );
        assert_eq!(s.file_content(&kept).unwrap().len(), 5000);
        // A disk that must keep more free than it has refuses too.
        let greedy = Limits {
            max_bytes: u64::MAX,
            min_free_bytes: u64::MAX,
        };
        let s = Store::open_with(&path, greedy).unwrap();
        let refused = s.create_batch(Kind::Embed, "m", &kept, &[unit(1)], &[], "alice");
        assert!(
            matches!(&refused, Err(StoreError::Full(why)) if why.contains("kept free")),
            "{refused:?}"
        );
        // Deleting makes room: only the owner may, and not under a running batch.
        let s = Store::open_with(&path, tight).unwrap();
        let b = s
            .create_batch(Kind::Embed, "m", &kept, &[unit(1)], &[], "alice")
            .unwrap();
        assert!(matches!(
            s.delete_file(&kept, "bob"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.delete_file(&kept, "alice"),
            Err(StoreError::Conflict(_))
        ));
        s.cancel(&b.id).unwrap();
        s.delete_file(&kept, "alice").unwrap();
        s.add_file("b.jsonl", "batch", &[b'y'; 15_000], "alice")
            .unwrap();
    }

    #[test]
    fn finished_batches_and_unused_files_expire_and_the_ledger_stays() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join(STORE_FILE)).unwrap();
        let done_file = s.add_file("a.jsonl", "batch", b"{}", "alice").unwrap().id;
        let live_file = s.add_file("b.jsonl", "batch", b"{}", "alice").unwrap().id;
        let done = s
            .create_batch(Kind::Embed, "m", &done_file, &[unit(1)], &[], "alice")
            .unwrap();
        let live = s
            .create_batch(Kind::Embed, "m", &live_file, &[unit(1)], &[], "alice")
            .unwrap();
        let unit_of = |batch: &str| {
            s.open_units(10)
                .unwrap()
                .into_iter()
                .find(|u| u.batch == batch)
                .unwrap()
                .id
        };
        let u = unit_of(&done.id);
        let a = s
            .start_assignment(u, "peerA", &Origin::Key("peerA".into()))
            .unwrap();
        s.returned(a, "[1]", 5, b"r").unwrap();
        assert!(s.validate(u, "{}", 5, 10.0, &["peerA".into()]).unwrap());
        assert_eq!(s.batch(&done.id).unwrap().status, "completed");
        // Nothing is old enough yet.
        assert_eq!(s.expire(0).unwrap(), Expired::default());
        let gone = s.expire(now() + 10).unwrap();
        assert_eq!(
            gone,
            Expired {
                batches: 1,
                files: 1
            }
        );
        assert!(matches!(s.batch(&done.id), Err(StoreError::NotFound(_))));
        assert!(s.file_content(&done_file).is_err());
        assert_eq!(s.batch(&live.id).unwrap().status, "in_progress");
        assert!(s.file_content(&live_file).is_ok());
        let ledger = s.credits().unwrap();
        assert_eq!(ledger.len(), 1);
        assert_eq!((ledger[0].units, ledger[0].tokens), (1, 5));
    }

    /// Runs one batch of one unit that `peer` validates for 5 tokens; returns its unit id.
    fn validated_unit(s: &Store, peer: &str) -> i64 {
        let file = s.add_file("a.jsonl", "batch", b"{}", "alice").unwrap().id;
        let b = s
            .create_batch(Kind::Embed, "m", &file, &[unit(1)], &[], "alice")
            .unwrap();
        let u = s
            .open_units(10)
            .unwrap()
            .into_iter()
            .find(|u| u.batch == b.id)
            .unwrap()
            .id;
        let a = s
            .start_assignment(u, peer, &Origin::Key(peer.into()))
            .unwrap();
        s.returned(a, "[1]", 5, b"r").unwrap();
        assert!(s.validate(u, "{}", 5, 10.0, &[peer.into()]).unwrap());
        u
    }

    #[test]
    fn the_free_space_of_a_bare_file_name_is_its_working_directorys() {
        assert!(free_bytes(Path::new(STORE_FILE)).is_some());
    }

    #[test]
    fn a_store_from_before_auto_vacuum_gives_removed_pages_back_after_it_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        {
            // As earlier versions left it: write-ahead logging, no auto-vacuum.
            let old = Connection::open(&path).unwrap();
            old.pragma_update(None, "journal_mode", "WAL").unwrap();
            old.execute_batch(&SCHEMA.replace(" AUTOINCREMENT", ""))
                .unwrap();
            let mode: i64 = old
                .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, 0);
        }
        let s = Store::open(&path).unwrap();
        let mode: i64 = s
            .conn()
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 2, "incremental");
        let f = s
            .add_file("a.jsonl", "batch", &[b'x'; 400_000], "alice")
            .unwrap();
        let pages = |s: &Store| -> u64 {
            s.conn()
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap()
        };
        let full = pages(&s);
        s.delete_file(&f.id, "alice").unwrap();
        assert!(pages(&s) < full / 2, "{} of {full} pages kept", pages(&s));
    }

    #[test]
    fn work_validated_after_an_expiry_is_credited_and_takes_a_fresh_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join(STORE_FILE)).unwrap();
        let first = validated_unit(&s, "peerA");
        assert_eq!(s.expire(now() + 10).unwrap().batches, 1);
        let second = validated_unit(&s, "peerA");
        assert_ne!(first, second, "an expired unit's id was handed out again");
        let ledger = s.credits().unwrap();
        assert_eq!((ledger[0].units, ledger[0].tokens), (2, 10));
    }

    #[test]
    fn a_store_from_before_autoincrement_never_reuses_an_id_its_ledger_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        {
            // Unit 7 was credited, then expired: no row of units is left to say so.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(&SCHEMA.replace(" AUTOINCREMENT", ""))
                .unwrap();
            old.execute_batch(
                "INSERT INTO credits (peer, unit, tokens, flops, at) VALUES ('peerA', 7, 5, 10.0, 0);
                 INSERT INTO units (id, batch, line, custom_id, body, state) VALUES (3, 'batch_x', 1, 'c', '{}', 'open');
                 INSERT INTO assignments (id, unit, peer, state, started_at) VALUES (4, 3, 'peerB', 'running', 0);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let unit = validated_unit(&s, "peerA");
        assert!(
            unit > 7,
            "unit {unit} may take the id of one the ledger names"
        );
        let ledger = s.credits().unwrap();
        assert_eq!((ledger[0].units, ledger[0].tokens), (2, 10));
        // The rows kept their ids, and the running one was marked lost.
        let kept: (i64, String) = s
            .conn()
            .query_row(
                "SELECT a.id, a.state FROM assignments a JOIN units u ON u.id = a.unit WHERE u.id = 3",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(kept, (4, "lost".to_string()));
        drop(s);
        // Rebuilt once: opening again changes nothing.
        let s = Store::open(&path).unwrap();
        assert!(validated_unit(&s, "peerA") > unit);
    }

    #[test]
    fn a_batch_is_not_made_from_a_file_deleted_after_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join(STORE_FILE)).unwrap();
        let file = s.add_file("a.jsonl", "batch", b"{}", "alice").unwrap().id;
        // The handler read the file, then a delete ran before the batch was made.
        s.delete_file(&file, "alice").unwrap();
        assert!(matches!(
            s.create_batch(Kind::Embed, "m", &file, &[unit(1)], &[], "alice"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn a_store_from_before_owners_opens_and_its_files_belong_to_no_member() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
                    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, content BLOB NOT NULL);
                 INSERT INTO files VALUES ('file-old', 'a.jsonl', 'batch', 2, 0, x'7b7d');
                 CREATE TABLE batches (id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,
                    input_file_id TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
                    finished_at INTEGER, error TEXT);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(s.owns_file("file-old", "alice").is_err());
        let f = s.add_file("b.jsonl", "batch", b"{}", "alice").unwrap();
        assert!(s.owns_file(&f.id, "alice").is_ok());
    }

    #[test]
    fn a_batch_survives_reopening_and_finishes_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let file = {
            let s = Store::open(&path).unwrap();
            let f = s.add_file("in.jsonl", "batch", b"{}", "alice").unwrap();
            assert!(s.owns_file(&f.id, "alice").is_ok());
            assert!(matches!(
                s.owns_file(&f.id, "bob"),
                Err(StoreError::NotFound(_))
            ));
            let bad = LineError {
                line: 2,
                custom_id: None,
                message: "not JSON".into(),
            };
            let b = s
                .create_batch(
                    Kind::Embed,
                    "m",
                    &f.id,
                    &[unit(1), unit(3)],
                    &[bad],
                    "alice",
                )
                .unwrap();
            assert!(s.owns_batch(&b.id, "alice").is_ok());
            assert!(s.owns_batch(&b.id, "bob").is_err());
            assert_eq!(s.batches(10, Some("bob")).unwrap().len(), 0);
            assert_eq!(s.batches(10, Some("alice")).unwrap().len(), 1);
            assert_eq!((b.total, b.completed, b.failed), (3, 0, 1));
            let open = s.open_units(10).unwrap();
            let net = Origin::Network("198.51.100.0/24".into());
            let a = s.start_assignment(open[0].id, "peerA", &net).unwrap();
            s.returned(a, "[1]", 5, b"r").unwrap();
            s.start_assignment(open[0].id, "peerB", &net).unwrap();
            (f.id, b.id)
        };
        // Reopened as after a crash: B's running assignment is lost, A's result kept.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.file_content(&file.0).unwrap(), b"{}");
        let open = s.open_units(10).unwrap();
        assert_eq!(open.len(), 2);
        assert!(open[0].running.is_empty());
        assert_eq!(open[0].results.len(), 1);
        assert!(open[0].asked("peerA"));
        assert!(!open[0].asked("peerB"), "B's lost try does not bar it");
        assert!(open[0].heard_from(&Origin::Network("198.51.100.0/24".into())));
        assert!(!open[0].heard_from(&Origin::Key("peerA".into())));
        assert!(s
            .validate(open[0].id, "{\"ok\":1}", 5, 10.0, &["peerA".into()])
            .unwrap());
        assert!(!s
            .validate(open[0].id, "{}", 5, 10.0, &["peerA".into()])
            .unwrap());
        assert_eq!(s.batch(&file.1).unwrap().status, "in_progress");
        s.fail_unit(open[1].id, "no agreement").unwrap();
        let b = s.batch(&file.1).unwrap();
        assert_eq!(
            (b.status.as_str(), b.completed, b.failed),
            ("completed", 1, 2)
        );
        let (out, errors) = s.outputs(&file.1).unwrap();
        assert_eq!(out.lines().count(), 1);
        assert!(out.contains("\"custom_id\":\"req-1\""));
        assert_eq!(errors.lines().count(), 2);
        assert!(errors.lines().next().unwrap().contains("not JSON"));
        let credits = s.credits().unwrap();
        assert_eq!(credits.len(), 1);
        assert_eq!((credits[0].units, credits[0].tokens), (1, 5));
        s.void_credit("peerA").unwrap();
        assert_eq!(s.credits().unwrap()[0].flops, 0.0);
        assert!(
            s.cancel(&file.1).is_err(),
            "a finished batch cannot be cancelled"
        );
    }
}

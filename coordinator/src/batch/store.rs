//! The coordinator's durable job store, in SQLite: uploaded files, batches, their work units,
//! every assignment of a unit to a peer with what the peer returned, and the credit ledger.
//! Each change is one transaction, and the database is in WAL mode with full syncs, so a
//! coordinator killed at any instant restarts with every accepted batch and every validated
//! unit intact; assignments that were running are marked lost and their units run again.

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
    /// SQLite failed (disk full, corrupt file, ...).
    #[error("job store: {0}")]
    Sqlite(#[from] rusqlite::Error),
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

/// Store result type.
pub type Result<T> = std::result::Result<T, StoreError>;

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
    /// Results returned so far: (peer, output JSON).
    pub results: Vec<(String, String)>,
    /// Peers running it now.
    pub running: Vec<String>,
}

impl OpenUnit {
    /// Whether `peer` returned a result for it or is running it (replicas go elsewhere; a
    /// peer whose try failed or was lost may try again, the only way a small pool finishes).
    pub fn asked(&self, peer: &str) -> bool {
        self.running
            .iter()
            .chain(self.results.iter().map(|(p, _)| p))
            .any(|p| p == peer)
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
    id INTEGER PRIMARY KEY, batch TEXT NOT NULL, line INTEGER NOT NULL,
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
    id INTEGER PRIMARY KEY, unit INTEGER NOT NULL, peer TEXT NOT NULL,
    state TEXT NOT NULL,          -- running, returned, failed, lost
    started_at INTEGER NOT NULL, output TEXT, tokens INTEGER NOT NULL DEFAULT 0,
    receipt BLOB, detail TEXT);
CREATE INDEX IF NOT EXISTS assignments_unit ON assignments (unit);
CREATE TABLE IF NOT EXISTS credits (
    peer TEXT NOT NULL, unit INTEGER NOT NULL, tokens INTEGER NOT NULL,
    flops REAL NOT NULL, voided INTEGER NOT NULL DEFAULT 0, at INTEGER NOT NULL,
    PRIMARY KEY (peer, unit));
";

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
}

impl Store {
    /// Opens (creating when needed) the store at `path`, and marks assignments that were
    /// running when the last process stopped as lost, so their units run again.
    pub fn open(path: &Path) -> Result<Self> {
        // It holds prompts and outputs; SQLite gives its -wal and -shm files this mode too.
        potluck_net::identity::private_file(path).map_err(|source| StoreError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Stores from before owners were kept: their files and batches belong to no member.
        for table in ["files", "batches"] {
            let has: bool = conn.query_row(
                "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = 'owner'",
                [table],
                |r| r.get(0),
            )?;
            if !has {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL DEFAULT ''"
                ))?;
            }
        }
        let lost = conn.execute(
            "UPDATE assignments SET state = 'lost', detail = 'coordinator restarted' WHERE state = 'running'",
            [],
        )?;
        if lost > 0 {
            tracing::info!(
                "{lost} running assignments lost in the last stop; their units run again"
            );
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
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
        let id = new_id("batch_");
        let at = now();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
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
        let mut a = conn
            .prepare("SELECT peer, state, output FROM assignments WHERE unit = ?1 ORDER BY id")?;
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
                ))
            })?;
            for x in assigned {
                match x? {
                    (peer, state, _) if state == "running" => unit.running.push(peer),
                    (peer, state, Some(o)) if state == "returned" => unit.results.push((peer, o)),
                    _ => {}
                }
            }
            out.push(unit);
        }
        Ok(out)
    }

    /// Records that `unit` was sent to `peer`; returns the assignment's id.
    pub fn start_assignment(&self, unit: i64, peer: &str) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO assignments (unit, peer, state, started_at) VALUES (?1, ?2, 'running', ?3)",
            params![unit, peer, now()],
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
            let a = s.start_assignment(open[0].id, "peerA").unwrap();
            s.returned(a, "[1]", 5, b"r").unwrap();
            s.start_assignment(open[0].id, "peerB").unwrap();
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

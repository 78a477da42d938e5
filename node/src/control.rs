//! The node's local control channel: `potluck node pause|resume|status` talk to the running
//! node through a Unix socket in its data folder, readable and writable by its owner only.
//! One line in (the command), one JSON line out (the node's state).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The socket's name in the node's data folder.
pub const SOCKET: &str = "node.sock";

/// Longest command line read.
const MAX_LINE: usize = 64;

/// How long a client gets to send its command, and the node to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the owner asks of the running node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop taking work until resumed.
    Pause,
    /// Take work again.
    Resume,
    /// Say what the node is doing.
    Status,
}

impl Command {
    fn parse(line: &str) -> Option<Self> {
        match line.trim() {
            "pause" => Some(Command::Pause),
            "resume" => Some(Command::Resume),
            "status" => Some(Command::Status),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Status => "status",
        }
    }
}

/// A command for the node's loop, and where its answer goes.
pub struct Request {
    /// The command.
    pub command: Command,
    /// The node's state after it, as JSON.
    pub reply: oneshot::Sender<Value>,
}

/// Why the control channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another node already runs with this data folder.
    #[error("another node runs with the data folder {0}")]
    InUse(PathBuf),
    /// No node runs with this data folder.
    #[error("no node is running with the data folder {0} (start one with potluck node)")]
    NotRunning(PathBuf),
    /// The socket failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The node's answer was not understood.
    #[error("unexpected answer from the node: {0}")]
    Answer(String),
}

/// Listens on the control socket in `data_dir`; commands arrive on the returned channel.
#[cfg(unix)]
pub fn listen(data_dir: &Path) -> Result<mpsc::Receiver<Request>, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(SOCKET);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse(data_dir.to_path_buf()));
        }
        // Left behind by a node that did not exit cleanly.
        std::fs::remove_file(&path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, tx).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    });
    Ok(rx)
}

#[cfg(unix)]
async fn answer(stream: tokio::net::UnixStream, tx: mpsc::Sender<Request>) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| "no command in time".to_string())?
        .map_err(|e| e.to_string())?;
    let reply = match Command::parse(&line) {
        None => serde_json::json!({"error": "commands are pause, resume and status"}),
        Some(command) => {
            let (reply, rx) = oneshot::channel();
            tx.send(Request { command, reply })
                .await
                .map_err(|_| "the node is stopping".to_string())?;
            tokio::time::timeout(IO_TIMEOUT, rx)
                .await
                .map_err(|_| "the node did not answer in time".to_string())?
                .map_err(|_| "the node is stopping".to_string())?
        }
    };
    let mut out = reply.to_string();
    out.push('\n');
    write
        .write_all(out.as_bytes())
        .await
        .map_err(|e| e.to_string())
}

/// Without Unix sockets there is no control channel.
#[cfg(not(unix))]
pub fn listen(_data_dir: &Path) -> Result<mpsc::Receiver<Request>, ControlError> {
    Ok(mpsc::channel(1).1)
}

/// Sends `command` to the node running with `data_dir` and returns its state.
#[cfg(unix)]
pub fn ask(data_dir: &Path, command: Command) -> Result<Value, ControlError> {
    use std::io::{BufRead, Read, Write};
    let path = data_dir.join(SOCKET);
    let mut stream = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|_| ControlError::NotRunning(data_dir.to_path_buf()))?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(IO_TIMEOUT * 2)).map_err(io)?;
    writeln!(stream, "{}", command.as_str()).map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .take(1 << 16)
        .read_line(&mut line)
        .map_err(io)?;
    let value: Value =
        serde_json::from_str(&line).map_err(|_| ControlError::Answer(line.clone()))?;
    match value.get("error").and_then(Value::as_str) {
        Some(e) => Err(ControlError::Answer(e.to_string())),
        None => Ok(value),
    }
}

/// Without Unix sockets there is no control channel.
#[cfg(not(unix))]
pub fn ask(data_dir: &Path, _command: Command) -> Result<Value, ControlError> {
    Err(ControlError::NotRunning(data_dir.to_path_buf()))
}

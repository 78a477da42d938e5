//! `potluck batch submit|status|results|list` and `potluck pool credits`: a coordinator's
//! Files, Batches and credit API from the command line, over plain HTTP.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where the coordinator's API is.
#[derive(Args, Clone)]
pub struct Api {
    /// The coordinator's API, http://host:port.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub coordinator: String,
    /// API key, when the coordinator asks for one (or POTLUCK_API_KEY).
    #[arg(long, env = "POTLUCK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Batch commands.
#[derive(Subcommand)]
pub enum BatchCommand {
    /// Upload a JSONL file (one OpenAI batch line per line) and start a batch on it.
    Submit {
        /// The file.
        file: PathBuf,
        /// What its lines ask for: chat or embed.
        #[arg(long)]
        kind: String,
        #[command(flatten)]
        api: Api,
    },
    /// A batch's state and counts.
    Status {
        /// The batch id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Print a finished batch's output lines (with --errors, its error lines).
    Results {
        /// The batch id.
        id: String,
        /// The error file instead: unreadable lines and failed units, by line number.
        #[arg(long)]
        errors: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Recent batches.
    List {
        #[command(flatten)]
        api: Api,
    },
    /// Stop a batch: open units are not run; validated ones stay in its output.
    Cancel {
        /// The batch id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
}

/// An HTTP answer: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).context("the coordinator did not answer JSON")
    }

    /// The body as JSON, or the API's error message as an error.
    fn ok_json(&self) -> Result<Value> {
        let v = self.json();
        if self.status != 200 {
            let message = v
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
            bail!("{} ({})", message, self.status);
        }
        v
    }
}

/// One request to `api`; the connection closes after the answer.
fn call(api: &Api, method: &str, path: &str, content_type: &str, body: &[u8]) -> Result<Answer> {
    let base = api
        .coordinator
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--coordinator must start with http://"))?
        .trim_end_matches('/');
    let mut stream =
        TcpStream::connect(base).with_context(|| format!("connecting to {}", api.coordinator))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {base}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(key) = &api.api_key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("a malformed HTTP answer"))?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("a malformed HTTP status line"))?;
    let mut body = raw[split + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    Ok(Answer { status, body })
}

/// Joins a chunked body's chunks.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a malformed chunk"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("a malformed chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| anyhow!("a truncated chunk"))?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Uploads `content` as a batch input file; returns its id.
fn upload(api: &Api, name: &str, content: &[u8]) -> Result<String> {
    let boundary = "potluck-batch-boundary-7d1f0c";
    let mut body = Vec::with_capacity(content.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        )
        .as_bytes(),
    );
    let name = name.replace(['"', '\r', '\n'], "_");
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let answer = call(
        api,
        "POST",
        "/v1/files",
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    )?;
    let v = answer.ok_json()?;
    v["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("the upload answer has no id"))
}

fn summary(b: &Value) -> String {
    let counts = &b["request_counts"];
    let mut line = format!(
        "{} {} {}: {} of {} done, {} failed",
        b["id"].as_str().unwrap_or("?"),
        b["endpoint"].as_str().unwrap_or("?"),
        b["status"].as_str().unwrap_or("?"),
        counts["completed"],
        counts["total"],
        counts["failed"],
    );
    if let Some(why) = b["potluck"]["waiting"].as_str() {
        line.push_str(&format!("; waiting: {why}"));
    }
    line
}

/// Runs a batch command.
pub fn run(cmd: BatchCommand) -> Result<()> {
    match cmd {
        BatchCommand::Submit { file, kind, api } => {
            let endpoint = match kind.as_str() {
                "chat" => "/v1/chat/completions",
                "embed" => "/v1/embeddings",
                other => bail!("--kind must be chat or embed, not {other}"),
            };
            let content =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if content.iter().all(u8::is_ascii_whitespace) {
                bail!("{} is empty", file.display());
            }
            let name = file.file_name().map_or_else(
                || "input.jsonl".into(),
                |n| n.to_string_lossy().into_owned(),
            );
            let file_id = upload(&api, &name, &content)?;
            let req = serde_json::json!({
                "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
            });
            let b = call(
                &api,
                "POST",
                "/v1/batches",
                "application/json",
                req.to_string().as_bytes(),
            )?
            .ok_json()?;
            eprintln!("{}", summary(&b));
            println!("{}", b["id"].as_str().unwrap_or_default());
            Ok(())
        }
        BatchCommand::Status { id, api } => {
            let b = call(&api, "GET", &format!("/v1/batches/{id}"), "", b"")?.ok_json()?;
            println!("{}", summary(&b));
            Ok(())
        }
        BatchCommand::Results { id, errors, api } => {
            let b = call(&api, "GET", &format!("/v1/batches/{id}"), "", b"")?.ok_json()?;
            let field = if errors {
                "error_file_id"
            } else {
                "output_file_id"
            };
            let Some(file) = b[field].as_str() else {
                if errors && b["output_file_id"].is_string() {
                    return Ok(()); // finished without errors
                }
                bail!(
                    "no {} yet: {}",
                    field.trim_end_matches("_id").replace('_', " "),
                    summary(&b)
                );
            };
            let answer = call(&api, "GET", &format!("/v1/files/{file}/content"), "", b"")?;
            if answer.status != 200 {
                answer.ok_json()?;
            }
            std::io::stdout().write_all(&answer.body)?;
            Ok(())
        }
        BatchCommand::List { api } => {
            let v = call(&api, "GET", "/v1/batches", "", b"")?.ok_json()?;
            for b in v["data"].as_array().into_iter().flatten() {
                println!("{}", summary(b));
            }
            Ok(())
        }
        BatchCommand::Cancel { id, api } => {
            let b = call(&api, "POST", &format!("/v1/batches/{id}/cancel"), "", b"")?.ok_json()?;
            println!("{}", summary(&b));
            Ok(())
        }
    }
}

/// `potluck pool credits`: the ledger, biggest contributors first.
pub fn credits(api: &Api) -> Result<()> {
    let v = call(api, "GET", "/api/credits", "", b"")?.ok_json()?;
    println!("| peer | units | tokens | GFLOP credited | GFLOP voided |");
    println!("|---|---|---|---|---|");
    for c in v["credits"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} |",
            c["peer"].as_str().unwrap_or("?"),
            c["units"],
            c["tokens"],
            c["flops"].as_f64().unwrap_or(0.0) / 1e9,
            c["voided_flops"].as_f64().unwrap_or(0.0) / 1e9,
        );
    }
    Ok(())
}

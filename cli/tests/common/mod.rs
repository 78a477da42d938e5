//! Helpers the multi-process tests share: `potluck` child processes whose output lines can
//! be waited for, killed when dropped.
#![allow(dead_code)]

pub mod bed;
pub mod netns;
pub mod pools;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// For a test that cannot run here because `what` is missing: fails it, saying what to
/// install (`how`), so that a missing tool never passes for a pass; with
/// `POTLUCK_ALLOW_SKIP=1` it is skipped instead, and says so on stderr. Returns (for the
/// test to return) only when skipping is allowed.
pub fn missing(what: &str, how: &str) {
    if std::env::var_os("POTLUCK_ALLOW_SKIP").is_some_and(|v| !v.is_empty() && v != "0") {
        eprintln!("SKIPPED (POTLUCK_ALLOW_SKIP): this host has no {what}; {how}");
        return;
    }
    panic!("this test needs {what}, which this host lacks: {how}. Set POTLUCK_ALLOW_SKIP=1 to skip the tests whose tools are missing.");
}

fn forward(from: impl std::io::Read, to: std::sync::mpsc::Sender<String>) {
    for line in BufReader::new(from).lines().map_while(Result::ok) {
        if to.send(line).is_err() {
            break;
        }
    }
}

/// A running `potluck` process whose stdout lines arrive on a channel; killed on drop.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `potluck` with `args`.
    pub fn start(args: &[&str]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_potluck"));
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Starts `cmd` (which runs `potluck` somehow) with info logs.
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("POTLUCK_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start potluck");
        // Output and logs arrive on one channel, so tests can wait for either.
        let (tx, lines) = channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || forward(out, tx));
        std::thread::spawn(move || forward(err, tx2));
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (already seen or arriving before `deadline`) that satisfies `pred`.
    pub fn wait_for(&mut self, deadline: Instant, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }
}

impl Proc {
    /// The first loopback TCP address the process says it listens on (with its /p2p/ id).
    pub fn loopback_addr(&mut self, deadline: Instant) -> String {
        self.wait_for(deadline, |l| l.starts_with("listening /ip4/127.0.0.1/tcp/"))
            .expect("no loopback listen address printed")
            .trim_start_matches("listening ")
            .to_string()
    }
}

impl Proc {
    /// SIGKILLs the process and reaps it: a crash, as the pool sees it.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a coordinator on loopback with its API on a free port; returns it, the address
/// nodes bootstrap from, and the API's `host:port`.
pub fn coordinator(dir: &std::path::Path, extra: &[&str]) -> (Proc, String, String) {
    let data = dir.join("coordinator");
    let mut args = vec![
        "coordinator",
        "--data-dir",
        data.to_str().expect("utf-8 temp path"),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--http",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::start(&args);
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = p.loopback_addr(deadline);
    let http = p
        .wait_for(deadline, |l| l.starts_with("api listening on http://"))
        .expect("coordinator printed no API address")
        .trim_start_matches("api listening on http://")
        .to_string();
    (p, addr, http)
}

/// Starts a node of `pool` on loopback that joins through `bootstrap`; returns it and its
/// peer id.
pub fn node(
    dir: &std::path::Path,
    name: &str,
    pool: &str,
    bootstrap: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_potluck"));
    cmd.args(node_args(dir, name, pool, bootstrap, extra));
    start_node(cmd)
}

/// The arguments of [`node`], for a node started some other way (in a namespace).
pub fn node_args(
    dir: &std::path::Path,
    name: &str,
    pool: &str,
    bootstrap: &str,
    extra: &[&str],
) -> Vec<String> {
    let data = dir.join(name);
    let mut args = vec![
        "node",
        "--data-dir",
        data.to_str().expect("utf-8 temp path"),
        "--pool",
        pool,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--bootstrap",
        bootstrap,
    ];
    // Quick adverts unless the test says otherwise.
    if !extra.contains(&"--advert-interval") {
        args.extend_from_slice(&["--advert-interval", "1"]);
    }
    // One compute thread each unless the test says otherwise.
    if !extra.contains(&"--threads") {
        args.extend_from_slice(&["--threads", "1"]);
    }
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

/// Starts `cmd`, a node; returns it and its peer id.
pub fn start_node(cmd: Command) -> (Proc, String) {
    let mut p = Proc::spawn(cmd);
    let id = p
        .wait_for(Instant::now() + Duration::from_secs(30), |l| {
            l.starts_with("peer id ")
        })
        .expect("node printed no peer id")
        .trim_start_matches("peer id ")
        .to_string();
    (p, id)
}

/// POSTs `body` as JSON to `http://{addr}{path}`; returns the status code and the body.
pub fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let raw = raw_http(addr, &request("POST", path, &[], &body.to_string()));
    let (status, rest) = split_answer(&raw);
    let json = serde_json::from_str(rest).unwrap_or_else(|e| panic!("{e}: {raw}"));
    (status, json)
}

/// GETs `http://{addr}{path}`; returns the status code and the JSON body.
pub fn get_json(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let raw = raw_http(addr, &request("GET", path, &[], ""));
    let (status, rest) = split_answer(&raw);
    let json = serde_json::from_str(rest).unwrap_or_else(|e| panic!("{e}: {raw}"));
    (status, json)
}

/// Sends raw `request` bytes to `addr` and returns everything the server sends back until
/// it closes the connection.
pub fn raw_http(addr: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

/// A request with `headers` (each "Name: value") and a JSON `body`, over HTTP/1.0 so
/// streamed answers arrive unchunked.
pub fn request(method: &str, path: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

/// Status code and body of a raw answer.
pub fn split_answer(raw: &str) -> (u16, &str) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body)
}

/// The JSON events of a server-sent-event body, up to (not including) `[DONE]`, and
/// whether `[DONE]` came.
pub fn sse_events(body: &str) -> (Vec<serde_json::Value>, bool) {
    let mut events = Vec::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return (events, true);
        }
        events.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")));
    }
    (events, false)
}

/// The text a stream of chat or completion chunks carries.
pub fn streamed_text(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            let c = e["choices"].get(0)?;
            c["delta"]["content"].as_str().or(c["text"].as_str())
        })
        .collect()
}

/// `potluck generate` in one process, greedy: the text and the number of tokens generated.
pub fn local_generate(prompt: &str, chat: bool, max_tokens: usize) -> (String, u64) {
    let max = max_tokens.to_string();
    let mut args = vec![
        "generate",
        "--prompt",
        prompt,
        "--max-tokens",
        &max,
        "--threads",
        "1",
    ];
    if chat {
        args.push("--chat");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(&args)
        .output()
        .expect("run potluck generate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let text = text
        .strip_suffix('\n')
        .expect("a final newline")
        .to_string();
    // "prefill: P tokens, X t/s; decode: N tokens, Y t/s"
    let generated = err
        .split("decode: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {err}"));
    (text, generated)
}

/// A loopback TCP port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until the coordinator says each of `ids` joined (a minute at most).
pub fn wait_joined<'a>(coord: &mut Proc, ids: impl IntoIterator<Item = &'a String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ids {
        let line = format!("peer joined {id} ");
        assert!(
            coord.wait_for(deadline, |l| l.starts_with(&line)).is_some(),
            "{id} never joined: {:?}",
            coord.seen
        );
    }
}

/// Vectors and token count for `texts` from all-MiniLM-L6-v2 run in this process.
pub fn local_embed(texts: &[String]) -> (Vec<Vec<f32>>, u64) {
    let path = potluck_engine::cache::default_embedding_model_path().expect("a model cache");
    let enc = potluck_engine::bert::Encoder::load(&path).expect("all-minilm-l6-v2 is cached");
    enc.embed(texts).expect("embed locally")
}

/// A coordinator and one node (the whole model) on loopback, with `extra` coordinator
/// flags; returns both, the API address, once the node serves.
pub fn small_pool(dir: &std::path::Path, extra: &[&str]) -> (Proc, Proc, String) {
    small_pool_with_node(dir, extra, &[])
}

/// [`small_pool`] with `node_extra` flags for the node (whose data folder is `dir/n`).
pub fn small_pool_with_node(
    dir: &std::path::Path,
    extra: &[&str],
    node_extra: &[&str],
) -> (Proc, Proc, String) {
    let (mut coord, addr, http) = coordinator(dir, extra);
    let (node, _) = node(dir, "n", "public", &addr, node_extra);
    let deadline = Instant::now() + Duration::from_secs(90);
    assert!(
        coord
            .wait_for(deadline, |l| l.contains(" serves blocks 0..30"))
            .is_some(),
        "the node never loaded the model: {:?}",
        coord.seen
    );
    (coord, node, http)
}

/// Starts a node of the public pool (see [`node`]) and waits until the coordinator says it
/// serves `blocks` (e.g. "0..30"); returns its peer id and process.
pub fn serving_node(
    dir: &std::path::Path,
    name: &str,
    coord: &mut Proc,
    bootstrap: &str,
    extra: &[&str],
    blocks: &str,
) -> (String, Proc) {
    let (p, id) = node(dir, name, "public", bootstrap, extra);
    let line = format!("peer {id} serves blocks {blocks}");
    assert!(
        coord
            .wait_for(Instant::now() + Duration::from_secs(60), |l| l
                .starts_with(&line))
            .is_some(),
        "{name} never served: {:?}",
        coord.seen
    );
    (id, p)
}

/// Panics if the coordinator quarantined any of `ids`.
pub fn never_quarantined<'a>(coord: &Proc, ids: impl IntoIterator<Item = &'a String>) {
    for id in ids {
        let line = format!("peer quarantined {id}");
        assert!(
            !coord.seen.iter().any(|l| l.starts_with(&line)),
            "{id} was quarantined: {:?}",
            coord.seen
        );
    }
}

/// Waits (`within` seconds at most) for a line of `p` containing all of `parts`; panics
/// naming `what` and the output so far otherwise.
pub fn expect_line(p: &mut Proc, what: &str, parts: &[&str], within: u64) -> String {
    p.wait_for(Instant::now() + Duration::from_secs(within), |l| {
        parts.iter().all(|s| l.contains(s))
    })
    .unwrap_or_else(|| panic!("no line for {what} ({parts:?}): {:#?}", p.seen))
}

/// Runs `potluck` with `args` and returns its stdout, trimmed; panics with its stderr if it
/// fails.
pub fn potluck_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(args)
        .output()
        .expect("run potluck");
    assert!(
        out.status.success(),
        "potluck {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A libp2p swarm that speaks the pool's protocols with no gate of its own, as a hostile
/// peer's would: it serves and reads everything from anyone.
pub fn open_swarm(
    key: libp2p::identity::Keypair,
) -> libp2p::Swarm<potluck_net::swarm::PoolBehaviour> {
    use potluck_net::gate::{Gate, PoolMembership};
    let (gate, _) = Gate::new(PoolMembership::Public {
        name: "anyone".into(),
    });
    potluck_net::swarm::build(key, potluck_net::swarm::PeerKind::Node, false, None, &gate)
        .expect("a swarm")
}

/// Runs `round` (given its number, from 1) until `coord` logs that it quarantined `id`,
/// watching for that line for `wait` before each round; panics once `most` rounds have run
/// without it. Returns the line.
pub fn until_quarantined(
    coord: &mut Proc,
    id: &str,
    most: usize,
    wait: Duration,
    mut round: impl FnMut(usize),
) -> String {
    let caught = format!("peer quarantined {id}");
    let mut n = 1;
    loop {
        if let Some(line) = coord.wait_for(Instant::now() + wait, |l| l.starts_with(&caught)) {
            return line;
        }
        assert!(n <= most, "{id} was never quarantined: {:?}", coord.seen);
        round(n);
        n += 1;
    }
}

//! Hostile peers against real processes: a peer that sends a node malformed, oversized,
//! wrong-version or out-of-place frames loses that stream with a logged reason; one that
//! gossips adverts it did not sign, or garbage, is dropped by the coordinator with a logged
//! reason; and the pool keeps serving everyone else.

mod common;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use potluck_protocol::codec::{encode_frame, PROTOCOL_VERSION};
use potluck_protocol::messages::{
    CapacityAdvert, DeviceKind, ErrorCode, Heartbeat, LayerRange, Message, ModelRef,
    ShardAssignment, StageForward, StageInputWire, WorkRequest, WorkTask, ADVERT_DOMAIN,
};
use potluck_protocol::signed::{Keypair, Signed};
use potluck_protocol::stream::Channel;

/// `channel`'s protocol in the public pool these tests run in.
fn proto(channel: Channel) -> StreamProtocol {
    StreamProtocol::try_from_owned(channel.protocol("public")).unwrap()
}
use potluck_protocol::tensor::{WireDType, WireTensor};
use serde_json::json;
use std::time::{Duration, Instant};

/// Frame header (length, version) followed by `body`.
fn raw_frame(len: u32, version: u16, body: &[u8]) -> Vec<u8> {
    let mut f = len.to_le_bytes().to_vec();
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// Sends `bytes` on a new stream and returns what comes back before the node closes it.
async fn send_raw(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    protocol: Channel,
    bytes: &[u8],
) -> Vec<u8> {
    let mut s = control
        .open_stream(peer, proto(protocol))
        .await
        .expect("open a stream to the node");
    s.write_all(bytes).await.expect("write");
    // Half-close: the node sees the end of what we sent, whole or cut off.
    s.close().await.expect("close");
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await;
    back
}

/// Sends one frame and decodes the one answer.
async fn ask(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    protocol: Channel,
    msg: &Message,
) -> Message {
    let mut s = control
        .open_stream(peer, proto(protocol))
        .await
        .expect("open a stream to the node");
    s.write_all(&encode_frame(msg).unwrap()).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        potluck_protocol::stream::read_frame_async::<Message>(&mut s, 1 << 20),
    )
    .await
    .expect("an answer in time")
    .expect("a valid frame")
    .expect("not closed")
}

fn peer_of(addr: &str) -> PeerId {
    addr.rsplit('/').next().unwrap().parse().unwrap()
}

#[test]
fn hostile_frames_and_gossip_are_dropped_with_reasons_and_the_pool_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, coord_addr, http) = common::coordinator(dir.path(), &[]);
    let (mut node, _) = common::node(dir.path(), "n", "public", &coord_addr, &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let node_addr = node.loopback_addr(deadline);
    assert!(
        coord
            .wait_for(deadline, |l| l.contains(" serves blocks 0..30"))
            .is_some(),
        "{:?}",
        coord.seen
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let attacker = Keypair::from_secret(&[42; 32]);
    let impostor = Keypair::from_secret(&[43; 32]);
    rt.block_on(async {
        let key = potluck_net::swarm::libp2p_keypair(attacker.secret()).unwrap();
        let mut swarm = common::open_swarm(key);
        let mut control = swarm.behaviour().streams.new_control();
        let topic = potluck_net::swarm::advert_topic("public");
        swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
        for a in [&node_addr, &coord_addr] {
            swarm.dial(a.parse::<Multiaddr>().unwrap()).unwrap();
        }
        // Gossip needs the swarm polled; streams run beside it.
        let (gossip_tx, mut gossip_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        tokio::spawn(async move {
            let mut queued: Vec<Vec<u8>> = Vec::new();
            let mut retry = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = swarm.select_next_some() => {}
                    Some(frame) = gossip_rx.recv() => queued.push(frame),
                    _ = retry.tick() => {
                        queued.retain(|f| swarm.behaviour_mut().gossipsub.publish(topic.clone(), f.clone()).is_err());
                    }
                }
            }
        });
        let node_peer = peer_of(&node_addr);

        // Garbage where a message should be.
        send_raw(&mut control, node_peer, Channel::Stage, &raw_frame(3, PROTOCOL_VERSION, &[0xff, 0xff, 0xff])).await;
        // A length far beyond the limit: refused from the header, nothing allocated.
        send_raw(&mut control, node_peer, Channel::Stage, &raw_frame(1 << 30, PROTOCOL_VERSION, &[])).await;
        // Another protocol version.
        let hb = Message::Heartbeat(Heartbeat { seq: 1, sent_at_ms: 0 });
        let mut wrong_version = encode_frame(&hb).unwrap();
        wrong_version[4] = 99;
        send_raw(&mut control, node_peer, Channel::Stage, &wrong_version).await;
        // A valid frame that has no business on a stage stream.
        send_raw(&mut control, node_peer, Channel::Stage, &encode_frame(&hb).unwrap()).await;
        // A stream cut off inside a frame.
        send_raw(&mut control, node_peer, Channel::Stage, &raw_frame(100, PROTOCOL_VERSION, &[1, 2, 3])).await;

        // Requests that parse but do not fit get typed errors on a stream that stays open.
        let bad_shape = Message::Forward(StageForward {
            session: 1,
            step: 0,
            position: 0,
            input: StageInputWire::Hidden(WireTensor::from_f32(&[0.0; 6], &[2, 3], WireDType::F32).unwrap()),
            sample: None,
        });
        match ask(&mut control, node_peer, Channel::Stage, &bad_shape).await {
            Message::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}"),
            other => panic!("expected an error, got {other:?}"),
        }
        // An admitted peer that is not the node's coordinator may not reload its layers,
        // even naming the model and range it serves.
        let (_, pool) = common::get_json(&http, "/api/pool");
        let digest = blake3::Hash::from_hex(pool["model"]["digest"].as_str().unwrap()).unwrap();
        let model = ModelRef { name: pool["model"]["name"].as_str().unwrap().into(), digest: *digest.as_bytes() };
        for layers in [LayerRange { start: 0, end: 30 }, LayerRange { start: 0, end: 1 }] {
            let takeover = Message::Assign(ShardAssignment { model: model.clone(), layers, total_layers: 30, epoch: 1 << 40 });
            match ask(&mut control, node_peer, Channel::Control, &takeover).await {
                Message::Error(e) => assert_eq!(e.code, ErrorCode::NotPermitted, "{e:?}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        let work = Message::Work(WorkRequest {
            unit: 1,
            model: model.clone(),
            task: WorkTask::Complete { prompt: vec![1, 2, 3], max_tokens: 4 },
        });
        match ask(&mut control, node_peer, Channel::Work, &work).await {
            Message::Error(e) => assert_eq!(e.code, ErrorCode::NotPermitted, "{e:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }

        // Gossip: an advert signed by a key that is not the sender's, and garbage.
        let now = potluck_net::swarm::unix_now();
        let advert = CapacityAdvert {
            pool: "public".into(),
            device: DeviceKind::Cpu,
            memory_bytes: 1 << 40,
            gflops: 1e6,
            mem_gbps: 1e6,
            threads: 64,
            models: Vec::new(),
            loaded: None,
            seq: 1,
            issued_at: now,
            expires_at: now + 30,
            name: None,
            coordinator: None,
        };
        let forged = Signed::sign(&advert, ADVERT_DOMAIN, &impostor).unwrap();
        gossip_tx.send(encode_frame(&Message::Advert(forged)).unwrap()).await.unwrap();
        // Its own advert, honestly signed, claiming the model's blocks backwards: a range
        // whose length, computed as end - start, would wrap.
        let inverted = CapacityAdvert {
            loaded: Some((model.clone(), LayerRange { start: 30, end: 2 })),
            ..advert.clone()
        };
        let inverted = Signed::sign(&inverted, ADVERT_DOMAIN, &attacker).unwrap();
        gossip_tx.send(encode_frame(&Message::Advert(inverted)).unwrap()).await.unwrap();
        gossip_tx.send(raw_frame(2, PROTOCOL_VERSION, &[0xde, 0xad])).await.unwrap();
    });

    let reasons = [
        "dropped stage stream: malformed message",
        "dropped stage stream: frame of 1073741824 bytes exceeds",
        "dropped stage stream: protocol version 99 is not supported",
        "dropped stage stream: unexpected heartbeat",
        "dropped stage stream: truncated frame: body",
        "refused layer assignments from peer",
        "refused work units from peer",
    ];
    for reason in reasons {
        assert!(
            node.wait_for(deadline, |l| l.contains(reason)).is_some(),
            "node never logged {reason:?}: {:?}",
            node.seen
        );
    }
    for reason in [
        "dropped gossip: signed by another peer's key",
        "dropped gossip: advert claims the empty block range 30..2",
        "dropped gossip: malformed message",
    ] {
        assert!(
            coord.wait_for(deadline, |l| l.contains(reason)).is_some(),
            "coordinator never logged {reason:?}: {:?}",
            coord.seen
        );
    }
    // The impostor never joined, and the pool still answers.
    assert!(!coord
        .seen
        .iter()
        .any(|l| l.starts_with("peer joined") && l.contains(&peer_of_key(&impostor))));
    let (status, v) = common::post_json(
        &http,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    drop(rt);

    // At rest, the data folders and the files holding keys, prompts and the audit trail are
    // their user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = dir.path().join("coordinator");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&dir.path().join("n")), 0o700);
    let mut files = 0;
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().into_string().unwrap();
        if ["identity.key", "audit.log", "jobs.sqlite"]
            .iter()
            .any(|n| name.starts_with(n))
        {
            assert_eq!(mode(&f.path()), 0o600, "{name}");
            files += 1;
        }
    }
    assert!(files >= 3, "{files}");
}

fn peer_of_key(k: &Keypair) -> String {
    potluck_net::swarm::peer_id_of(&k.public())
        .map(|p| p.to_string())
        .unwrap_or_default()
}

/// A peer that advertises great capacity, accepts its assignment, then answers a stage with
/// a result whose output was changed after signing.
async fn run_rogue(key: Keypair, coordinator: Multiaddr, model: ModelRef) {
    use potluck_protocol::messages::{
        NumericClass, Receipt, ReceiptBody, StageOutputWire, StageResult,
    };
    use potluck_protocol::receipt::{input_id, job_id, output_id};
    use potluck_protocol::stream::{read_frame_async, write_frame_async};
    let lkey = potluck_net::swarm::libp2p_keypair(key.secret()).unwrap();
    let mut swarm = common::open_swarm(lkey);
    let mut control = swarm.behaviour().streams.new_control();
    let mut assigns = control.accept(proto(Channel::Control)).unwrap();
    let mut stages = control.accept(proto(Channel::Stage)).unwrap();
    tokio::spawn(async move {
        while let Some((_, mut s)) = assigns.next().await {
            if let Ok(Some(Message::Assign(a))) = read_frame_async::<Message>(&mut s, 1 << 16).await
            {
                let _ = write_frame_async(&mut s, &Message::Assigned(a)).await;
            }
        }
    });
    let signer = Keypair::from_secret(&key.secret());
    let model_digest = model.digest;
    tokio::spawn(async move {
        while let Some((_, mut s)) = stages.next().await {
            while let Ok(Some(Message::Forward(req))) =
                read_frame_async::<Message>(&mut s, 1 << 26).await
            {
                let honest = StageOutputWire::Token {
                    token: 1,
                    logprob: -0.5,
                    top: Vec::new(),
                };
                let body = ReceiptBody {
                    job: job_id(&req).unwrap(),
                    input: input_id(&req.input).unwrap(),
                    output: output_id(&honest).unwrap(),
                    model: model_digest,
                    layers: LayerRange { start: 0, end: 30 },
                    numeric: NumericClass {
                        weights: "Q4_1".into(),
                        accumulation: "f32".into(),
                        device: DeviceKind::Cpu,
                    },
                };
                let result = StageResult {
                    session: req.session,
                    step: req.step,
                    // Not what the receipt vouches for.
                    output: StageOutputWire::Token {
                        token: 2,
                        logprob: -0.5,
                        top: Vec::new(),
                    },
                    receipt: Receipt::sign(body, &signer).unwrap(),
                };
                let _ = write_frame_async(&mut s, &Message::Result(Box::new(result))).await;
            }
        }
    });
    let topic = potluck_net::swarm::advert_topic("public");
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    swarm.dial(coordinator).unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = swarm.select_next_some() => {}
            _ = tick.tick() => {
                seq += 1;
                let now = potluck_net::swarm::unix_now();
                let advert = CapacityAdvert {
                    pool: "public".into(),
                    device: DeviceKind::Cpu,
                    memory_bytes: 64 << 30,
                    gflops: 1e4,
                    mem_gbps: 1e4,
                    threads: 64,
                    models: vec![model.clone()],
                    loaded: None,
                    seq,
                    issued_at: now,
                    expires_at: now + 30,
                    name: None,
                    coordinator: None,
                };
                let signed = Signed::sign(&advert, ADVERT_DOMAIN, &key).unwrap();
                let frame = encode_frame(&Message::Advert(signed)).unwrap();
                let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), frame);
            }
        }
    }
}

#[test]
fn a_peer_whose_result_does_not_verify_is_dropped_and_its_session_goes_on_on_an_honest_node() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, coord_addr, http) = common::coordinator(dir.path(), &[]);
    let (_node, node_id) = common::node(dir.path(), "n", "public", &coord_addr, &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let path = potluck_engine::cache::default_model_path().expect("a model cache");
    let digest =
        *blake3::hash(&std::fs::read(path).expect("the default model is cached")).as_bytes();
    let model = ModelRef {
        name: "smollm2-135m-instruct".into(),
        digest,
    };
    let rogue = Keypair::from_secret(&[44; 32]);
    let rogue_id = peer_of_key(&rogue);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.spawn(run_rogue(rogue, coord_addr.parse().unwrap(), model));
    // The rogue looks fastest, so the router picks it once it has "loaded" its span.
    for who in [&rogue_id, &node_id] {
        let line = format!("peer {who} serves blocks 0..30");
        assert!(
            coord.wait_for(deadline, |l| l.starts_with(&line)).is_some(),
            "{line:?} never printed: {:?}",
            coord.seen
        );
    }
    // The session that met the rogue goes on on the honest node, from the same token.
    let body = json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8});
    let (status, v) = common::post_json(&http, "/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(text.contains("Paris"), "{v}");
    let dropped = format!("peer dropped {rogue_id}: ");
    let line = coord.wait_for(deadline, |l| l.starts_with(&dropped));
    assert!(
        line.as_deref().is_some_and(|l| l.contains("output digest")),
        "{:?}",
        coord.seen
    );
    // And it stays out.
    let (status, again) = common::post_json(&http, "/v1/completions", &body);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["choices"][0]["text"], text.as_str());
    drop(rt);
}

/// A prefill of `n` tokens for `session` on a fresh stage stream, kept open; its answer, or
/// what went wrong.
async fn prefill(
    control: &mut libp2p_stream::Control,
    node: PeerId,
    session: u64,
    n: usize,
) -> Result<(libp2p::Stream, Message), String> {
    let mut s = control
        .open_stream(node, proto(Channel::Stage))
        .await
        .map_err(|e| format!("opening session {session}: {e}"))?;
    let req = Message::Forward(StageForward {
        session,
        step: 0,
        position: 0,
        input: StageInputWire::Tokens(vec![1; n]),
        sample: None,
    });
    let sent = async {
        s.write_all(&encode_frame(&req).unwrap()).await?;
        s.flush().await
    };
    // A node that refuses a session answers at once and closes: the request may then meet
    // a closed stream, and the answer is still there to read.
    let unsent = sent
        .await
        .err()
        .map_or_else(String::new, |e| format!(" (sending it: {e})"));
    let answer = tokio::time::timeout(
        Duration::from_secs(120),
        potluck_protocol::stream::read_frame_async::<Message>(&mut s, 1 << 24),
    )
    .await
    .map_err(|_| format!("no answer to session {session} in time{unsent}"))?
    .map_err(|e| format!("session {session}'s answer: {e}{unsent}"))?
    .ok_or_else(|| format!("session {session} closed unanswered{unsent}"))?;
    Ok((s, answer))
}

#[test]
fn a_strangers_sessions_cannot_fill_a_nodes_cache() {
    // An admitted peer that is not the node's coordinator opens long sessions and keeps
    // them: it gets two at once, each within an eighth of the node's KV budget, and the
    // pool's own sessions are served beside them.
    let dir = tempfile::tempdir().unwrap();
    let (_coord, mut node, http) = common::small_pool(dir.path(), &[]);
    let node_addr = node.loopback_addr(Instant::now() + Duration::from_secs(5));
    let node_peer = peer_of(&node_addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let overloaded = |m: &Message, what: &str| match m {
        Message::Error(e) if e.code == ErrorCode::Overloaded && e.message.contains(what) => {}
        other => panic!("expected Overloaded ({what}), got {other:?}"),
    };
    let held = rt.block_on(async {
        let key =
            potluck_net::swarm::libp2p_keypair(Keypair::from_secret(&[44; 32]).secret()).unwrap();
        let mut swarm = common::open_swarm(key);
        let mut control = swarm.behaviour().streams.new_control();
        swarm.dial(node_addr.parse::<Multiaddr>().unwrap()).unwrap();
        let (closed_tx, closed) = tokio::sync::watch::channel(String::new());
        tokio::spawn(async move {
            loop {
                if let libp2p::swarm::SwarmEvent::ConnectionClosed { cause, .. } =
                    swarm.select_next_some().await
                {
                    let _ = closed_tx.send(format!("{cause:?}"));
                }
            }
        });
        let why = |e: String| format!("{e} (connection closed: {:?})", *closed.borrow());
        // 4,100 positions is past its share; 2,000 is within it and is served.
        let (first, a) = prefill(&mut control, node_peer, 1, 4100)
            .await
            .map_err(why)?;
        overloaded(&a, "may hold at most");
        let (second, b) = prefill(&mut control, node_peer, 2, 2000)
            .await
            .map_err(why)?;
        assert!(matches!(b, Message::Result(_)), "{b:?}");
        // A third session while two are open is refused.
        let (_third, c) = prefill(&mut control, node_peer, 3, 10).await.map_err(why)?;
        overloaded(&c, "at most 2 sessions");
        Ok::<_, String>((first, second))
    });
    if let Err(e) = &held {
        node.wait_for(Instant::now() + Duration::from_secs(1), |_| false);
        panic!("{e}; the node said: {:#?}", node.seen);
    }
    let (status, v) = common::post_json(
        &http,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn a_chat_template_that_asks_for_terabytes_fails_its_request_and_the_coordinator_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    // Forty-eight doublings inside the fuel: 2^48 bytes asked of whoever renders it.
    let template = "{% set ns = namespace(s='x') %}{% for i in range(48) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}";
    let (mut coord, http, _node) = template_pool(dir.path(), Some(template));
    for _ in 0..2 {
        let (code, body) = common::post_json(&http, "/v1/chat/completions", &greedy_chat());
        assert_eq!(code, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("MiB of memory"), "{body}");
        assert!(
            coord.child.try_wait().unwrap().is_none(),
            "the coordinator died"
        );
    }
    // Everything that renders no template is served as before.
    let (code, body) = common::post_json(
        &http,
        "/v1/completions",
        &json!({"model": "greedy", "prompt": "hello", "max_tokens": 2}),
    );
    assert_eq!(code, 200, "{body}");
}

/// A coordinator on a tiny model carrying `template` (the default one if none), with one
/// node serving all of it: the coordinator, its API address and the node.
fn template_pool(
    dir: &std::path::Path,
    template: Option<&str>,
) -> (common::Proc, String, common::Proc) {
    let spec = potluck_engine::synthetic::SyntheticSpec {
        chat_template: template.map(String::from),
        ..Default::default()
    };
    let file = dir.join("greedy.gguf");
    potluck_engine::synthetic::write_gguf(&spec, &file).unwrap();
    let models = dir.join("models");
    let models = models.to_str().unwrap();
    let fetched = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(["--models-dir", models, "model", "fetch", "greedy", "--from"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    let (mut coord, addr, http) = common::coordinator(
        dir,
        &[
            "--models-dir",
            models,
            "--model",
            "greedy",
            "--embedding-model",
            "none",
        ],
    );
    let (_id, node) = common::serving_node(
        dir,
        "n",
        &mut coord,
        &addr,
        &["--models-dir", models],
        "0..8",
    );
    (coord, http, node)
}

fn greedy_chat() -> serde_json::Value {
    json!({"model": "greedy", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hello"}]})
}

/// The template workers `parent` started (children running `potluck __render-chat-templates`).
fn template_workers(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent's pid is the second field after the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let worker = String::from_utf8_lossy(&cmdline).contains("__render-chat-templates");
        if ppid == Some(parent) && worker {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_template_worker_killed_while_idle_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, http, _node) = template_pool(dir.path(), None);
    let (code, body) = common::post_json(&http, "/v1/chat/completions", &greedy_chat());
    assert_eq!(code, 200, "{body}");
    let pid = coord.child.id();
    let workers = template_workers(pid);
    assert!(!workers.is_empty(), "no idle template worker was kept");
    for w in &workers {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &w.to_string()])
            .status();
    }
    // Killed, they stay as zombies of the coordinator until it reaps them: wait until
    // /proc says they are dead.
    let dead = |w: &u32| {
        std::fs::read_to_string(format!("/proc/{w}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    };
    for _ in 0..100 {
        if workers.iter().all(dead) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(workers.iter().all(dead));
    for _ in 0..2 {
        let (code, body) = common::post_json(&http, "/v1/chat/completions", &greedy_chat());
        assert_eq!(code, 200, "a killed idle worker failed a request: {body}");
    }
}

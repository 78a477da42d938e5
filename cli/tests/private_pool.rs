//! A private pool with real processes on loopback: only holders of a valid certificate join.
//! Nodes without one, with an expired, forged or revoked one, or from another pool are
//! refused at connection, with a log line on both sides, and never join. A certificate that
//! expires, or is revoked while its node runs, takes the node out without a restart. Two
//! pools on one network stay apart, and nodes refuse a coordinator that holds no certificate.

mod common;

use common::pools::{create, invite, join, path};
use common::{coordinator, expect_line, node, Proc};
use potluck_protocol::hex::from_hex;
use potluck_protocol::membership::Certificate;
use potluck_protocol::signed::PublicKey;
use std::path::Path;
use std::time::{Duration, Instant};

/// Stores `cert` as `member`'s certificate of pool `id` without any check (as a forger
/// would).
fn plant(dir: &Path, member: &str, id: &str, cert: &str) {
    let folder = dir.join(member).join("membership");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join(format!("{id}.cert")), cert).unwrap();
}

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// A coordinator of the pool in `dir/<pool>`, holding its folder, with its data in
/// `dir/<name>` and `extra` flags: it, its address and its API's.
fn owner(dir: &Path, pool: &str, name: &str, extra: &[&str]) -> (Proc, String, String) {
    let folder = dir.join(pool);
    let mut args = vec![
        "--pool",
        pool,
        "--pool-dir",
        path(&folder),
        "--embedding-model",
        "none",
    ];
    args.extend_from_slice(extra);
    coordinator(&dir.join(name), &args)
}

fn never_joined(coord: &Proc, id: &str) {
    let line = format!("peer joined {id} ");
    assert!(
        !coord.seen.iter().any(|l| l.starts_with(&line)),
        "{id} joined a pool it was refused from: {:#?}",
        coord.seen
    );
}

#[test]
fn only_certified_members_join_and_revocation_takes_a_node_out_without_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = create(d, "lab");
    let lab_dir = d.join("lab");
    // The member's certificate ties its API key to its membership.
    let good_cert = join(d, "lab", "good", &[]);
    let members = d.join("members.json");
    let list = serde_json::json!({"members": [
        {"name": "good", "api_key": "good-api-key", "certificate": good_cert},
    ]});
    std::fs::write(&members, list.to_string()).unwrap();
    let (mut coord, addr, http) = owner(d, "lab", "coordinator", &["--members", path(&members)]);
    expect_line(
        &mut coord,
        "the pool's description",
        &["pool lab (private, id", &lab],
        10,
    );
    let api_status = || {
        let auth = "Authorization: Bearer good-api-key";
        let raw = common::raw_http(&http, &common::request("GET", "/v1/models", &[auth], ""));
        common::split_answer(&raw).0
    };
    assert_eq!(api_status(), 200);

    // A member joins and is given work.
    let (mut good, good_id) = node(d, "good", "lab", &addr, &[]);
    expect_line(
        &mut good,
        "the coordinator admitting the member",
        &["admitted by peer"],
        30,
    );
    common::wait_joined(&mut coord, [&good_id]);
    expect_line(
        &mut coord,
        "work for the member",
        &[&format!("peer {good_id} serves blocks")],
        90,
    );

    // No certificate (the pool named by its id).
    let (mut bare, bare_id) = node(d, "bare", &lab, &addr, &[]);
    // Expired before it is used.
    let short = invite(d, "lab", "late", &["--expires", "1s"]);
    plant(d, "late", &lab, &short);
    std::thread::sleep(Duration::from_millis(1100));
    let (mut late, late_id) = node(d, "late", "lab", &addr, &[]);
    // Forged: a certificate from another key that claims to be the lab's.
    create(d, "evil");
    let mut forged = Certificate::from_text(&invite(d, "evil", "forger", &[])).unwrap();
    let lab_key: [u8; 32] = from_hex(&lab).unwrap().try_into().unwrap();
    forged.body.pool = PublicKey(lab_key);
    forged.body.pool_name = "lab".into();
    plant(d, "forger", &lab, &forged.to_text().unwrap());
    let (mut forger, forger_id) = node(d, "forger", "lab", &addr, &[]);

    let cases = [
        (
            &mut bare,
            &bare_id,
            "no certificate",
            "it presented no certificate",
        ),
        (&mut late, &late_id, "an expired certificate", "expired at"),
        (
            &mut forger,
            &forger_id,
            "a forged certificate",
            "forged or altered",
        ),
    ];
    for (proc, id, what, why) in cases {
        expect_line(
            &mut coord,
            what,
            &[&format!("refused peer {id}: "), why],
            30,
        );
        expect_line(proc, what, &["refused this peer: ", why], 30);
    }

    // A certificate that runs out while its node serves takes the node out.
    join(d, "lab", "brief", &["--expires", "6s"]);
    let (_brief, brief_id) = node(d, "brief", "lab", &addr, &[]);
    common::wait_joined(&mut coord, [&brief_id]);
    expect_line(
        &mut coord,
        "the expiry",
        &[&format!(
            "refused peer {brief_id}: its certificate expired at"
        )],
        30,
    );

    // Revoking the member's certificate (serial 1) takes it out, with no restart.
    common::potluck_ok(&[
        "pool",
        "revoke",
        "--pool",
        "lab",
        "--dir",
        path(&lab_dir),
        "--serial",
        "1",
    ]);
    expect_line(
        &mut coord,
        "the revocation",
        &["certificates revoked: [1]"],
        10,
    );
    expect_line(
        &mut coord,
        "the revoked member's refusal",
        &[&format!(
            "refused peer {good_id}: its certificate (serial 1) was revoked"
        )],
        10,
    );
    // Its API key stops working too.
    assert_eq!(api_status(), 403);
    // It hears of it, dials back, and is refused for the same reason.
    expect_line(
        &mut good,
        "the gossiped revocation",
        &["own certificate (serial 1) was revoked"],
        10,
    );
    expect_line(
        &mut good,
        "the refusal of the revoked member",
        &["refused this peer: the certificate (serial 1) was revoked"],
        30,
    );

    // Over all of that, none of the refused nodes ever joined.
    for id in [&bare_id, &late_id, &forger_id] {
        never_joined(&coord, id);
    }
    let rejoined = coord
        .seen
        .iter()
        .filter(|l| l.starts_with(&format!("peer joined {good_id} ")))
        .count();
    assert_eq!(
        rejoined, 1,
        "the revoked member joined again: {:#?}",
        coord.seen
    );
}

#[test]
fn two_pools_on_one_network_stay_apart_and_nodes_refuse_an_uncertified_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = create(d, "lab");
    let city = create(d, "city");
    // A private pool's API does not face the network without keys.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args([
            "coordinator",
            "--pool",
            "lab",
            "--pool-dir",
            path(&d.join("lab")),
        ])
        .args([
            "--data-dir",
            path(&d.join("open-c")),
            "--http",
            "0.0.0.0:0",
            "--no-mdns",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs keys"), "{err}");

    let (mut lab_coord, lab_addr, _) = owner(d, "lab", "lab-c", &[]);
    let (mut city_coord, city_addr, _) = owner(d, "city", "city-c", &[]);

    // A city member dials both coordinators: the city takes it, the lab refuses it.
    join(d, "city", "walker", &[]);
    let (mut walker, walker_id) =
        node(d, "walker", "city", &city_addr, &["--bootstrap", &lab_addr]);
    common::wait_joined(&mut city_coord, [&walker_id]);
    expect_line(
        &mut lab_coord,
        "the other pool's node",
        &[&format!("refused peer {walker_id}: it is in pool {city}")],
        30,
    );
    expect_line(
        &mut walker,
        "the lab's refusal",
        &["refused this peer: it is in pool"],
        30,
    );

    // A public-pool node dialling the lab is refused too.
    let (mut stranger, stranger_id) = node(d, "stranger", "public", &lab_addr, &[]);
    expect_line(
        &mut lab_coord,
        "the public node",
        &[&format!("refused peer {stranger_id}: it is in pool public")],
        30,
    );
    expect_line(
        &mut stranger,
        "the lab's refusal",
        &["refused this peer: it is in pool"],
        30,
    );

    // A coordinator that names the lab by id but holds no certificate gets no lab node.
    let (mut rogue, rogue_addr, _) = coordinator(
        &d.join("rogue-c"),
        &["--pool", &lab, "--embedding-model", "none"],
    );
    join(d, "lab", "member", &[]);
    let (mut member, member_id) =
        node(d, "member", "lab", &lab_addr, &["--bootstrap", &rogue_addr]);
    common::wait_joined(&mut lab_coord, [&member_id]);
    expect_line(
        &mut member,
        "the rogue coordinator",
        &["refused peer ", "it presented no certificate"],
        30,
    );
    expect_line(
        &mut rogue,
        "the member's refusal",
        &[&format!(
            "peer {member_id} refused this peer: it presented no certificate"
        )],
        30,
    );

    std::thread::sleep(Duration::from_secs(2));
    never_joined(&lab_coord, &walker_id);
    never_joined(&lab_coord, &stranger_id);
    let served_rogue = format!("peer {member_id} serves blocks");
    assert!(
        !rogue.seen.iter().any(|l| l.starts_with(&served_rogue)),
        "a member served a coordinator it refused: {:#?}",
        rogue.seen
    );
}

#[test]
fn with_private_edges_text_stays_on_trusted_members() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "lab");
    let (mut coord, addr, http) = owner(d, "lab", "coordinator", &["--private-edges"]);
    join(d, "lab", "plain", &[]);
    join(d, "lab", "trusted", &["--role", "trusted"]);

    // A plain member alone: it may not see text, so nothing can be planned.
    let (_plain, plain_id) = node(d, "plain", "lab", &addr, &[]);
    common::wait_joined(&mut coord, [&plain_id]);
    expect_line(
        &mut coord,
        "the refusal to plan",
        &["no plan: no chain can run its first and last stages on trusted members"],
        30,
    );
    let chat = || {
        let body =
            serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        let raw = common::raw_http(
            &http,
            &common::request("POST", "/v1/chat/completions", &[], &body.to_string()),
        );
        common::split_answer(&raw).0
    };
    assert_eq!(chat(), 503);

    // A trusted member runs the model; the plain one still holds no edge.
    let (_trusted, trusted_id) = node(d, "trusted", "lab", &addr, &[]);
    expect_line(
        &mut coord,
        "the trusted member's work",
        &[&format!("peer {trusted_id} serves blocks 0..30")],
        90,
    );
    assert_eq!(chat(), 200);
    let plain_served = format!("peer {plain_id} serves blocks");
    assert!(
        !coord.seen.iter().any(|l| l.starts_with(&plain_served)),
        "an untrusted member was given text: {:#?}",
        coord.seen
    );
}

#[test]
fn a_member_node_serves_no_stream_to_a_peer_that_presents_no_certificate() {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = create(d, "lab");
    let (_coord, addr, _) = owner(d, "lab", "coordinator", &[]);
    join(d, "lab", "m", &[]);
    let (mut member, _) = node(d, "m", "lab", &addr, &[]);
    let member_addr: libp2p::Multiaddr = member.loopback_addr(secs(30)).parse().unwrap();
    let member_peer = match member_addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        other => panic!("no peer id in {member_addr}: {other:?}"),
    };

    // A peer that speaks the pool's protocols but skips the hello.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stranger = potluck_protocol::signed::Keypair::from_secret(&[77; 32]);
    let stranger_id = potluck_net::swarm::peer_id_of(&stranger.public()).unwrap();
    let answer = rt.block_on(async {
        let key = potluck_net::swarm::libp2p_keypair(stranger.secret()).unwrap();
        let mut swarm = common::open_swarm(key);
        let mut control = swarm.behaviour().streams.new_control();
        swarm.dial(member_addr).unwrap();
        tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        let protocol = potluck_protocol::stream::Channel::Control.protocol(&lab);
        let mut s = control
            .open_stream(
                member_peer,
                libp2p::StreamProtocol::try_from_owned(protocol).unwrap(),
            )
            .await
            .expect("a stream opens (it is refused only once the node looks at it)");
        let _ = s.write_all(b"anything").await;
        let _ = s.close().await;
        let mut back = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await;
        back
    });
    assert!(
        answer.is_empty(),
        "the member answered a stranger: {answer:?}"
    );
    expect_line(
        &mut member,
        "the refused stream",
        &[&format!(
            "refused a Control stream from peer {stranger_id}: not admitted"
        )],
        10,
    );
    expect_line(
        &mut member,
        "the silent peer's refusal",
        &[&format!(
            "refused peer {stranger_id}: it presented no certificate for this pool within 5 s"
        )],
        10,
    );
}

/// What a stranger's swarm was told that it should not have been.
fn overheard(
    heard: &mut Vec<String>,
    who: &str,
    known: &[libp2p::PeerId],
    event: libp2p::swarm::SwarmEvent<potluck_net::swarm::PoolBehaviourEvent>,
) {
    use libp2p::swarm::SwarmEvent;
    use libp2p::{gossipsub, identify, kad};
    use potluck_net::swarm::PoolBehaviourEvent as E;
    match event {
        SwarmEvent::Behaviour(E::Gossipsub(gossipsub::Event::Message { message, .. })) => heard
            .push(format!(
                "{who} got {} bytes of gossip from {:?}",
                message.data.len(),
                message.source
            )),
        SwarmEvent::Behaviour(E::Identify(identify::Event::Received { peer_id, info, .. })) => {
            heard.push(format!(
                "{who} was told {peer_id}'s addresses {:?}",
                info.listen_addrs
            ))
        }
        SwarmEvent::Behaviour(E::Kad(kad::Event::RoutingUpdated { peer, .. }))
            if !known.contains(&peer) =>
        {
            heard.push(format!("{who} learnt of peer {peer}"))
        }
        _ => {}
    }
}

/// Forged revocations a stranger answers a hello with: near the most one answer may hold.
const FORGED: usize = 8000;

#[test]
fn a_stranger_hears_no_adverts_addresses_or_peers_and_its_gossip_is_not_passed_on() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lab = create(d, "lab");
    let (mut coord, addr, _) = owner(d, "lab", "coordinator", &[]);
    join(d, "lab", "m", &[]);
    let (mut member, member_id) = node(d, "m", "lab", &addr, &[]);
    let member_addr: libp2p::Multiaddr = member.loopback_addr(secs(30)).parse().unwrap();
    common::wait_joined(&mut coord, [&member_id]);
    let targets: Vec<libp2p::Multiaddr> = vec![member_addr, addr.parse().unwrap()];
    let known: Vec<libp2p::PeerId> = targets
        .iter()
        .filter_map(potluck_net::swarm::peer_in)
        .collect();
    assert_eq!(known.len(), 2);

    // Two strangers on stock libp2p: both subscribe to the pool's topic, ask for addresses
    // and peers; one publishes, to see whether the member passes it on to the other.
    let topic = potluck_net::swarm::advert_topic(&lab);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let heard = rt.block_on(async {
        let stranger = |seed: u8| {
            let k = potluck_protocol::signed::Keypair::from_secret(&[seed; 32]);
            let mut s = common::open_swarm(potluck_net::swarm::libp2p_keypair(k.secret()).unwrap());
            s.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
            for (peer, a) in known.iter().zip(&targets) {
                s.behaviour_mut().kad.add_address(peer, a.clone());
                s.dial(a.clone()).unwrap();
            }
            s
        };
        let (mut a, mut b) = (stranger(91), stranger(92));
        // Stranger a answers every hello with a flood of forged revocations.
        let mut hellos = a
            .behaviour()
            .streams
            .new_control()
            .accept(libp2p::StreamProtocol::new(
                potluck_protocol::stream::ADMIT_PROTOCOL,
            ))
            .unwrap();
        let pool_key: PublicKey = PublicKey(from_hex(&lab).unwrap().try_into().unwrap());
        let forger = potluck_protocol::signed::Keypair::from_secret(&[66; 32]);
        let forged: Vec<_> = (0..FORGED)
            .map(|i| {
                let mut r =
                    potluck_protocol::membership::Revocation::issue(&forger, i as u64, 0).unwrap();
                r.pool = pool_key;
                r
            })
            .collect();
        tokio::spawn(async move {
            use potluck_protocol::messages::Message;
            while let Some((_, mut s)) = futures::StreamExt::next(&mut hellos).await {
                let _ = potluck_protocol::stream::read_frame_async::<Message>(&mut s, 1 << 20).await;
                let answer = Message::Admission(potluck_protocol::membership::Admission {
                    refused: None,
                    revocations: forged.clone(),
                });
                let _ = potluck_protocol::stream::write_frame_async(&mut s, &answer).await;
            }
        });
        let mut heard = Vec::new();
        // Within the 5 s a private pool gives a new peer to present a certificate.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(4500);
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick() => {
                    let _ = a.behaviour_mut().gossipsub.publish(topic.clone(), b"a stranger's word".to_vec());
                    a.behaviour_mut().kad.get_closest_peers(libp2p::PeerId::random());
                }
                e = a.select_next_some() => overheard(&mut heard, "stranger a", &known, e),
                e = b.select_next_some() => overheard(&mut heard, "stranger b", &known, e),
            }
        }
        heard
    });
    assert!(
        heard.is_empty(),
        "a stranger was told things by a private pool: {heard:#?}"
    );
    // Its forged revocations were not even checked: it is not admitted.
    let stranger_a = potluck_net::swarm::peer_id_of(
        &potluck_protocol::signed::Keypair::from_secret(&[91; 32]).public(),
    )
    .unwrap();
    expect_line(
        &mut member,
        "the stranger's revocations ignored",
        &[&format!(
            "ignored {FORGED} revocations from peer {stranger_a}: it is not admitted"
        )],
        10,
    );
    // The pool itself still works: the member is served and stays joined.
    assert!(!member.seen.iter().any(|l| l.contains("refused this peer")));
}

#[test]
fn a_member_that_held_text_before_private_edges_is_never_sent_a_prompt() {
    // A plain member served the whole model while the pool had no privacy option. The
    // coordinator restarts with `--private-edges` and every result checked: the member's
    // advert still says it holds blocks 0..30, but a claim is not an assignment, and no
    // check, twin or canary replays a first stage (the prompt) to it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "lab");
    join(d, "lab", "plain", &[]);
    join(d, "lab", "trusted", &["--role", "trusted"]);
    let port = common::free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let (mut coord, addr, _) = owner(d, "lab", "coordinator", &["--listen", &listen]);
    let coord_id = addr.rsplit('/').next().unwrap().to_string();
    let bootstrap = format!("{listen}/p2p/{coord_id}");
    let (_plain, plain_id) = node(d, "plain", "lab", &bootstrap, &[]);
    let (_trusted, trusted_id) = node(d, "trusted", "lab", &bootstrap, &[]);
    for id in [&plain_id, &trusted_id] {
        expect_line(
            &mut coord,
            "both members serving",
            &[&format!("peer {id} serves blocks 0..30")],
            90,
        );
    }
    drop(coord);

    let (mut coord, _, http) = owner(
        d,
        "lab",
        "coordinator",
        &["--listen", &listen, "--private-edges", "--check-share", "1"],
    );
    expect_line(
        &mut coord,
        "the trusted member's work",
        &[&format!("peer {trusted_id} serves blocks 0..30")],
        90,
    );
    for _ in 0..4 {
        let body =
            serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
        let raw = common::raw_http(
            &http,
            &common::request("POST", "/v1/chat/completions", &[], &body.to_string()),
        );
        assert_eq!(common::split_answer(&raw).0, 200, "{raw}");
    }
    // Checks run beside generation; give them time to pick a checker.
    std::thread::sleep(Duration::from_secs(3));
    coord.wait_for(secs(1), |_| false);
    let leaks: Vec<&String> = coord
        .seen
        .iter()
        .filter(|l| {
            l.starts_with(&format!("peer {plain_id} serves blocks"))
                || l.contains(&format!("checker={plain_id}"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "an untrusted member was sent a first stage: {leaks:#?}"
    );
}

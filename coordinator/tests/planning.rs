//! The planner covers every block within memory caps, in proportion to speed, with replicas
//! where capacity allows and stable re-plans; the router picks the cheapest chain; the peer
//! table admits only verified, current adverts.

use potluck_coordinator::peer_table::{Accepted, AdvertRejection, PeerTable};
use potluck_coordinator::planner::{
    capacity, covers, plan, ModelShape, Plan, PlanError, PlanPeer, Span,
};
use potluck_coordinator::router::{route, PeerCost};
use potluck_protocol::messages::{
    AdvertNotCurrent, CapacityAdvert, DeviceKind, LayerRange, ADVERT_DOMAIN,
};
use potluck_protocol::signed::{Keypair, PublicKey, Signed};
use std::collections::HashSet;

const MB: u64 = 1 << 20;

/// SmolLM2-like: 30 blocks of 2.2 MB, a 30 MB embedding, 64 MB kept free per peer.
fn model() -> ModelShape {
    ModelShape {
        layers: 30,
        layer_bytes: 2 * MB + MB / 5,
        edge_bytes: 30 * MB,
        reserve_bytes: 64 * MB,
    }
}

fn peer(id: u8, speed: f64, memory: u64) -> PlanPeer {
    PlanPeer {
        id: PublicKey([id; 32]),
        speed,
        memory_bytes: memory,
        edge_ok: true,
    }
}

/// A peer that may not hold the first or last span (not a trusted member, with the pool's
/// privacy option on).
fn untrusted(id: u8, speed: f64, memory: u64) -> PlanPeer {
    PlanPeer {
        edge_ok: false,
        ..peer(id, speed, memory)
    }
}

/// Bytes a peer needs for `blocks` blocks.
fn room(blocks: u64) -> u64 {
    model().reserve_bytes + model().edge_bytes + blocks * model().layer_bytes
}

#[test]
fn with_private_edges_first_and_last_spans_stay_on_trusted_peers() {
    let edges_trusted = |spans: &[Span], trusted: &[u8]| {
        spans
            .iter()
            .filter(|s| s.range.start == 0 || s.range.end == 30)
            .all(|s| trusted.contains(&s.peer.0[0]))
    };
    // The fastest peers are untrusted; two slow trusted ones take the edges, the fast ones
    // the middle.
    let peers = [
        untrusted(1, 9.0, room(12)),
        untrusted(2, 8.0, room(12)),
        peer(3, 1.0, room(12)),
        peer(4, 1.0, room(12)),
    ];
    let p = plan(&model(), &peers, None).unwrap();
    assert!(covers(&p.spans, 30), "{:?}", p.spans);
    assert!(edges_trusted(&p.spans, &[3, 4]), "{:?}", p.spans);
    assert!(blocks(&p.spans, 1) > 0, "{:?}", p.spans);
    // Without the option the fast peers would take the edges.
    let open: Vec<PlanPeer> = peers
        .iter()
        .map(|p| PlanPeer {
            edge_ok: true,
            ..p.clone()
        })
        .collect();
    let q = plan(&model(), &open, None).unwrap();
    assert!(!edges_trusted(&q.spans, &[3, 4]), "{:?}", q.spans);

    // One trusted peer that holds the whole model runs it alone; untrusted peers get no
    // edge, and no replica of one.
    let peers = [untrusted(1, 9.0, room(30)), peer(2, 1.0, room(30))];
    let p = plan(&model(), &peers, None).unwrap();
    assert!(edges_trusted(&p.spans, &[2]), "{:?}", p.spans);
    assert_eq!(blocks(&p.spans, 2), 30);
    assert_eq!(blocks(&p.spans, 1), 0);
    // A plan made without the option is not kept once it applies.
    let before = plan(&model(), &[peer(1, 9.0, room(30))], None).unwrap();
    let p = plan(&model(), &peers, Some(&before)).unwrap();
    assert!(edges_trusted(&p.spans, &[2]), "{:?}", p.spans);

    // No trusted peer: no plan, and the reason.
    assert_eq!(
        plan(&model(), &[untrusted(1, 1.0, room(30))], None),
        Err(PlanError::NoTrustedEdges)
    );
}

/// Blocks per peer, and a check that every chain in the plan is contiguous from 0.
fn blocks(spans: &[Span], id: u8) -> u32 {
    spans
        .iter()
        .filter(|s| s.peer.0[0] == id)
        .map(|s| s.range.end - s.range.start)
        .sum()
}

#[test]
fn a_plan_covers_every_block_in_proportion_to_speed() {
    let cap =
        |blocks: u64| model().reserve_bytes + model().edge_bytes + blocks * model().layer_bytes;
    // Each peer can hold the whole model: three one-peer chains (replicas of everything).
    let peers = [
        peer(1, 1.0, cap(30)),
        peer(2, 2.0, cap(30)),
        peer(3, 3.0, cap(30)),
    ];
    let p = plan(&model(), &peers, None).unwrap();
    assert_eq!(p.epoch, 1);
    assert_eq!(p.spans.len(), 3);
    assert!(p
        .spans
        .iter()
        .all(|s| s.range == LayerRange { start: 0, end: 30 }));
    let peers = [
        peer(1, 1.0, cap(20)),
        peer(2, 2.0, cap(20)),
        peer(3, 3.0, cap(20)),
    ];
    let p = plan(&model(), &peers, None).unwrap();
    assert!(covers(&p.spans, 30));
    // Each holds 20: the fastest two form the chain in proportion 3:2 -> 18 and 12, and the
    // slowest replicates a span.
    assert_eq!(blocks(&p.spans, 3), 18);
    assert_eq!(blocks(&p.spans, 2), 12);
    assert_eq!(p.spans.len(), 3, "{:?}", p.spans);
}

#[test]
fn memory_caps_bind_and_shortfalls_are_errors() {
    let cap =
        |blocks: u64| model().reserve_bytes + model().edge_bytes + blocks * model().layer_bytes;
    // A very fast peer that can hold only 5 blocks gets 5; the rest goes to the others.
    let peers = [
        peer(1, 100.0, cap(5)),
        peer(2, 1.0, cap(15)),
        peer(3, 1.0, cap(15)),
    ];
    let p = plan(&model(), &peers, None).unwrap();
    assert!(covers(&p.spans, 30));
    for pp in &peers {
        assert!(blocks(&p.spans, pp.id.0[0]) <= capacity(&model(), pp));
    }
    assert_eq!(blocks(&p.spans, 1), 5);
    let short = [peer(1, 1.0, cap(10)), peer(2, 1.0, cap(10))];
    assert_eq!(
        plan(&model(), &short, None),
        Err(PlanError::NotEnoughMemory {
            needed: 30,
            available: 20
        })
    );
    assert_eq!(
        plan(&model(), &[peer(1, 1.0, MB)], None),
        Err(PlanError::NoPeers)
    );
    assert_eq!(plan(&model(), &[], None), Err(PlanError::NoPeers));
}

#[test]
fn replans_keep_standing_assignments_and_survive_departures() {
    let cap =
        |blocks: u64| model().reserve_bytes + model().edge_bytes + blocks * model().layer_bytes;
    let three = [
        peer(1, 1.0, cap(12)),
        peer(2, 1.0, cap(12)),
        peer(3, 1.0, cap(12)),
    ];
    let first = plan(&model(), &three, None).unwrap();
    assert!(covers(&first.spans, 30));
    // A fourth peer joins: nobody else moves; it becomes a replica.
    let mut four = three.to_vec();
    four.push(peer(4, 1.0, cap(12)));
    let second = plan(&model(), &four, Some(&first)).unwrap();
    for s in &first.spans {
        assert!(second.spans.contains(s), "{s:?} moved");
    }
    assert_eq!(second.epoch, first.epoch + 1);
    assert!(second.span_of(&PublicKey([4; 32])).is_some());
    // Nothing changes: same epoch.
    assert_eq!(plan(&model(), &four, Some(&second)).unwrap(), second);
    // Peer 2 leaves: the plan still covers the model with the rest.
    let without: Vec<PlanPeer> = four.iter().filter(|p| p.id.0[0] != 2).cloned().collect();
    let third = plan(&model(), &without, Some(&second)).unwrap();
    assert!(covers(&third.spans, 30));
    assert!(third.span_of(&PublicKey([2; 32])).is_none());
}

#[test]
fn the_router_takes_the_cheapest_covering_chain() {
    let span = |id: u8, start, end| Span {
        peer: PublicKey([id; 32]),
        range: LayerRange { start, end },
    };
    let p = potluck_coordinator::planner::Plan {
        epoch: 1,
        spans: vec![
            span(1, 0, 15),
            span(2, 15, 30),
            span(3, 0, 30),
            span(4, 15, 30),
        ],
    };
    let costs = |slow3: bool| {
        move |k: &PublicKey| match k.0[0] {
            1 | 2 => Some(PeerCost {
                rtt_ms: 1.0,
                ms_per_block: 0.1,
            }),
            3 => Some(PeerCost {
                rtt_ms: 1.0,
                ms_per_block: if slow3 { 1.0 } else { 0.01 },
            }),
            4 => Some(PeerCost {
                rtt_ms: 20.0,
                ms_per_block: 0.1,
            }),
            _ => None,
        }
    };
    let none = HashSet::new();
    let r = route(&p, 30, costs(true), &none).unwrap();
    assert_eq!(r, vec![span(1, 0, 15), span(2, 15, 30)]);
    assert_eq!(
        route(&p, 30, costs(false), &none).unwrap(),
        vec![span(3, 0, 30)]
    );
    // Without peer 2, the far replica 4 still beats the slow whole-model peer.
    let ex: HashSet<PublicKey> = [PublicKey([2; 32])].into();
    assert_eq!(
        route(&p, 30, costs(true), &ex).unwrap(),
        vec![span(1, 0, 15), span(4, 15, 30)]
    );
    // Without 2, 3 and 4 nothing covers blocks 15..30.
    let ex: HashSet<PublicKey> = [2, 3, 4].map(|i| PublicKey([i; 32])).into();
    assert_eq!(route(&p, 30, costs(true), &ex), None);
}

fn advert(pool: &str, seq: u64, issued: u64, expires: u64) -> CapacityAdvert {
    CapacityAdvert {
        pool: pool.into(),
        device: DeviceKind::Cpu,
        memory_bytes: 4 << 30,
        gflops: 50.0,
        mem_gbps: 10.0,
        threads: 2,
        models: vec![],
        loaded: None,
        seq,
        issued_at: issued,
        expires_at: expires,
        name: None,
        coordinator: None,
    }
}

#[test]
fn the_peer_table_admits_only_verified_current_adverts() {
    let k = Keypair::from_secret(&[1; 32]);
    let now = 1_000_000;
    let sign = |a: &CapacityAdvert| Signed::sign(a, ADVERT_DOMAIN, &k).unwrap();
    let mut t = PeerTable::new("lab");
    assert_eq!(
        t.accept(&sign(&advert("lab", 1, now, now + 30)), now),
        Ok(Accepted::New)
    );
    assert_eq!(
        t.accept(&sign(&advert("lab", 2, now, now + 30)), now),
        Ok(Accepted::Refreshed)
    );
    let mut bigger = advert("lab", 3, now, now + 30);
    bigger.memory_bytes *= 2;
    assert_eq!(t.accept(&sign(&bigger), now), Ok(Accepted::Changed));
    assert!(matches!(
        t.accept(&sign(&advert("lab", 3, now, now + 30)), now),
        Err(AdvertRejection::Stale { .. })
    ));
    assert!(matches!(
        t.accept(&sign(&advert("other", 9, now, now + 30)), now),
        Err(AdvertRejection::NotCurrent(AdvertNotCurrent::WrongPool(_)))
    ));
    assert!(matches!(
        t.accept(&sign(&advert("lab", 9, now - 60, now - 1)), now),
        Err(AdvertRejection::NotCurrent(AdvertNotCurrent::Expired(_)))
    ));
    assert!(matches!(
        t.accept(&sign(&advert("lab", 9, now + 3600, now + 3630)), now),
        Err(AdvertRejection::NotCurrent(AdvertNotCurrent::FromFuture(_)))
    ));
    assert!(matches!(
        t.accept(&sign(&advert("lab", 9, now, now + 86_400)), now),
        Err(AdvertRejection::TtlTooLong(_))
    ));
    // A name that a page or terminal would read as markup, and a pointer too big to carry.
    let marked_up = CapacityAdvert {
        name: Some("<b>admin</b>".into()),
        ..advert("lab", 9, now, now + 30)
    };
    assert!(matches!(
        t.accept(&sign(&marked_up), now),
        Err(AdvertRejection::Text(_))
    ));
    let pointer = potluck_protocol::messages::CoordinatorPointer {
        peer: "p".into(),
        addrs: vec!["/ip4/10.0.0.1/tcp/1".into(); 9],
    };
    let crowded = CapacityAdvert {
        coordinator: Some(pointer),
        ..advert("lab", 9, now, now + 30)
    };
    assert!(matches!(
        t.accept(&sign(&crowded), now),
        Err(AdvertRejection::Text(_))
    ));
    let named = CapacityAdvert {
        name: Some("lab bench 2".into()),
        seq: 9,
        ..bigger
    };
    assert_eq!(t.accept(&sign(&named), now), Ok(Accepted::Refreshed));
    let mut forged = sign(&advert("lab", 10, now, now + 30));
    forged.body[3] ^= 1;
    assert!(matches!(
        t.accept(&forged, now),
        Err(AdvertRejection::Invalid(_))
    ));
    let mut impostor = sign(&advert("lab", 10, now, now + 30));
    impostor.signer = Keypair::from_secret(&[2; 32]).public();
    assert!(matches!(
        t.accept(&impostor, now),
        Err(AdvertRejection::Invalid(_))
    ));
    assert_eq!(t.len(), 1);
    assert_eq!(t.get(&k.public()).unwrap().advert.memory_bytes, 8 << 30);
    // Once its advert expires it is silent; the caller decides when it is gone.
    assert!(t.silent(now + 10).is_empty());
    assert_eq!(t.silent(now + 31), vec![k.public()]);
    assert!(t.remove(&k.public()));
    assert!(t.is_empty());
}

#[test]
fn a_peer_is_dropped_after_k_missed_heartbeats_not_one_late_one() {
    let k = Keypair::from_secret(&[1; 32]);
    let sign = |a: &CapacityAdvert| Signed::sign(a, ADVERT_DOMAIN, &k).unwrap();
    let now = 1_000_000;
    // Adverts every 10 s, valid for 60 s; the coordinator allows 2 missed ones.
    let mut t = PeerTable::new("lab").with_missed_heartbeats(2);
    t.accept(&sign(&advert("lab", 1, now, now + 60)), now)
        .unwrap();
    t.accept(&sign(&advert("lab", 2, now + 10, now + 70)), now + 10)
        .unwrap();
    assert_eq!(t.get(&k.public()).unwrap().interval(), Some(10));
    // An advert sent early (on a change) does not shorten the heartbeat.
    t.accept(&sign(&advert("lab", 3, now + 11, now + 71)), now + 11)
        .unwrap();
    assert_eq!(t.get(&k.public()).unwrap().interval(), Some(10));
    // One late heartbeat is not enough...
    assert!(t.silent(now + 25).is_empty());
    assert!(t.silent(now + 30).is_empty());
    // ...two missed ones are (counted from the last advert, at +11), long before the advert
    // itself expires.
    assert!(t.silent(now + 31).is_empty());
    assert_eq!(t.silent(now + 32), vec![k.public()]);
    // With the default of 3 it would still be there.
    let mut t = PeerTable::new("lab");
    t.accept(&sign(&advert("lab", 1, now, now + 60)), now)
        .unwrap();
    t.accept(&sign(&advert("lab", 2, now + 10, now + 70)), now + 10)
        .unwrap();
    assert!(t.silent(now + 31).is_empty());
    assert_eq!(t.silent(now + 41), vec![k.public()]);
}

#[test]
fn a_fresh_nodes_adverts_on_changes_do_not_teach_a_short_heartbeat() {
    let k = Keypair::from_secret(&[1; 32]);
    let sign = |a: &CapacityAdvert| Signed::sign(a, ADVERT_DOMAIN, &k).unwrap();
    let now = 1_000_000;
    let mut t = PeerTable::new("lab");
    // Joined, then loading its assignment, then loaded (less memory free each time): three
    // adverts in two seconds.
    t.accept(&sign(&advert("lab", 1, now, now + 60)), now)
        .unwrap();
    let mut loading = advert("lab", 2, now + 1, now + 61);
    loading.memory_bytes = 3 << 30;
    t.accept(&sign(&loading), now + 1).unwrap();
    let mut loaded = advert("lab", 3, now + 2, now + 62);
    loaded.memory_bytes = 2 << 30;
    t.accept(&sign(&loaded), now + 2).unwrap();
    assert_eq!(t.get(&k.public()).unwrap().interval(), None);
    // Three "heartbeats" of one second later, it is not silent.
    assert!(t.silent(now + 10).is_empty());
    // Its first refresh, at the regular 10 s, times the heartbeat from its first advert,
    // not from the changes between.
    let advert_at = |seq: u64, at: u64, memory: u64| {
        let mut a = advert("lab", seq, now + at, now + at + 60);
        a.memory_bytes = memory;
        sign(&a)
    };
    t.accept(&advert_at(4, 10, 2 << 30), now + 10).unwrap();
    assert_eq!(t.get(&k.public()).unwrap().interval(), Some(10));
    // A change, then a refresh a second after it: the refresh came 2 s after the last
    // refresh, early, and does not shorten the heartbeat either.
    t.accept(&advert_at(5, 11, 1 << 30), now + 11).unwrap();
    t.accept(&advert_at(6, 12, 1 << 30), now + 12).unwrap();
    assert_eq!(t.get(&k.public()).unwrap().interval(), Some(10));
    // Three missed heartbeats after the last advert are silence.
    assert!(t.silent(now + 42).is_empty());
    assert_eq!(t.silent(now + 43), vec![k.public()]);
}

#[test]
fn gossip_from_hostile_peers_is_dropped_with_a_reason() {
    use potluck_coordinator::daemon::{check_gossip, GossipRejection};
    use potluck_net::swarm::peer_id_of;
    use potluck_protocol::codec::{encode_frame, PROTOCOL_VERSION};
    use potluck_protocol::messages::{Heartbeat, Message};
    let now = 1_000_000;
    let honest = Keypair::from_secret(&[1; 32]);
    let source = peer_id_of(&honest.public());
    let frame = |a: &CapacityAdvert, k: &Keypair| {
        encode_frame(&Message::Advert(Signed::sign(a, ADVERT_DOMAIN, k).unwrap())).unwrap()
    };
    let mut t = PeerTable::new("lab");
    // Malformed, oversized, wrong-version, non-advert, mis-signed: each refused, typed.
    assert!(matches!(
        check_gossip(&mut t, b"\x01\x02garbage", source, now),
        Err(GossipRejection::Frame(_))
    ));
    let mut huge = frame(&advert("lab", 1, now, now + 30), &honest);
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        check_gossip(&mut t, &huge, source, now),
        Err(GossipRejection::Frame(_))
    ));
    let mut old = frame(&advert("lab", 1, now, now + 30), &honest);
    old[4..6].copy_from_slice(&(PROTOCOL_VERSION + 7).to_le_bytes());
    assert!(matches!(
        check_gossip(&mut t, &old, source, now),
        Err(GossipRejection::Frame(_))
    ));
    let hb = encode_frame(&Message::Heartbeat(Heartbeat {
        seq: 1,
        sent_at_ms: 1,
    }))
    .unwrap();
    assert_eq!(
        check_gossip(&mut t, &hb, source, now),
        Err(GossipRejection::NotAnAdvert)
    );
    // Someone relaying (or forging) another peer's advert under their own id.
    let mallory = peer_id_of(&Keypair::from_secret(&[66; 32]).public());
    let good = frame(&advert("lab", 1, now, now + 30), &honest);
    assert_eq!(
        check_gossip(&mut t, &good, mallory, now),
        Err(GossipRejection::SignerMismatch)
    );
    assert_eq!(
        check_gossip(&mut t, &good, None, now),
        Err(GossipRejection::SignerMismatch)
    );
    let mut forged =
        Signed::sign(&advert("lab", 2, now, now + 30), ADVERT_DOMAIN, &honest).unwrap();
    forged.body[5] ^= 1;
    let forged = encode_frame(&Message::Advert(forged)).unwrap();
    assert!(matches!(
        check_gossip(&mut t, &forged, source, now),
        Err(GossipRejection::Advert(_))
    ));
    assert!(t.is_empty());
    // After all that, the honest advert is accepted.
    assert_eq!(
        check_gossip(&mut t, &good, source, now),
        Ok((Accepted::New, honest.public()))
    );
    assert_eq!(t.len(), 1);
}

#[test]
fn a_flood_of_fresh_keys_fills_a_bounded_table_and_known_peers_still_refresh() {
    let now = 1_000_000;
    let mut t = PeerTable::new("lab").with_max_peers(3);
    let keys: Vec<Keypair> = (1..=5).map(|i| Keypair::from_secret(&[i; 32])).collect();
    let sign = |k: &Keypair, seq| {
        Signed::sign(&advert("lab", seq, now, now + 30), ADVERT_DOMAIN, k).unwrap()
    };
    for k in &keys[..3] {
        assert_eq!(t.accept(&sign(k, 1), now), Ok(Accepted::New));
    }
    for k in &keys[3..] {
        assert_eq!(t.accept(&sign(k, 1), now), Err(AdvertRejection::Full(3)));
    }
    assert_eq!(t.len(), 3);
    // Peers already in keep advertising; one that goes leaves room.
    assert_eq!(t.accept(&sign(&keys[0], 2), now), Ok(Accepted::Refreshed));
    assert!(t.remove(&keys[1].public()));
    assert_eq!(t.accept(&sign(&keys[4], 1), now), Ok(Accepted::New));
}

#[test]
fn measured_speed_replaces_claims_and_untimed_claims_are_capped() {
    use potluck_coordinator::planner::planning_speed;
    // Nothing timed yet: claims stand.
    assert_eq!(planning_speed(1e6, None, None), 1e6);
    // A fresh key claiming a million counts as the fastest peer timed.
    assert_eq!(planning_speed(1e6, None, Some(12.0)), 12.0);
    assert_eq!(planning_speed(5.0, None, Some(12.0)), 5.0);
    // Once timed, the measurement is what counts, above or below the claim.
    assert_eq!(planning_speed(1e6, Some(3.0), Some(12.0)), 3.0);
    assert_eq!(planning_speed(1.0, Some(12.0), Some(12.0)), 12.0);
    // And it moves the plan: the liar's blocks shrink to what it did.
    let m = model();
    // Each holds at most 20 blocks, so the two must split the model.
    let room = room(20);
    let claims = [peer(1, 10.0, room), peer(2, 1e6, room)];
    let timed = [
        peer(1, 10.0, room),
        peer(2, planning_speed(1e6, Some(2.5), Some(10.0)), room),
    ];
    let by_claim = plan(&m, &claims, None).unwrap();
    let by_time = plan(&m, &timed, None).unwrap();
    assert!(blocks(&by_claim.spans, 2) > blocks(&by_time.spans, 2));
    assert!(blocks(&by_time.spans, 1) > blocks(&by_time.spans, 2));
}

#[test]
fn a_plan_says_whether_it_is_whole_copies_or_a_split() {
    let peer = |n: u8| Keypair::from_secret(&[n; 32]).public();
    let span = |n: u8, start: u32, end: u32| Span {
        peer: peer(n),
        range: LayerRange { start, end },
    };
    let copies = Plan {
        epoch: 1,
        spans: vec![span(1, 0, 8), span(2, 0, 8)],
    };
    assert!(
        copies
            .explain(8)
            .starts_with("2 whole copies of the model's 8 blocks"),
        "{}",
        copies.explain(8)
    );
    let split = Plan {
        epoch: 1,
        spans: vec![span(1, 0, 5), span(2, 5, 8)],
    };
    assert!(split
        .explain(8)
        .contains("split over 2 nodes: no node's memory holds them all"));
    let both = Plan {
        epoch: 1,
        spans: vec![span(1, 0, 8), span(2, 0, 5), span(3, 5, 8)],
    };
    assert!(both
        .explain(8)
        .starts_with("1 whole copy of the model's 8 blocks, and a split over 2"));
}

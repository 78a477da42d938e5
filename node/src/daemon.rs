//! `potluck node`: measure the machine, join the pool's swarm, keep a signed capacity advert
//! on the pool's gossip topic (on start, on change, and every interval, with expiry), and
//! serve the layers the coordinator assigns.

use crate::commanders::Commanders;
use crate::control::Command;
use crate::finder::Finder;
use crate::idle::{Availability, Window};
use crate::probe::{probe, Capacity, Limits};
use crate::serve::{LocalModel, Server};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, Multiaddr, PeerId};
use potluck_net::gate::PoolMembership;
use potluck_net::pool_id;
use potluck_net::swarm::{self, PoolBehaviourEvent};
use potluck_protocol::codec::encode_frame;
use potluck_protocol::messages::{
    CapacityAdvert, CoordinatorPointer, LayerRange, Leave, Message, ModelRef, ADVERT_DOMAIN,
};
use potluck_protocol::signed::{Keypair, Signed};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a node with no coordinator asks the DHT for its pool's.
const DHT_LOOK_UP_EVERY: Duration = Duration::from_secs(3);

/// How a node is run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Identity, caches and state.
    pub data_dir: PathBuf,
    /// Pool to join, and what this node presents to join it.
    pub pool: PoolMembership,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial first (each with its /p2p/ id).
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN.
    pub mdns: bool,
    /// The circuit relay this node serves to peers behind NATs, if its owner offers one.
    pub relay: Option<potluck_net::swarm::RelayLimits>,
    /// The owner's limits.
    pub limits: Limits,
    /// How often to re-advertise.
    pub advert_interval: Duration,
    /// How long an advert stays valid.
    pub advert_ttl: Duration,
    /// Models in the local cache that the node offers.
    pub models: Vec<LocalModel>,
    /// The owner's memory cap, which weights and KV caches share (none: caches get the
    /// engine's default budget).
    pub memory_cap: Option<u64>,
    /// How often to measure the machine again (free memory and speed change).
    pub probe_interval: Duration,
    /// On shutdown, how long running sessions get to move away before the node exits.
    pub leave_deadline: Duration,
    /// Outputs to corrupt on purpose (test builds only; see [`crate::fault`]).
    pub faults: Option<crate::fault::FaultPlan>,
    /// `--idle-only`: pause while other processes use more than this share of the CPUs,
    /// resume after this long below it.
    pub idle_only: Option<(f32, Duration)>,
    /// Daily windows the node works in (none: always).
    pub schedule: Vec<Window>,
    /// How much one batch of the stage may hold.
    pub batch: crate::batcher::BatchLimits,
    /// The owner's name for this node (`--name`), shown on the pool's dashboard.
    pub name: Option<String>,
}

/// What an advert says besides the measured capacity.
#[derive(Debug, Clone, Default)]
pub struct Offer {
    /// Models the node can load.
    pub models: Vec<ModelRef>,
    /// Blocks loaded now.
    pub loaded: Option<(ModelRef, LayerRange)>,
    /// The owner's name for the node.
    pub name: Option<String>,
    /// The coordinator the node answers to, for nodes that join through this one.
    pub coordinator: Option<CoordinatorPointer>,
}

/// Builds and signs the advert for `cap`.
pub fn signed_advert(
    key: &Keypair,
    pool: &str,
    cap: &Capacity,
    offer: &Offer,
    seq: u64,
    ttl: Duration,
) -> Option<Signed> {
    let now = swarm::unix_now();
    let advert = CapacityAdvert {
        pool: pool.to_string(),
        device: cap.device.clone(),
        memory_bytes: cap.memory_bytes,
        gflops: cap.gflops,
        mem_gbps: cap.mem_gbps,
        threads: cap.threads,
        models: offer.models.clone(),
        loaded: offer.loaded.clone(),
        seq,
        issued_at: now,
        expires_at: now + ttl.as_secs().max(1),
        name: offer.name.clone(),
        coordinator: offer.coordinator.clone(),
    };
    Signed::sign(&advert, ADVERT_DOMAIN, key).ok()
}

/// Runs the node until `shutdown` resolves, then leaves gracefully: it announces its leave,
/// takes no new sessions, and exits once running sessions have moved away or the leave
/// deadline has passed.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), swarm::StartError> {
    let swarm::Started {
        mut swarm,
        key,
        topic,
        gate,
        mut drops,
        streams,
        reach,
    } = swarm::start(
        &cfg.data_dir,
        swarm::PeerKind::Node,
        &cfg.pool,
        &cfg.listen,
        &cfg.bootstrap,
        cfg.mdns,
        cfg.relay,
    )?;
    let mut capacity = probe(&cfg.limits);
    tracing::info!(?capacity, "capacity measured");
    let mut reprobe = tokio::time::interval(cfg.probe_interval);
    reprobe.tick().await;
    let server = Server::new(
        cfg.models.clone(),
        Keypair::from_secret(&key.secret()),
        cfg.memory_cap,
        cfg.batch,
        cfg.faults,
    );
    let commanders = Arc::new(Commanders::from_bootstrap(&cfg.bootstrap));
    let mut finder = Finder::new(commanders.clone(), &cfg.bootstrap, gate.tag());
    server
        .accept(streams, gate.clone(), commanders.clone())
        .map_err(swarm::StartError::Address)?;
    let mut accepted = gate.accepted_by_peers();
    let mut owner = crate::control::listen(&cfg.data_dir)
        .map_err(|e| swarm::StartError::Address(e.to_string()))?;
    let mut availability = Availability::new(cfg.idle_only, cfg.schedule.clone());
    let mut owner_paused = false;
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut loaded = server.loaded();
    let mut offer = Offer {
        models: server.models(),
        loaded: None,
        name: cfg.name.clone(),
        coordinator: None,
    };
    // Sequence numbers start from the clock so a restarted node's adverts are never stale.
    let mut seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut ticker = tokio::time::interval(cfg.advert_interval);
    // Until the first advert gets out (no peer subscribed yet), retry every second.
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut published = false;
    // Said once, at the first advert the pool hears.
    let mut joined = false;
    tokio::pin!(shutdown);
    let mut leave_by: Option<tokio::time::Instant> = None;
    // Bootstrap peers are dialled again, with exponential backoff, whenever the node is not
    // connected to them (a restarted coordinator, a network blip).
    let mut redial = tokio::time::interval(Duration::from_secs(1));
    let mut backoff = RedialBackoff::new(&cfg.bootstrap);
    // With no coordinator connected, the node asks the DHT for its pool's (its bootstrap
    // peer may be any peer of the DHT, or its coordinator may have moved).
    // Not at once: a coordinator named at --bootstrap is given the time to answer first.
    let mut look_up = tokio::time::interval_at(
        tokio::time::Instant::now() + DHT_LOOK_UP_EVERY,
        DHT_LOOK_UP_EVERY,
    );
    loop {
        if let Some(by) = leave_by {
            let active = server.active_sessions();
            if active == 0 || tokio::time::Instant::now() >= by {
                println!("left the pool ({active} sessions still open)");
                let _ = std::fs::remove_file(cfg.data_dir.join(crate::control::SOCKET));
                return Ok(());
            }
        }
        tokio::select! {
            _ = &mut shutdown, if leave_by.is_none() => {
                println!("leaving the pool: {} sessions to move away", server.active_sessions());
                server.start_leaving();
                leave_by = Some(tokio::time::Instant::now() + cfg.leave_deadline);
                let leave = Leave {
                    reason: "the owner stopped the node".into(),
                    deadline_ms: cfg.leave_deadline.as_millis().min(u32::MAX as u128) as u32,
                };
                if let Ok(frame) = encode_frame(&Message::Leave(leave)) {
                    if let Err(e) = swarm.behaviour_mut().gossipsub.publish(topic.clone(), frame) {
                        tracing::warn!("leave not announced: {e}");
                    }
                }
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if leave_by.is_some() => continue,
            _ = ticker.tick() => published = false,
            _ = redial.tick(), if leave_by.is_none() => {
                gate.sweep(swarm::unix_now());
                for (peer, addrs) in backoff.due(|p| swarm.is_connected(p)) {
                    tracing::info!(%peer, "dialling the bootstrap peer or coordinator again");
                    let dial = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .build();
                    if let Err(e) = swarm.dial(dial) {
                        tracing::debug!("redial failed: {e}");
                    }
                }
            }
            _ = look_up.tick(), if leave_by.is_none() && !finder.has_coordinator() => {
                pool_id::look_up(&mut swarm, gate.tag());
                continue;
            }
            _ = reprobe.tick() => {
                let limits = cfg.limits.clone();
                if let Ok(now) = tokio::task::spawn_blocking(move || probe(&limits)).await {
                    if now != capacity {
                        tracing::info!(?now, "capacity re-measured");
                        capacity = now;
                        published = false;
                    }
                }
            }
            Ok(()) = loaded.changed() => {
                let now = loaded.borrow_and_update().clone();
                if now != offer.loaded {
                    println!("{}", serving_line(now.as_ref()));
                }
                offer.loaded = now;
                offer.coordinator = finder.pointer();
                published = false;
            }
            _ = retry.tick(), if !published => {}
            _ = watch.tick(), if leave_by.is_none() => {
                availability.measure();
                let why = pause_reason(owner_paused, &availability);
                if switch_pause(&server, why, &mut swarm, &topic) {
                    published = false;
                }
                continue;
            }
            Some(req) = owner.recv() => {
                match req.command {
                    Command::Pause => owner_paused = true,
                    Command::Resume => owner_paused = false,
                    Command::Status => {}
                }
                let why = pause_reason(owner_paused, &availability);
                if switch_pause(&server, why, &mut swarm, &topic) {
                    published = false;
                }
                let state = if leave_by.is_some() {
                    "leaving"
                } else if server.paused().is_some() {
                    "paused"
                } else {
                    "serving"
                };
                let loaded = offer.loaded.as_ref().map(|(m, r)| {
                    serde_json::json!({"model": m.name, "start": r.start, "end": r.end})
                });
                let _ = req.reply.send(serde_json::json!({
                    "state": state,
                    "reason": server.paused(),
                    "peer_id": swarm.local_peer_id().to_string(),
                    "pool": gate.pool().describe(),
                    "active_sessions": server.active_sessions(),
                    "loaded": loaded,
                    "availability": availability.status(),
                    "batches": server.batch_stats().map(|s| s.summary()),
                }));
                continue;
            }
            // A peer that admits us (a restarted coordinator, one that dialled us back) hears
            // from us at once rather than at the next heartbeat.
            Ok(()) = accepted.changed() => published = false,
            Some((peer, why)) = drops.next() => {
                tracing::info!(%peer, "disconnecting: {why}");
                let _ = swarm.disconnect_peer_id(peer);
                continue;
            }
            event = swarm.select_next_some() => {
                // Only what identify said, a peer gone or a bootstrap peer's pointer can
                // change where this node's own pointer points.
                match swarm::handle_common(&mut swarm, &gate, &reach, event) {
                    Some(SwarmEvent::ConnectionEstablished { .. }) => {
                        published = false;
                        continue;
                    }
                    Some(SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. }) => {
                        finder.gone(&peer_id);
                    }
                    Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Kad(event))) => {
                        let me = *swarm.local_peer_id();
                        // An answer that comes after a coordinator did is not needed, and
                        // a stranger announcing itself gains nothing by it.
                        let wanted = !finder.has_coordinator();
                        for peer in pool_id::providers(&event, gate.tag(), &me)
                            .into_iter()
                            .filter(|_| wanted)
                        {
                            if commanders.found(peer) {
                                println!("found the pool's coordinator {peer} under its id in the DHT");
                            }
                            if !swarm.is_connected(&peer) {
                                if let Err(e) = swarm.dial(peer) {
                                    tracing::debug!(%peer, "dialling a coordinator found in the DHT: {e}");
                                }
                            }
                        }
                        continue;
                    }
                    Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Identify(
                        identify::Event::Received { peer_id, info, .. },
                    ))) => finder.identified(peer_id, &info.agent_version, &info.listen_addrs),
                    Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Gossipsub(
                        gossipsub::Event::Message { message, .. },
                    ))) => {
                        let now = swarm::unix_now();
                        let pointed = message
                            .source
                            .and_then(|from| finder.heard(from, &message.data, now));
                        let Some(p) = pointed else {
                            continue;
                        };
                        if p.new {
                            println!(
                                "found the pool's coordinator {} through {}",
                                p.coordinator, p.via
                            );
                        }
                        let addrs = finder.addresses_of(&p.coordinator);
                        if !addrs.is_empty() {
                            backoff.set(p.coordinator, addrs);
                        }
                        backoff.retain(|peer| commanders.obeys(peer));
                    }
                    _ => continue,
                }
                let pointer = finder.pointer();
                if pointer != offer.coordinator {
                    offer.coordinator = pointer;
                    published = false;
                }
                continue;
            }
        }
        if !published && leave_by.is_none() && server.paused().is_none() {
            seq += 1;
            let Some(advert) =
                signed_advert(&key, gate.tag(), &capacity, &offer, seq, cfg.advert_ttl)
            else {
                continue;
            };
            let Ok(frame) = encode_frame(&Message::Advert(advert)) else {
                continue;
            };
            match swarm
                .behaviour_mut()
                .gossipsub
                .publish(topic.clone(), frame)
            {
                Ok(_) => {
                    tracing::info!(seq, "advert published");
                    if !joined {
                        joined = true;
                        println!(
                            "joined {}: offering {} MB, {} threads; the coordinator assigns blocks",
                            gate.pool().describe(),
                            capacity.memory_bytes >> 20,
                            capacity.threads
                        );
                    }
                    published = true;
                }
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                Err(e) => tracing::warn!("advert not published: {e}"),
            }
        }
    }
}

/// The line a volunteer reads when what the node serves changes.
fn serving_line(loaded: Option<&(ModelRef, LayerRange)>) -> String {
    match loaded {
        Some((model, range)) => format!(
            "serving blocks {}..{} of {} ({} blocks)",
            range.start,
            range.end,
            model.name,
            range.len()
        ),
        None => "serving nothing now: no blocks assigned".into(),
    }
}

/// Why the node must not work now: its owner paused it, or its schedule or machine say so.
fn pause_reason(owner_paused: bool, availability: &Availability) -> Option<String> {
    if owner_paused {
        return Some("paused by its owner".into());
    }
    availability.pause_reason()
}

/// Pauses or resumes the node when `why` says otherwise than its state; a pause is announced
/// as a leave, so the pool plans around the node as if it had left. Whether the node just
/// resumed (and should advertise at once).
fn switch_pause(
    server: &Server,
    why: Option<String>,
    swarm: &mut libp2p::Swarm<swarm::PoolBehaviour>,
    topic: &gossipsub::IdentTopic,
) -> bool {
    let now = server.paused();
    if now == why {
        return false;
    }
    match why {
        Some(reason) => {
            server.resume();
            server.pause(&reason);
            println!("paused: {reason}");
            let leave = Leave {
                reason: format!("paused: {reason}"),
                deadline_ms: crate::serve::PAUSE_GRACE.as_millis() as u32,
            };
            if let Ok(frame) = encode_frame(&Message::Leave(leave)) {
                // Unheard, the pool still sees the adverts stop.
                if let Err(e) = swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic.clone(), frame)
                {
                    tracing::debug!("pause not announced: {e}");
                }
            }
            false
        }
        None => {
            server.resume();
            println!("resumed");
            true
        }
    }
}

/// When to dial each bootstrap peer (and each coordinator learned through one) again: at
/// once when first missed, then after 1, 2, 4 ... up to 30 seconds while it stays
/// unreachable.
struct RedialBackoff {
    peers: Vec<(PeerId, Vec<Multiaddr>, Duration, tokio::time::Instant)>,
}

impl RedialBackoff {
    const MAX: Duration = Duration::from_secs(30);

    fn new(bootstrap: &[Multiaddr]) -> Self {
        let mut b = Self { peers: Vec::new() };
        for a in bootstrap {
            if let Some(id) = swarm::peer_in(a) {
                let mut addrs = b.addresses(&id);
                addrs.push(a.clone());
                b.set(id, addrs);
            }
        }
        b
    }

    fn addresses(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .iter()
            .find(|(id, ..)| id == peer)
            .map(|(_, a, ..)| a.clone())
            .unwrap_or_default()
    }

    /// Keeps `peer` connected at `addrs` (in place of those it had); a peer new here, or
    /// whose addresses changed, is dialled at once.
    fn set(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let now = tokio::time::Instant::now();
        match self.peers.iter_mut().find(|(id, ..)| *id == peer) {
            Some((_, known, wait, next)) if *known != addrs => {
                *known = addrs;
                *wait = Duration::from_secs(1);
                *next = now;
            }
            Some(_) => {}
            None => self.peers.push((peer, addrs, Duration::from_secs(1), now)),
        }
    }

    /// Stops dialling the peers `keep` says no to (a coordinator no bootstrap peer names now).
    fn retain(&mut self, keep: impl Fn(&PeerId) -> bool) {
        self.peers.retain(|(id, ..)| keep(id));
    }

    /// Peers to dial now, with their addresses, given which are connected.
    fn due(&mut self, connected: impl Fn(&PeerId) -> bool) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let now = tokio::time::Instant::now();
        let mut out = Vec::new();
        for (id, addrs, wait, next) in &mut self.peers {
            if connected(id) {
                *wait = Duration::from_secs(1);
                *next = now + *wait;
            } else if now >= *next {
                out.push((*id, addrs.clone()));
                *next = now + *wait;
                *wait = (*wait * 2).min(Self::MAX);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([n; 32]).unwrap();
        key.public().to_peer_id()
    }

    fn at(port: u16) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/{port}").parse().unwrap()
    }

    #[test]
    fn redials_wait_between_tries_follow_new_addresses_and_drop_who_is_not_obeyed() {
        let (friend, coordinator) = (peer(1), peer(2));
        let pasted = at(4001).with(libp2p::multiaddr::Protocol::P2p(friend));
        let mut r = RedialBackoff::new(std::slice::from_ref(&pasted));
        assert_eq!(r.due(|_| false), vec![(friend, vec![pasted.clone()])]);
        assert!(r.due(|_| false).is_empty(), "a second try waits");
        r.set(coordinator, vec![at(7470)]);
        assert_eq!(r.due(|p| *p == friend), vec![(coordinator, vec![at(7470)])]);
        r.set(coordinator, vec![at(7470)]);
        assert!(
            r.due(|p| *p == friend).is_empty(),
            "the same addresses: no new dial"
        );
        r.set(coordinator, vec![at(7471)]);
        assert_eq!(r.due(|p| *p == friend), vec![(coordinator, vec![at(7471)])]);
        r.retain(|p| *p == friend);
        assert_eq!(r.addresses(&coordinator), Vec::<Multiaddr>::new());
        assert_eq!(r.addresses(&friend), vec![pasted]);
    }
}

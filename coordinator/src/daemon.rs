//! `potluck coordinator`: join the pool's swarm, verify every capacity advert into the peer
//! table, route around peers that disconnect or go quiet (dialling them again until they
//! come back or count as gone), re-plan as peers come and go, and send each peer its span.
//! Prints its listen addresses for nodes' `--bootstrap`, one line per peer that joins or
//! leaves, and each new plan.

use crate::audit::{AuditError, AuditLog, AUDIT_FILE};
use crate::batch::{Batches, Store, STORE_FILE};
use crate::config::CoordinatorConfig;
use crate::model::ServedModel;
use crate::peer_table::{Accepted, AdvertRejection, PeerTable};
use crate::pool::Coordinator;
use crate::revocations::RevocationWatch;
use crate::share::Share;
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, Multiaddr, PeerId};
use potluck_net::gate::PoolMembership;
use potluck_net::pool_id;
use potluck_net::swarm::{self, key_of_peer, peer_id_of, unix_now, PoolBehaviourEvent};
use potluck_protocol::codec::{decode_frame, encode_frame};
use potluck_protocol::membership::Revocation;
use potluck_protocol::messages::Message;
use potluck_protocol::signed::PublicKey;
use std::sync::Arc;
use std::time::Duration;

/// How often a coordinator announces its pool under the pool's id in the DHT.
const DHT_ANNOUNCE_EVERY: Duration = Duration::from_secs(30);
use tokio::sync::watch;

/// How often expired batches and files are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

/// A started coordinator: its handle, and the addresses it listens on as they appear.
pub struct Running {
    /// Sessions and pool state.
    pub coordinator: Coordinator,
    /// Files, batches and the credit ledger.
    pub batches: Arc<Batches>,
    /// Listen addresses (with /p2p/ id), for nodes' `--bootstrap`.
    pub listening: watch::Receiver<Vec<Multiaddr>>,
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The swarm could not start (identity, addresses).
    #[error(transparent)]
    Swarm(#[from] swarm::StartError),
    /// The audit log could not be opened or its end does not verify.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The job store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::batch::StoreError),
    /// The members list is not usable.
    #[error("members: {0}")]
    Members(String),
}

/// Starts the coordinator for `model`; its swarm runs on a task until the process ends.
/// Verdicts go to the audit log in its data directory.
pub fn start(cfg: CoordinatorConfig, model: ServedModel) -> Result<Running, StartError> {
    if matches!(cfg.pool, PoolMembership::Private { .. })
        && cfg.members.iter().any(|m| m.certificate.is_none())
    {
        return Err(StartError::Members(
            "in a private pool every member needs its certificate (the operator's own keys go in --api-key)".into(),
        ));
    }
    let share = Arc::new(
        Share::new(
            cfg.members.clone(),
            &cfg.api_keys,
            // Sized by memory later, so reserves only have to fit an explicit count.
            cfg.max_sessions.unwrap_or_else(|| {
                let reserved: usize = cfg.members.iter().map(|m| m.reserved_sessions).sum();
                crate::pool::DEFAULT_MAX_SESSIONS.max(reserved + 1)
            }),
        )
        .map_err(StartError::Members)?,
    );
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
        swarm::PeerKind::Coordinator,
        &cfg.pool,
        &cfg.listen,
        &cfg.bootstrap,
        cfg.mdns,
        cfg.relay,
    )?;
    let audit = AuditLog::open_with(
        &cfg.data_dir.join(AUDIT_FILE),
        key,
        gate.tag(),
        cfg.audit_rotation,
    )?;
    let store = Arc::new(Store::open_with(
        &cfg.data_dir.join(STORE_FILE),
        cfg.store_limits,
    )?);
    if let Some(keep) = cfg.retain {
        expire_old_work(store.clone(), keep);
    }
    let batches = Batches::new(store, cfg.batch_quorum);
    let ledger = batches.store.clone();
    let coordinator = Coordinator::new(model, streams, &cfg, Some(audit), share)
        .with_gate(gate.clone())
        .with_reach(reach.clone())
        .on_quarantine(move |peer| {
            if let Err(e) = ledger.void_credit(&peer.to_string()) {
                tracing::warn!(%peer, "voiding credit: {e}");
            }
        });
    let mut revocations = cfg.pool_dir.as_deref().map(RevocationWatch::new);
    batches.spawn(coordinator.clone());
    let (addrs_tx, listening) = watch::channel(Vec::new());
    let handle = coordinator.clone();
    let ledger = batches.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut credit_tick = tokio::time::interval(CREDIT_REFRESH);
        let mut chart_tick = tokio::time::interval(CHART_EVERY);
        let mut redial_tick = tokio::time::interval(Duration::from_millis(250));
        // The pool is announced under its id in the DHT at start and again now and then
        // (a record's holders come and go).
        let mut announce_tick = tokio::time::interval(DHT_ANNOUNCE_EVERY);
        let canary_every = cfg.canary_interval.unwrap_or(Duration::from_secs(3600));
        let mut canary_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + canary_every, canary_every);
        loop {
            let event = tokio::select! {
                _ = redial_tick.tick() => {
                    for peer in handle.due_redials() {
                        if !swarm.is_connected(&peer) {
                            if let Err(e) = swarm.dial(peer) {
                                tracing::debug!(%peer, "dial failed: {e}");
                            }
                        }
                    }
                    continue;
                }
                _ = announce_tick.tick() => {
                    pool_id::announce(&mut swarm, gate.tag());
                    continue;
                }
                _ = credit_tick.tick() => {
                    refresh_member_credits(&ledger, handle.share());
                    continue;
                }
                _ = chart_tick.tick() => {
                    handle.metrics().sample(unix_now());
                    continue;
                }
                _ = canary_tick.tick(), if cfg.canary_interval.is_some() => {
                    handle.canary_round();
                    continue;
                }
                _ = tick.tick() => {
                    handle.expire_silent();
                    handle.replan();
                    gate.sweep(unix_now());
                    if let Some(list) = revocations.as_mut().and_then(RevocationWatch::poll) {
                        announce_revocations(&mut swarm, &topic, &gate.revoke(&list));
                    }
                    continue;
                }
                Some((peer, why)) = drops.next() => {
                    handle.leaving(peer, &format!("refused: {why}"));
                    let _ = swarm.disconnect_peer_id(peer);
                    continue;
                }
                event = swarm.select_next_some() => event,
            };
            if let SwarmEvent::NewListenAddr { address, .. } = &event {
                let full = swarm::with_peer(address, *swarm.local_peer_id());
                addrs_tx.send_modify(|a| a.push(full));
            }
            match swarm::handle_common(&mut swarm, &gate, &reach, event) {
                Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Gossipsub(
                    gossipsub::Event::Message { message, .. },
                ))) => on_gossip(&handle, &message.data, message.source),
                Some(SwarmEvent::ConnectionEstablished {
                    peer_id,
                    connection_id,
                    endpoint,
                    ..
                }) => {
                    handle.connection_opened(peer_id, connection_id, endpoint.get_remote_address())
                }
                Some(SwarmEvent::ConnectionClosed {
                    peer_id,
                    connection_id,
                    num_established,
                    ..
                }) => {
                    handle.connection_closed(peer_id, connection_id);
                    if num_established == 0 {
                        handle.pinged(peer_id, false);
                        handle.unreachable(peer_id, "connection closed");
                    }
                }
                Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Ping(libp2p::ping::Event {
                    peer,
                    result: Ok(rtt),
                    ..
                }))) => {
                    handle.pinged(peer, true);
                    if let Some(key) = key_of_peer(&peer) {
                        handle
                            .core()
                            .table_mut()
                            .set_rtt(&key, rtt.as_secs_f32() * 1000.0);
                    }
                }
                Some(SwarmEvent::ExternalAddrConfirmed { address }) => {
                    println!("reachable at {address}");
                    pool_id::announce(&mut swarm, gate.tag());
                }
                _ => {}
            }
        }
    });
    Ok(Running {
        coordinator,
        batches,
        listening,
    })
}

impl Running {
    /// What the HTTP API serves: this coordinator and its batch runner.
    pub fn app(&self) -> crate::http::AppState {
        crate::http::AppState {
            pool: self.coordinator.clone(),
            batches: Some(self.batches.clone()),
        }
    }
}

/// Raises members' weights by the validated work their nodes were credited with (read from
/// the job store off the async threads).
fn refresh_member_credits(batches: &Batches, share: &Arc<Share>) {
    let (store, share) = (batches.store.clone(), share.clone());
    tokio::task::spawn_blocking(move || match store.credits() {
        Ok(credits) => {
            let by_peer = credits
                .into_iter()
                .map(|c| (c.peer, c.tokens as f64))
                .collect();
            share.set_credits(&by_peer);
        }
        Err(e) => tracing::warn!("reading the credit ledger: {e}"),
    });
}

/// Tells the pool's peers of `new` revocations, in gossip-sized batches; each peer checks
/// the pool's signature on every one.
fn announce_revocations(
    swarm: &mut libp2p::Swarm<swarm::PoolBehaviour>,
    topic: &gossipsub::IdentTopic,
    new: &[Revocation],
) {
    if new.is_empty() {
        return;
    }
    let serials: Vec<u64> = new.iter().map(|r| r.serial).collect();
    println!("certificates revoked: {serials:?}; telling the pool");
    for batch in new.chunks(REVOCATIONS_PER_MESSAGE) {
        let published = encode_frame(&Message::Revoked(batch.to_vec()))
            .map_err(|e| e.to_string())
            .and_then(|frame| {
                swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic.clone(), frame)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = published {
            // Peers still learn them from the answer to their next hello.
            tracing::warn!("revocations not gossiped: {e}");
        }
    }
}

/// Removes finished batches and unused uploads older than `keep`, now and every
/// [`EXPIRE_EVERY`], off the async threads.
fn expire_old_work(store: Arc<Store>, keep: Duration) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(EXPIRE_EVERY);
        loop {
            every.tick().await;
            let before = unix_now().saturating_sub(keep.as_secs());
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.expire(before)).await {
                Ok(Ok(gone)) if gone.batches + gone.files > 0 => tracing::info!(
                    batches = gone.batches,
                    files = gone.files,
                    "expired finished batches and unused uploads"
                ),
                Ok(Err(e)) => tracing::warn!("expiring old batches: {e}"),
                _ => {}
            }
        }
    });
}

/// How often members' weights follow the credit their nodes earned.
const CREDIT_REFRESH: Duration = Duration::from_secs(30);
/// How often the dashboard's chart of tokens/s and sessions gets a point.
const CHART_EVERY: Duration = Duration::from_secs(5);

/// Revocations per gossip message: well under the gossip size limit.
const REVOCATIONS_PER_MESSAGE: usize = 256;

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    model: ServedModel,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let _running = start(cfg, model)?;
    shutdown.await;
    Ok(())
}

/// Takes one gossiped frame into the pool: prints joins and leaves, logs drops, re-plans
/// on change. A leave counts only from the peer that published it (gossipsub signs and
/// checks the source).
fn on_gossip(handle: &Coordinator, data: &[u8], source: Option<PeerId>) {
    let from = source.map_or_else(|| "unknown".into(), |p| p.to_string());
    if let (Ok((Message::Leave(leave), _)), Some(peer)) = (decode_frame::<Message>(data), source) {
        handle.leaving(peer, &leave.reason);
        return;
    }
    let outcome = check_gossip(handle.core().table_mut(), data, source, unix_now());
    match outcome {
        Ok((accepted, key)) => {
            if accepted == Accepted::Changed {
                tracing::info!(%from, "capacity changed");
            }
            handle.admitted(key, accepted);
        }
        // A flood of fresh keys would otherwise flood the log as well.
        Err(why @ GossipRejection::Advert(AdvertRejection::Full(_))) => {
            tracing::debug!(%from, "dropped gossip: {why}")
        }
        Err(why) => tracing::warn!(%from, "dropped gossip: {why}"),
    }
}

/// Why a gossiped frame was dropped.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GossipRejection {
    /// The bytes are not a frame of our protocol (malformed, oversized, other version).
    #[error(transparent)]
    Frame(#[from] potluck_protocol::ProtocolError),
    /// A valid frame, but not an advert.
    #[error("not an advert")]
    NotAnAdvert,
    /// The advert is signed by a key other than the publishing peer's.
    #[error("signed by another peer's key")]
    SignerMismatch,
    /// The peer table refused the advert.
    #[error(transparent)]
    Advert(#[from] AdvertRejection),
}

/// Checks one gossiped frame from `source`: a valid advert, signed by the peer that
/// published it, accepted into `table` at unix time `now`. Returns what changed and the
/// signer's key.
pub fn check_gossip(
    table: &mut PeerTable,
    data: &[u8],
    source: Option<PeerId>,
    now: u64,
) -> Result<(Accepted, PublicKey), GossipRejection> {
    let signed = match decode_frame::<Message>(data)? {
        (Message::Advert(signed), _) => signed,
        _ => return Err(GossipRejection::NotAnAdvert),
    };
    if source.is_none() || peer_id_of(&signed.signer) != source {
        return Err(GossipRejection::SignerMismatch);
    }
    Ok((table.accept(&signed, now)?, signed.signer))
}

//! Finding a pool by its id in the wider DHT: a coordinator announces itself in Kademlia as
//! a provider of its pool's key, and a node that knows only the pool's id (and any peer of
//! the DHT) asks for the key's providers and dials them. A private pool's gate admits only
//! peers whose certificates its key signed, so a stranger announcing itself under a private
//! pool's key is refused at the first connection.

use crate::swarm::PoolBehaviour;
use libp2p::{kad, PeerId, Swarm};

/// The DHT key a pool's coordinators announce themselves under: named by the pool's tag
/// (a public pool's name, a private pool's id), so pools never mix.
pub fn pool_key(tag: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/potluck/pool/{tag}"))
}

/// Announces this peer as a coordinator of `tag`'s pool to the DHT peers it knows (again
/// when its addresses change, so a coordinator restarted elsewhere is found there).
pub fn announce(swarm: &mut Swarm<PoolBehaviour>, tag: &str) {
    if let Err(e) = swarm.behaviour_mut().kad.start_providing(pool_key(tag)) {
        tracing::warn!("announcing the pool in the DHT: {e}");
    }
}

/// Asks the DHT for the coordinators of `tag`'s pool; answers arrive as [`providers`].
pub fn look_up(swarm: &mut Swarm<PoolBehaviour>, tag: &str) {
    swarm.behaviour_mut().kad.get_providers(pool_key(tag));
}

/// The coordinators a DHT answer names for `tag`'s pool, other than `me`.
pub fn providers(event: &kad::Event, tag: &str, me: &PeerId) -> Vec<PeerId> {
    match event {
        kad::Event::OutboundQueryProgressed {
            result:
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    key,
                    providers,
                })),
            ..
        } if *key == pool_key(tag) => providers.iter().filter(|p| *p != me).copied().collect(),
        _ => Vec::new(),
    }
}

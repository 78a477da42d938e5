//! How many sessions a pool runs at once when its operator does not say: as many as the KV
//! caches its nodes can hold, sized the way each node sizes its own (the engine's one budget
//! formula), for sessions of a typical length. Replicas add their room; a pipeline is as roomy
//! as its tightest block.

use crate::planner::Plan;
use potluck_engine::kv_cache::{admission_bytes, stage_kv_budget};
use potluck_engine::weights::stage_weight_bytes;
use potluck_protocol::signed::PublicKey;

/// Positions a session is assumed to hold when the pool's session count is sized: a chat
/// prompt with its answer. Longer sessions still run; a node whose cache is full makes new
/// ones wait (it never cuts one short), so this only sets how many start at once.
pub const TYPICAL_SESSION_POSITIONS: u64 = 512;
/// The most sessions memory alone lets a pool start at once: past a few thousand, waiting
/// at the coordinator is cheaper than waiting in the nodes' queues.
pub const MAX_POOL_SESSIONS: usize = 4096;

/// The model's memory geometry, as capacity sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Decoder blocks.
    pub layers: u32,
    /// Weight bytes of one block.
    pub block_bytes: u64,
    /// Weight bytes of the embedding or LM head, which the first or last stage holds.
    pub edge_bytes: u64,
    /// KV bytes one position takes in one block.
    pub kv_bytes_per_block_position: u64,
}

/// Sessions the spans of `plan` can hold at once, each node offering what `memory` says
/// (its advert); `None` when some block has no span with a known node.
pub fn pool_sessions(
    plan: &Plan,
    geometry: &KvGeometry,
    memory: impl Fn(&PublicKey) -> Option<u64>,
) -> Option<usize> {
    let mut room = vec![0usize; geometry.layers as usize];
    for span in &plan.spans {
        let Some(bytes) = memory(&span.peer) else {
            continue;
        };
        let (start, end) = (span.range.start, span.range.end.min(geometry.layers));
        if start >= end {
            continue;
        }
        let blocks = u64::from(end - start);
        let weights = stage_weight_bytes(
            geometry.block_bytes,
            geometry.edge_bytes,
            start,
            end,
            geometry.layers,
        );
        let budget = stage_kv_budget(Some(bytes), weights) as u64;
        let per_session =
            (geometry.kv_bytes_per_block_position * blocks * TYPICAL_SESSION_POSITIONS).max(1);
        // The first session may fill the whole cache; others start while the rest of the
        // sessions hold no more than the admission share.
        let sessions = (admission_bytes(budget as usize) as u64 / per_session + 1) as usize;
        for r in room.iter_mut().take(end as usize).skip(start as usize) {
            *r = r.saturating_add(sessions);
        }
    }
    let tightest = room.into_iter().min()?;
    (tightest > 0).then_some(tightest.min(MAX_POOL_SESSIONS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Span;
    use potluck_protocol::messages::LayerRange;

    const MIB: u64 = 1 << 20;

    fn span(peer: u8, start: u32, end: u32) -> Span {
        Span {
            peer: PublicKey([peer; 32]),
            range: LayerRange { start, end },
        }
    }

    fn geometry() -> KvGeometry {
        // 1 MiB of KV per 512-position session per block.
        KvGeometry {
            layers: 4,
            block_bytes: 10 * MIB,
            edge_bytes: 20 * MIB,
            kv_bytes_per_block_position: 2048,
        }
    }

    #[test]
    fn sessions_follow_memory_replicas_add_and_the_tightest_block_limits() {
        let g = geometry();
        let plan = |spans| Plan { epoch: 1, spans };
        let memory = |m: Vec<(u8, u64)>| {
            move |k: &PublicKey| m.iter().find(|(p, _)| k.0[0] == *p).map(|(_, b)| *b)
        };
        // Whole model on one node with 32 + 80 (weights) + 400 MiB: 400 MiB of cache,
        // 300 of them for others, 4 MiB a session.
        let one = plan(vec![span(1, 0, 4)]);
        let mib = 32 + 80 + 400;
        assert_eq!(
            pool_sessions(&one, &g, memory(vec![(1, mib * MIB)])),
            Some(76)
        );
        // A replica with the same memory doubles it.
        let two = plan(vec![span(1, 0, 4), span(2, 0, 4)]);
        let both = memory(vec![(1, mib * MIB), (2, mib * MIB)]);
        assert_eq!(pool_sessions(&two, &g, both), Some(152));
        // A split: the tighter half decides.
        let split = plan(vec![span(1, 0, 2), span(2, 2, 4)]);
        let roomy = 32 + 40 + 400;
        let tight = 32 + 40 + 100;
        let sessions = pool_sessions(&split, &g, memory(vec![(1, roomy * MIB), (2, tight * MIB)]));
        assert_eq!(sessions, Some(75 / 2 + 1));
        // A block nobody known holds: no answer rather than a wrong one.
        assert_eq!(
            pool_sessions(&split, &g, memory(vec![(1, roomy * MIB)])),
            None
        );
        // More memory than the stage budget's cap counts as the cap.
        let huge = pool_sessions(&one, &g, memory(vec![(1, 1 << 40)]));
        assert_eq!(huge, Some((768 / 4 + 1) as usize));
    }
}

//! Who uses the pool and how much. API keys map to members: the operator's members file
//! (each with a weight, a rate limit, a daily token quota, reserved sessions and, in a
//! private pool, the member's certificate) or plain `--api-key` keys. Requests beyond a
//! member's rate or quota are refused (HTTP 429) while others are served, and sessions start
//! in weighted fair-share order: the waiting member that has used least for its weight goes
//! first, and credit its nodes earned raises its weight. Those decisions are the core's
//! ([`potluck_core::share`]); this is the shell that holds keys, certificates and the
//! waiting sessions' channels.

use potluck_core::share::{FairShare, Terms};
use potluck_protocol::membership::Certificate;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::oneshot;

pub use potluck_core::share::{Limit, CREDIT_HALF};

/// Most members a pool lists.
pub const MAX_MEMBERS: usize = 10_000;

/// A member as the operator's members file describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// Shown on the dashboard.
    pub name: String,
    /// The bearer key the member's clients send.
    pub api_key: String,
    /// The member's certificate (`potluck pool invite`); a private pool serves the key only
    /// while it is valid, and credits earned by the key it names raise the member's weight.
    #[serde(default)]
    pub certificate: Option<String>,
    /// Share of the pool relative to other members.
    #[serde(default = "one")]
    pub weight: f64,
    /// Most API requests a minute (none: no limit).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most tokens (prompt and generated, and embedded) a UTC day (none: no quota).
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// Sessions held for this member: others never take the last ones.
    #[serde(default)]
    pub reserved_sessions: usize,
    /// Sees every member's name and usage in the dashboard's JSON (others see their own
    /// and the totals). A private pool's admin certificate does the same.
    #[serde(default)]
    pub admin: bool,
}

fn one() -> f64 {
    1.0
}

impl MemberSpec {
    /// A member with `key` and no limits, reservation or certificate.
    pub fn unlimited(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            api_key: key.into(),
            certificate: None,
            weight: 1.0,
            requests_per_minute: None,
            tokens_per_day: None,
            reserved_sessions: 0,
            admin: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersFile {
    members: Vec<MemberSpec>,
}

/// Reads a members file: `{"members": [{"name": ..., "api_key": ..., ...}]}`.
pub fn parse_members(text: &str) -> Result<Vec<MemberSpec>, String> {
    let file: MembersFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(file.members)
}

/// A member's place in the registry; [`MemberId::POOL`] is everyone without a key (an open
/// API, or the pool's own requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemberId(pub usize);

impl MemberId {
    /// Requests without a key.
    pub const POOL: MemberId = MemberId(0);
}

struct Member {
    spec: MemberSpec,
    certificate: Option<Certificate>,
}

/// The members, their usage, and the sessions they share.
pub struct Share {
    members: Vec<Member>,
    by_key: HashMap<[u8; 32], MemberId>,
    inner: Mutex<FairShare<oneshot::Sender<()>>>,
}

fn digest(key: &str) -> [u8; 32] {
    *blake3::hash(key.trim().as_bytes()).as_bytes()
}

impl Share {
    /// Members from `specs` and one member per plain key in `keys`, sharing `sessions`
    /// sessions; an error names what is wrong with the list.
    pub fn new(specs: Vec<MemberSpec>, keys: &[String], sessions: usize) -> Result<Self, String> {
        let sessions = sessions.max(1);
        let mut members = vec![Member {
            spec: MemberSpec::unlimited("(no key)", ""),
            certificate: None,
        }];
        for (i, key) in keys.iter().enumerate() {
            members.push(Member {
                spec: MemberSpec::unlimited(format!("key {}", i + 1), key.clone()),
                certificate: None,
            });
        }
        if specs.len() > MAX_MEMBERS {
            return Err(format!("over {MAX_MEMBERS} members"));
        }
        for spec in specs {
            let name = &spec.name;
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(format!(
                    "member name {name:?}: 1 to 64 printable characters"
                ));
            }
            if !(spec.weight.is_finite() && spec.weight > 0.0 && spec.weight <= 1000.0) {
                return Err(format!(
                    "member {name}: weight must be above 0 and at most 1000"
                ));
            }
            if spec.requests_per_minute == Some(0) || spec.tokens_per_day == Some(0) {
                return Err(format!(
                    "member {name}: limits must be at least 1 (leave them out for none)"
                ));
            }
            let certificate = spec
                .certificate
                .as_deref()
                .map(Certificate::from_text)
                .transpose()
                .map_err(|e| format!("member {name}: {e}"))?;
            members.push(Member { spec, certificate });
        }
        let mut by_key = HashMap::new();
        for (i, m) in members.iter().enumerate().skip(1) {
            if m.spec.api_key.trim().len() < 8 {
                return Err(format!(
                    "{}: API keys must be at least 8 characters",
                    m.spec.name
                ));
            }
            if by_key
                .insert(digest(&m.spec.api_key), MemberId(i))
                .is_some()
            {
                return Err(format!("{}: the API key is listed twice", m.spec.name));
            }
        }
        let mut names = std::collections::HashSet::new();
        if !members
            .iter()
            .skip(1)
            .all(|m| names.insert(m.spec.name.as_str()))
        {
            return Err("member names must differ".into());
        }
        let reserved: usize = members.iter().map(|m| m.spec.reserved_sessions).sum();
        if reserved >= sessions {
            return Err(format!(
                "members reserve {reserved} sessions; the pool runs {sessions} at once (--max-sessions), and one must stay free for others"
            ));
        }
        let terms = members
            .iter()
            .map(|m| Terms {
                name: m.spec.name.clone(),
                weight: m.spec.weight,
                requests_per_minute: m.spec.requests_per_minute,
                tokens_per_day: m.spec.tokens_per_day,
                reserved_sessions: m.spec.reserved_sessions,
            })
            .collect();
        Ok(Self {
            members,
            by_key,
            inner: Mutex::new(FairShare::new(terms, sessions)),
        })
    }

    fn inner(&self) -> MutexGuard<'_, FairShare<oneshot::Sender<()>>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether clients must send a key.
    pub fn requires_key(&self) -> bool {
        self.members.len() > 1
    }

    /// The member a presented bearer key belongs to. Keys are looked up by digest, so how
    /// long the lookup takes says nothing usable about the keys themselves.
    pub fn member_for_key(&self, key: &str) -> Option<MemberId> {
        self.by_key.get(&digest(key)).copied()
    }

    /// A member's name.
    pub fn name(&self, m: MemberId) -> &str {
        self.members.get(m.0).map_or("?", |x| x.spec.name.as_str())
    }

    /// Whether the members file makes `m` an admin.
    pub fn is_admin(&self, m: MemberId) -> bool {
        self.members.get(m.0).is_some_and(|x| x.spec.admin)
    }

    /// The certificate a member's key is tied to, if any.
    pub fn certificate(&self, m: MemberId) -> Option<&Certificate> {
        self.members.get(m.0)?.certificate.as_ref()
    }

    /// Counts one request by `m` at unix time `now`, unless it is over its rate or quota.
    pub fn admit(&self, m: MemberId, now: u64) -> Result<(), Limit> {
        self.inner().admit(m.0, Instant::now(), now)
    }

    /// Charges `tokens` used by `m` at unix time `now` to its quota and fair share.
    pub fn record(&self, m: MemberId, tokens: u64, now: u64) {
        self.inner().record(m.0, tokens, now);
    }

    /// Sets the tokens each member's node was credited with, from credits keyed by peer id
    /// (a member's node is the peer whose key its certificate names).
    pub fn set_credits(&self, by_peer: &HashMap<String, f64>) {
        let mut inner = self.inner();
        for (i, m) in self.members.iter().enumerate() {
            let credited = m
                .certificate
                .as_ref()
                .and_then(|c| potluck_net::swarm::peer_id_of(&c.body.member))
                .and_then(|p| by_peer.get(&p.to_string()))
                .copied()
                .unwrap_or(0.0);
            inner.set_credited(i, credited);
        }
    }

    /// Waits for a session slot for `m`, in fair-share order; the slot frees when dropped.
    pub async fn acquire(self: &Arc<Self>, m: MemberId) -> Slot {
        let m = MemberId(m.0.min(self.members.len() - 1));
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.inner();
            inner.enqueue(m.0, tx);
            dispatch(&mut inner);
        }
        let mut pending = Pending {
            share: self.clone(),
            member: m,
            rx: Some(rx),
        };
        if let Some(rx) = pending.rx.as_mut() {
            // The sender lives in the queue until it is granted; a dropped sender cannot
            // happen while the share lives, and then the slot is moot.
            let _ = rx.await;
        }
        pending.rx = None;
        Slot {
            share: self.clone(),
            member: m,
        }
    }

    fn release(&self, m: MemberId) {
        let mut inner = self.inner();
        inner.release(m.0);
        dispatch(&mut inner);
    }

    /// Lets `sessions` run at once from now on (at least one more than members reserve);
    /// waiters start at once if that frees slots, and running sessions are never cut short
    /// when it shrinks. Returns the number applied.
    pub fn resize(&self, sessions: usize) -> usize {
        let mut inner = self.inner();
        let applied = inner.resize(sessions);
        dispatch(&mut inner);
        applied
    }

    /// Sessions that may run at once now.
    pub fn sessions(&self) -> usize {
        self.inner().limit()
    }

    /// Each member's use, for the dashboard.
    pub fn usage(&self, now: u64) -> Vec<MemberUsage> {
        let mut inner = self.inner();
        let mut out = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let weight = inner.weight(i);
            let Some(u) = inner.usage(i, now) else {
                continue;
            };
            if i == 0 && u.requests == 0 && u.running + u.waiting == 0 {
                continue;
            }
            out.push(MemberUsage {
                name: m.spec.name.clone(),
                weight,
                requests: u.requests,
                tokens: u.tokens,
                tokens_today: u.today,
                tokens_per_day: m.spec.tokens_per_day,
                requests_per_minute: m.spec.requests_per_minute,
                limited: u.limited,
                running: u.running,
                waiting: u.waiting,
                reserved_sessions: m.spec.reserved_sessions,
                credited_tokens: u.credited,
            });
        }
        out
    }
}

/// Hands free slots to waiting sessions in the core's order; a waiter that went away takes
/// none.
fn dispatch(inner: &mut FairShare<oneshot::Sender<()>>) {
    inner.dispatch(|tx| !tx.is_closed(), |tx| tx.send(()).is_ok());
}

/// One member's use of the pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberUsage {
    /// Who.
    pub name: String,
    /// Its weight now, credit included.
    pub weight: f64,
    /// Requests served or queued since the coordinator started.
    pub requests: u64,
    /// Tokens since the coordinator started.
    pub tokens: u64,
    /// Tokens this UTC day.
    pub tokens_today: u64,
    /// Its daily quota.
    pub tokens_per_day: Option<u64>,
    /// Its rate limit.
    pub requests_per_minute: Option<u32>,
    /// Requests refused for its rate or quota.
    pub limited: u64,
    /// Sessions running.
    pub running: usize,
    /// Sessions waiting for a slot.
    pub waiting: usize,
    /// Sessions held for it.
    pub reserved_sessions: usize,
    /// Tokens its nodes were credited with.
    pub credited_tokens: f64,
}

/// A session slot; freed when dropped.
pub struct Slot {
    share: Arc<Share>,
    member: MemberId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.share.release(self.member);
    }
}

/// A waiter's side of the queue: a slot granted to a waiter that went away is handed back.
struct Pending {
    share: Arc<Share>,
    member: MemberId,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.share.release(self.member);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(name: &str, weight: f64, reserved: usize) -> MemberSpec {
        MemberSpec {
            weight,
            reserved_sessions: reserved,
            ..MemberSpec::unlimited(name, format!("key-of-{name}"))
        }
    }

    #[test]
    fn keys_map_to_members_and_bad_lists_say_why() {
        let s = Share::new(vec![spec("alice", 1.0, 0)], &["plainkey1".into()], 4).unwrap();
        assert!(s.requires_key());
        let alice = s.member_for_key("key-of-alice").unwrap();
        assert_eq!(s.name(alice), "alice");
        assert_eq!(s.name(s.member_for_key(" plainkey1 ").unwrap()), "key 1");
        assert!(s.member_for_key("nobody's key").is_none());
        assert!(!Share::new(vec![], &[], 4).unwrap().requires_key());
        for (bad, why) in [
            (vec![spec("a", 0.0, 0)], "weight"),
            (vec![spec("a", 1.0, 4)], "reserve"),
            (vec![spec("a", 1.0, 0), spec("a", 1.0, 0)], "listed twice"),
            (vec![spec("", 1.0, 0)], "name"),
        ] {
            let e = Share::new(bad, &[], 4).err().unwrap();
            assert!(e.contains(why), "{e}");
        }
        let parsed = parse_members(
            r#"{"members":[{"name":"lab","api_key":"abcdefgh","weight":2,"tokens_per_day":10}]}"#,
        )
        .unwrap();
        assert_eq!(parsed[0].weight, 2.0);
        assert!(
            parse_members(r#"{"members":[{"name":"x","api_key":"abcdefgh","wieght":2}]}"#).is_err()
        );
    }

    #[test]
    fn rates_and_quotas_refuse_one_member_and_not_another() {
        let mut limited = spec("busy", 1.0, 0);
        limited.requests_per_minute = Some(2);
        let mut quota = spec("thrifty", 1.0, 0);
        quota.tokens_per_day = Some(100);
        let s = Share::new(vec![limited, quota, spec("free", 1.0, 0)], &[], 4).unwrap();
        let [busy, thrifty, free] = [1, 2, 3].map(MemberId);
        let now = 86_400 * 100 + 10;
        assert!(s.admit(busy, now).is_ok());
        assert!(s.admit(busy, now).is_ok());
        let e = s.admit(busy, now).unwrap_err();
        assert!(
            matches!(e, Limit::Rate { .. }) && e.retry_after() >= 1,
            "{e}"
        );
        assert!(s.admit(thrifty, now).is_ok());
        s.record(thrifty, 100, now);
        let e = s.admit(thrifty, now).unwrap_err();
        assert_eq!(e.retry_after(), 86_400 - 10);
        // The next day the quota is whole again.
        assert!(s.admit(thrifty, now + 86_400).is_ok());
        for _ in 0..50 {
            assert!(s.admit(free, now).is_ok());
        }
        let usage = s.usage(now + 86_400);
        let busy_row = usage.iter().find(|u| u.name == "busy").unwrap();
        assert_eq!((busy_row.requests, busy_row.limited), (2, 1));
    }

    /// Order in which queued sessions of members start, one slot at a time.
    async fn start_order(s: &Arc<Share>, queued: &[MemberId]) -> Vec<usize> {
        let hold = s.acquire(MemberId::POOL).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, m) in queued.iter().enumerate() {
            let (share, tx, m) = (s.clone(), tx.clone(), *m);
            tokio::spawn(async move {
                let slot = share.acquire(m).await;
                let _ = tx.send(m.0);
                share.record(m, 1000, 0);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            });
            // Queue them in this order.
            while s.inner().queued() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(hold);
        let mut order = Vec::new();
        while order.len() < queued.len() {
            order.push(rx.recv().await.unwrap());
        }
        order
    }

    #[tokio::test]
    async fn sessions_start_in_weighted_fair_order() {
        let s = Arc::new(Share::new(vec![spec("a", 1.0, 0), spec("b", 3.0, 0)], &[], 1).unwrap());
        let (a, b) = (MemberId(1), MemberId(2));
        // A queued eight sessions before B's four. First come first served would start B's
        // last session eleventh, equal shares eighth; B's triple weight starts it fifth.
        let mut queued = vec![a; 8];
        queued.extend([b; 4]);
        let order = start_order(&s, &queued).await;
        let last_b = order.iter().rposition(|&m| m == 2).unwrap();
        assert_eq!(last_b, 4, "{order:?}");
    }

    #[tokio::test]
    async fn reserved_sessions_stay_free_for_their_member() {
        let s = Arc::new(Share::new(vec![spec("a", 1.0, 0), spec("vip", 1.0, 1)], &[], 2).unwrap());
        let a1 = s.acquire(MemberId(1)).await;
        // The second slot is the VIP's: A waits for it even though it is free.
        let s2 = s.clone();
        let waiting = tokio::spawn(async move { s2.acquire(MemberId(1)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        let vip = tokio::time::timeout(Duration::from_secs(1), s.acquire(MemberId(2)))
            .await
            .unwrap();
        drop(a1);
        let a2 = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        drop((vip, a2));
        // A waiter that gives up hands its slot back.
        let hold = s.acquire(MemberId(2)).await;
        let hold2 = s.acquire(MemberId(1)).await;
        let s3 = s.clone();
        let gave_up = tokio::spawn(async move { s3.acquire(MemberId(1)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gave_up.abort();
        drop((hold, hold2));
        let again = tokio::time::timeout(Duration::from_secs(1), s.acquire(MemberId(1))).await;
        assert!(again.is_ok(), "a slot was lost to a waiter that left");
    }

    #[tokio::test]
    async fn resizing_starts_waiters_and_never_cuts_running_sessions() {
        let s = Arc::new(Share::new(vec![spec("a", 1.0, 0), spec("vip", 1.0, 1)], &[], 2).unwrap());
        // Never below one more than members reserve.
        assert_eq!(s.resize(0), 2);
        let first = s.acquire(MemberId(1)).await;
        let s2 = s.clone();
        let second = tokio::spawn(async move { s2.acquire(MemberId(1)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "the VIP's slot went to A");
        assert_eq!(s.resize(3), 3);
        let second = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("growing the pool did not start the waiter")
            .unwrap();
        // Shrinking below what runs leaves both running; the next waits for two to end.
        assert_eq!(s.resize(2), 2);
        let s3 = s.clone();
        let third = tokio::spawn(async move { s3.acquire(MemberId(1)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "A took the slot the VIP holds back");
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(1), third).await;
        assert!(third.is_ok(), "the waiter never started");
    }
}

//! Who uses the pool and how much, as decisions: whether a member's request is within its
//! rate and daily quota, and which waiting session takes a free slot. Sessions start in
//! weighted fair-share order: the waiting member that has used least for its weight goes
//! first, credit its nodes earned raises its weight, and slots a member reserves stay free
//! for it. The caller passes the time and holds the waiters (the daemon's are channels).

use std::collections::VecDeque;
use std::time::Instant;

/// Tokens a session is charged when it starts, before its real use is known, so that one
/// member's queued sessions interleave with others'.
pub const START_CHARGE: f64 = 64.0;

/// Credited tokens at which a member's weight is raised by half (it approaches double).
pub const CREDIT_HALF: f64 = 10_000.0;

/// What a member may use: its share and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    /// Who, for refusals.
    pub name: String,
    /// Share of the pool relative to other members.
    pub weight: f64,
    /// Most requests a minute (none: no limit).
    pub requests_per_minute: Option<u32>,
    /// Most tokens a UTC day (none: no quota).
    pub tokens_per_day: Option<u64>,
    /// Sessions held for this member: others never take the last ones.
    pub reserved_sessions: usize,
}

impl Terms {
    /// A member called `name` with weight 1 and no limits or reservation.
    pub fn unlimited(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            weight: 1.0,
            requests_per_minute: None,
            tokens_per_day: None,
            reserved_sessions: 0,
        }
    }
}

/// Why a request is not served now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Limit {
    /// Over the member's requests a minute.
    #[error(
        "{member} is over its limit of {per_minute} requests a minute; retry in {retry_after} s"
    )]
    Rate {
        /// Who.
        member: String,
        /// The limit.
        per_minute: u32,
        /// Seconds until a request is allowed.
        retry_after: u64,
    },
    /// Over the member's tokens a day.
    #[error("{member} used its {per_day} tokens for today; the quota resets in {retry_after} s")]
    Quota {
        /// Who.
        member: String,
        /// The quota.
        per_day: u64,
        /// Seconds until the next UTC day.
        retry_after: u64,
    },
}

impl Limit {
    /// Seconds the client should wait.
    pub fn retry_after(&self) -> u64 {
        match self {
            Limit::Rate { retry_after, .. } | Limit::Quota { retry_after, .. } => *retry_after,
        }
    }
}

/// One member's use so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Requests the rate bucket holds now, and when it was last filled.
    bucket: f64,
    filled: Option<Instant>,
    /// The UTC day `today` counts.
    day: u64,
    /// Tokens this UTC day.
    pub today: u64,
    /// Requests admitted.
    pub requests: u64,
    /// Tokens used.
    pub tokens: u64,
    /// Requests refused for rate or quota.
    pub limited: u64,
    /// Sessions running.
    pub running: usize,
    /// Sessions waiting for a slot.
    pub waiting: usize,
    /// Tokens used, for fair-share order (lifted to the least active member's when the
    /// member returns from idle, so idleness banks no priority).
    fair: f64,
    /// Tokens its nodes were credited with.
    pub credited: f64,
}

impl Usage {
    fn roll_day(&mut self, unix: u64) {
        let day = unix / 86_400;
        if self.day != day {
            self.day = day;
            self.today = 0;
        }
    }
}

/// The members' terms and use, and the sessions they wait for: waiters of type `W`,
/// granted in fair-share order.
#[derive(Debug)]
pub struct FairShare<W> {
    terms: Vec<Terms>,
    usage: Vec<Usage>,
    /// Sessions that may run at once now.
    limit: usize,
    queue: VecDeque<(usize, W)>,
    /// The fewest sessions the pool runs: one more than members reserve.
    floor: usize,
}

impl<W> FairShare<W> {
    /// Members `terms` (by index) sharing `sessions` sessions, never fewer than one more
    /// than they reserve.
    pub fn new(terms: Vec<Terms>, sessions: usize) -> Self {
        let floor = terms.iter().map(|t| t.reserved_sessions).sum::<usize>() + 1;
        Self {
            usage: terms.iter().map(|_| Usage::default()).collect(),
            terms,
            limit: sessions.max(floor),
            queue: VecDeque::new(),
            floor,
        }
    }

    /// Members listed.
    pub fn members(&self) -> usize {
        self.terms.len()
    }

    /// Member `m`'s terms.
    pub fn terms(&self, m: usize) -> Option<&Terms> {
        self.terms.get(m)
    }

    /// Member `m`'s use, its day rolled to unix time `unix`.
    pub fn usage(&mut self, m: usize, unix: u64) -> Option<&Usage> {
        let u = self.usage.get_mut(m)?;
        u.roll_day(unix);
        Some(u)
    }

    /// Counts one request by `m` at `now` (unix time `unix`), unless it is over its rate or
    /// quota.
    pub fn admit(&mut self, m: usize, now: Instant, unix: u64) -> Result<(), Limit> {
        let (Some(terms), Some(u)) = (self.terms.get(m), self.usage.get_mut(m)) else {
            return Ok(());
        };
        u.roll_day(unix);
        if let Some(per_day) = terms.tokens_per_day.filter(|q| u.today >= *q) {
            u.limited += 1;
            return Err(Limit::Quota {
                member: terms.name.clone(),
                per_day,
                retry_after: 86_400 - unix % 86_400,
            });
        }
        if let Some(per_minute) = terms.requests_per_minute {
            let cap = f64::from(per_minute);
            let refill = u.filled.map_or(cap, |t| {
                now.saturating_duration_since(t).as_secs_f64() * cap / 60.0
            });
            u.bucket = (u.bucket + refill).min(cap);
            u.filled = Some(now);
            if u.bucket < 1.0 {
                u.limited += 1;
                let wait = ((1.0 - u.bucket) * 60.0 / cap).ceil() as u64;
                return Err(Limit::Rate {
                    member: terms.name.clone(),
                    per_minute,
                    retry_after: wait.max(1),
                });
            }
            u.bucket -= 1.0;
        }
        u.requests += 1;
        Ok(())
    }

    /// Charges `tokens` used by `m` at unix time `unix` to its quota and fair share.
    pub fn record(&mut self, m: usize, tokens: u64, unix: u64) {
        if let Some(u) = self.usage.get_mut(m) {
            u.roll_day(unix);
            u.today = u.today.saturating_add(tokens);
            u.tokens = u.tokens.saturating_add(tokens);
            u.fair += tokens as f64;
        }
    }

    /// Sets the tokens member `m`'s nodes were credited with.
    pub fn set_credited(&mut self, m: usize, tokens: f64) {
        if let Some(u) = self.usage.get_mut(m) {
            u.credited = tokens;
        }
    }

    /// Member `m`'s weight now, credit included.
    pub fn weight(&self, m: usize) -> f64 {
        let base = self.terms.get(m).map_or(1.0, |t| t.weight);
        let credited = self.usage.get(m).map_or(0.0, |u| u.credited);
        base * (1.0 + credited / (credited + CREDIT_HALF))
    }

    /// Queues `waiter`, a session of member `m` (out of range: the last member).
    pub fn enqueue(&mut self, m: usize, waiter: W) {
        let m = m.min(self.terms.len().saturating_sub(1));
        let lowest = self
            .usage
            .iter()
            .filter(|u| u.running + u.waiting > 0)
            .map(|u| u.fair)
            .fold(f64::INFINITY, f64::min);
        if let Some(u) = self.usage.get_mut(m) {
            if u.running + u.waiting == 0 && lowest.is_finite() {
                u.fair = u.fair.max(lowest);
            }
            u.waiting += 1;
        }
        self.queue.push_back((m, waiter));
    }

    /// Sessions queued.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Grants free slots to waiters: among members that may take a slot (their reserve is
    /// not used up, or slots are left beyond others' unused reserves), the one with the
    /// least use for its weight, first come first served within a member. Waiters `open`
    /// calls gone leave the queue; `hand` gives a slot to a waiter and says whether it took
    /// it (one that went away meanwhile did not).
    pub fn dispatch(&mut self, open: impl Fn(&W) -> bool, mut hand: impl FnMut(W) -> bool) {
        let running: usize = self.usage.iter().map(|u| u.running).sum();
        let mut free = self.limit.saturating_sub(running);
        let usage = &mut self.usage;
        self.queue.retain(|(m, w)| {
            let keep = open(w);
            if let (false, Some(u)) = (keep, usage.get_mut(*m)) {
                u.waiting = u.waiting.saturating_sub(1);
            }
            keep
        });
        while free > 0 {
            let Some(i) = self.best(free) else {
                return;
            };
            let Some((m, w)) = self.queue.remove(i) else {
                return;
            };
            let taken = hand(w);
            if let Some(u) = self.usage.get_mut(m) {
                u.waiting = u.waiting.saturating_sub(1);
                if taken {
                    u.running += 1;
                    u.fair += START_CHARGE;
                }
            }
            if taken {
                free -= 1;
            }
        }
    }

    /// The queue position of the waiter to grant one of `free` slots to.
    fn best(&self, free: usize) -> Option<usize> {
        // Slots member `m` holds back and does not use now.
        let unused = |m: usize| -> usize {
            let reserved = self.terms.get(m).map_or(0, |t| t.reserved_sessions);
            reserved.saturating_sub(self.usage.get(m).map_or(0, |u| u.running))
        };
        let held_back: usize = (0..self.terms.len()).map(unused).sum();
        let mut best: Option<(usize, f64)> = None;
        for (i, (m, _)) in self.queue.iter().enumerate() {
            let Some(u) = self.usage.get(*m) else {
                continue;
            };
            // Its own reserve, or slots beyond what others hold back.
            if unused(*m) == 0 && free <= held_back {
                continue;
            }
            let score = u.fair / self.weight(*m);
            if best.is_none_or(|(_, s)| score < s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }

    /// A session of `m` ended; its slot is free (call [`Self::dispatch`] to hand it on).
    pub fn release(&mut self, m: usize) {
        if let Some(u) = self.usage.get_mut(m) {
            u.running = u.running.saturating_sub(1);
        }
    }

    /// Lets `sessions` run at once from now on (at least one more than members reserve);
    /// running sessions are never cut short when it shrinks. Returns the number applied.
    pub fn resize(&mut self, sessions: usize) -> usize {
        self.limit = sessions.max(self.floor);
        self.limit
    }

    /// Sessions that may run at once now.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(name: &str, weight: f64, reserved: usize) -> Terms {
        Terms {
            weight,
            reserved_sessions: reserved,
            ..Terms::unlimited(name)
        }
    }

    /// Grants what is free, each waiter taking its slot; the members granted, in order.
    fn grant(s: &mut FairShare<usize>) -> Vec<usize> {
        let mut out = Vec::new();
        s.dispatch(
            |_| true,
            |w| {
                out.push(w);
                true
            },
        );
        out
    }

    #[test]
    fn the_least_used_for_its_weight_goes_first() {
        let mut s = FairShare::new(vec![terms("a", 1.0, 0), terms("b", 3.0, 0)], 1);
        for _ in 0..8 {
            s.enqueue(0, 0);
        }
        for _ in 0..4 {
            s.enqueue(1, 1);
        }
        let mut order = Vec::new();
        while s.queued() > 0 {
            let granted = grant(&mut s);
            assert_eq!(granted.len(), 1);
            s.record(granted[0], 1000, 0);
            s.release(granted[0]);
            order.extend(granted);
        }
        // First come first served would start B's last session twelfth, equal shares
        // eighth; B's triple weight starts three of B's in the first four after A's first,
        // and its last sixth (at a tie, A queued first).
        assert_eq!(order, [0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn reserves_hold_and_gone_waiters_give_back() {
        let mut s = FairShare::new(vec![terms("a", 1.0, 0), terms("vip", 1.0, 1)], 2);
        assert_eq!(s.resize(0), 2);
        s.enqueue(0, 0);
        s.enqueue(0, 0);
        // One slot for A; the second is the VIP's.
        assert_eq!(grant(&mut s), vec![0]);
        s.enqueue(1, 1);
        assert_eq!(grant(&mut s), vec![1]);
        // A waiter that went away takes nothing.
        s.release(0);
        s.dispatch(|_| false, |_| panic!("granted a waiter that left"));
        assert_eq!(s.queued(), 0);
        s.enqueue(0, 7);
        s.dispatch(|_| true, |_| false);
        s.enqueue(0, 8);
        assert_eq!(grant(&mut s), vec![8], "a refused slot was lost");
    }

    #[test]
    fn rates_and_quotas_are_per_member_and_per_day() {
        let mut busy = terms("busy", 1.0, 0);
        busy.requests_per_minute = Some(2);
        let mut thrifty = terms("thrifty", 1.0, 0);
        thrifty.tokens_per_day = Some(100);
        let mut s: FairShare<()> = FairShare::new(vec![busy, thrifty], 4);
        let (t, unix) = (Instant::now(), 86_400 * 100 + 10);
        assert!(s.admit(0, t, unix).is_ok() && s.admit(0, t, unix).is_ok());
        assert!(matches!(s.admit(0, t, unix), Err(Limit::Rate { .. })));
        // Half a minute refills one request.
        let later = t + std::time::Duration::from_secs(30);
        assert!(s.admit(0, later, unix).is_ok());
        s.record(1, 100, unix);
        assert_eq!(
            s.admit(1, t, unix).map_err(|e| e.retry_after()),
            Err(86_390)
        );
        assert!(s.admit(1, t, unix + 86_400).is_ok());
    }
}

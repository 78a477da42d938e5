//! Machines coming and going as the scenario's availability says, and what the coordinator
//! hears of it: adverts, goodbyes, connections closing, assignments loaded.

use crate::clock::{secs, SECOND};
use crate::events::Event;
use crate::run::Sim;
use potluck_protocol::messages::ShardAssignment;

impl Sim {
    /// Machine `i` starts its node.
    pub(crate) fn on(&mut self, i: usize) {
        if self.machines[i].online || self.machines[i].retired {
            return;
        }
        let a = self.sc.availability.clone();
        let m = &mut self.machines[i];
        m.online = true;
        m.joined.get_or_insert(self.now);
        m.inc += 1;
        m.holds = None;
        let inc = m.inc;
        let idle_only = m.idle_only;
        let on = a.on_hours.sample(&mut self.avail);
        let crash = self.avail.chance(a.crash_share);
        self.q.at(
            self.now + secs(on * 3600.0),
            Event::Off {
                peer: i,
                inc,
                crash,
                back: true,
            },
        );
        if idle_only && a.pauses_per_hour > 0.0 {
            let wait = self.avail.exponential(3600.0 / a.pauses_per_hour);
            self.q
                .at(self.now + secs(wait), Event::Pause { peer: i, inc });
        }
        self.advert(i, inc, true);
    }

    /// Machine `i`'s run `inc` ends: a crash says nothing; a leave says goodbye first.
    pub(crate) fn off(&mut self, i: usize, inc: u32, crash: bool, back: bool) {
        let back_in = back.then(|| self.sc.availability.off_hours.sample(&mut self.avail) * 3600.0);
        self.stop(i, inc, crash, back_in);
    }

    /// An idle-only machine's owner is back: its node pauses (a goodbye) and resumes when
    /// the machine is idle again.
    pub(crate) fn pause(&mut self, i: usize, inc: u32) {
        let minutes = self.sc.availability.pause_minutes.sample(&mut self.avail);
        self.stop(i, inc, false, Some(minutes * 60.0));
    }

    fn stop(&mut self, i: usize, inc: u32, crash: bool, back_in_s: Option<f64>) {
        let m = &mut self.machines[i];
        if !m.online || m.inc != inc {
            return;
        }
        m.online = false;
        m.holds = None;
        let key = m.key;
        let riding: Vec<usize> = m.sessions.iter().copied().collect();
        let detect = crash.then(|| secs(self.sc.availability.crash_detect_s));
        if let Some(detect) = detect {
            self.q.at(self.now + detect, Event::Closed { peer: i, inc });
        } else {
            self.decide("leave", |c, now| {
                c.leaving(&key, "the node is stopping", now)
            });
        }
        // Sessions find out at their next step: at once for a goodbye (the pool excludes
        // the peer before the step goes out), when the connection closes for a crash.
        for s in riding {
            self.broken(s, i, detect);
        }
        if let Some(back) = back_in_s {
            if !self.machines[i].retired {
                self.q
                    .at(self.now + secs(back).max(SECOND), Event::On { peer: i });
            }
        }
    }

    /// Machine `i`'s node sends an advert (`again`: and schedules its next).
    pub(crate) fn advert(&mut self, i: usize, inc: u32, again: bool) {
        let m = &self.machines[i];
        if !m.online || m.inc != inc {
            return;
        }
        let key = m.key;
        let advert = self.advert_of(i);
        let unix = self.t().unix;
        let kind = if self.core.knows(&key) {
            "advert"
        } else {
            "join"
        };
        let accepted = self.decide(kind, |c, now| {
            let accepted = c.table_mut().admit(key, advert, unix);
            if let Ok(a) = accepted {
                c.admitted(key, a, now);
            }
            accepted
        });
        if let Err(e) = accepted {
            *self.refused.entry(e.to_string()).or_default() += 1;
        } else if !self.core.alive(&key, self.t().at) {
            // A new connection is pinged at once.
            self.ping(i);
        }
        if again {
            let next = self.now + self.sc.advert_interval_s * SECOND;
            self.q.at(next, Event::Advert { peer: i, inc });
        }
    }

    /// The coordinator sees crashed machine `i`'s connection close.
    pub(crate) fn closed(&mut self, i: usize, inc: u32) {
        let m = &self.machines[i];
        if m.online && m.inc != inc {
            // It is already back under a new run: the old connection's close is old news.
            return;
        }
        let key = m.key;
        self.decide("crash", |c, now| {
            c.pinged(key, false, now.at);
            c.unreachable(&key, "its connection closed", now);
        });
    }

    /// Machine `i` finished loading `assignment` (or failed to: it went away meanwhile).
    pub(crate) fn loaded(&mut self, i: usize, inc: u32, assignment: ShardAssignment) {
        let m = &mut self.machines[i];
        let key = m.key;
        let ok = m.online && m.inc == inc;
        if ok {
            m.holds = Some(assignment.layers);
        }
        let outcome = if ok {
            Ok(())
        } else {
            Err("the node went away".to_string())
        };
        self.decide("assigned", |c, now| {
            c.assigned(key, &assignment, outcome, ok, now.at)
        });
        if ok {
            // The node advertises what it now holds.
            let inc = self.machines[i].inc;
            self.advert(i, inc, false);
        }
    }
}

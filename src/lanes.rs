//! Lanes: an org's application users, each with its own token and its own
//! governor (its own Dataverse budget: Dataverse counts its limits per user
//! and web server), and which lane a request takes.
//!
//! A request takes the allowed lane with the most room: a lane whose gate
//! is open and that grants a slot at once, tried in order of free slots;
//! when none does, it waits in the queue of the lane with the most room
//! (or, when every gate is closed, of the one that reopens first). A lane
//! whose credential fails is out of rotation until its token provider has
//! a token again; the others keep serving. A caller's own cap
//! (`max_concurrency`) holds across the lanes of the org.
//!
//! Written here: routing over several budgets with per-lane fair queues is
//! this proxy's own policy; no crate offers it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::governor::fair::Caps;
use crate::governor::{Flow, Governor, GovernorError, Permit};
use crate::token::TokenProvider;

/// One lane: an application user's token and budget.
pub struct Lane {
    /// The credential's name (`[credentials.NAME]`; `default` for `[credential]`).
    pub name: Arc<str>,
    pub token: TokenProvider,
    pub governor: Governor,
    /// Out of rotation as last seen (a change is logged once).
    out: AtomicBool,
}

impl Lane {
    pub fn new(name: &str, token: TokenProvider, governor: Governor) -> Self {
        Self {
            name: name.into(),
            token,
            governor,
            out: AtomicBool::new(false),
        }
    }
}

/// Which lanes a request may take: bit `i` for lane `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneSet(u64);

impl LaneSet {
    /// Every lane.
    pub const ALL: Self = Self(u64::MAX);

    fn has(self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }

    /// Whether this is every lane (no pin).
    pub fn is_all(self) -> bool {
        self == Self::ALL
    }

    /// One bit per lane.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// The set without lane `i`.
    pub fn without(self, i: usize) -> Self {
        Self(self.0 & !(1u64 << i.min(63)))
    }
}

/// The lanes of one org. Without `lanes` in the config, one lane: the
/// org's credential.
pub struct Lanes {
    org: String,
    lanes: Box<[Lane]>,
    /// Callers' caps across the lanes (with one lane, its governor's).
    caps: Caps,
    /// Requests that chose a lane and are taking its slot now: counted at
    /// once, so that a burst does not see the same lane as the emptiest.
    choosing: Box<[AtomicUsize]>,
    /// Where ties start, turned at each choice (equal lanes take turns).
    turn: AtomicUsize,
}

impl Lanes {
    /// `lanes` must not be empty.
    pub fn new(org: &str, lanes: Vec<Lane>) -> Self {
        assert!(!lanes.is_empty(), "an org has at least one lane");
        Self {
            org: org.to_owned(),
            choosing: lanes.iter().map(|_| AtomicUsize::new(0)).collect(),
            lanes: lanes.into(),
            caps: Caps::default(),
            turn: AtomicUsize::new(0),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Lane> {
        self.lanes.iter()
    }

    pub fn get(&self, i: usize) -> &Lane {
        &self.lanes[i]
    }

    /// The first lane: the org's own credential.
    pub fn first(&self) -> &Lane {
        &self.lanes[0]
    }

    /// The lanes a caller pinned to `names` may take (no names: all);
    /// `None` when none of the names is a running lane of this org. That
    /// is a refusal, never a fall back onto the first lane: the pin says
    /// which application user's rights the caller may use.
    pub fn allowed(&self, names: &[String]) -> Option<LaneSet> {
        if names.is_empty() {
            return Some(LaneSet::ALL);
        }
        let mut set = 0u64;
        for (i, lane) in self.lanes.iter().enumerate().take(64) {
            if names.iter().any(|n| **n == *lane.name) {
                set |= 1 << i;
            }
        }
        (set != 0).then_some(LaneSet(set))
    }

    /// Whether lane `i` is in rotation; logs a change once.
    pub fn in_rotation(&self, i: usize) -> bool {
        let lane = &self.lanes[i];
        let usable = lane.token.usable_now();
        // `out` was the opposite of `!usable`: the lane just changed.
        if lane.out.swap(!usable, Ordering::Relaxed) == usable {
            if usable {
                tracing::info!(org = %self.org, lane = %lane.name, "lane back in rotation: its credential gets tokens again");
            } else {
                let reason = lane.token.failing_reason().unwrap_or_default();
                tracing::warn!(org = %self.org, lane = %lane.name, %reason, "lane out of rotation: its credential fails; the other lanes keep serving");
            }
        }
        usable
    }

    /// The lanes out of rotation, by name.
    pub fn out_of_rotation(&self) -> Vec<&str> {
        (0..self.lanes.len())
            .filter(|&i| !self.in_rotation(i))
            .map(|i| &*self.lanes[i].name)
            .collect()
    }

    /// Whether a lane of `allowed` other than `except` is in rotation with
    /// its gate open (a throttled request's replay can go there at once).
    pub fn another_open(&self, allowed: LaneSet, except: usize) -> bool {
        (0..self.lanes.len()).any(|i| {
            i != except
                && allowed.has(i)
                && self.lanes[i].governor.gate_closed_until().is_none()
                && self.in_rotation(i)
        })
    }

    /// A slot on one of `allowed` for `flow`: its lane's index and the
    /// permit. With one lane, that lane's governor decides alone.
    pub async fn acquire(
        &self,
        allowed: LaneSet,
        flow: &Flow,
    ) -> Result<(usize, Permit), GovernorError> {
        if self.lanes.len() == 1 {
            return Ok((0, self.lanes[0].governor.acquire_for(flow).await?));
        }
        let cap = self.cap(flow).await?;
        self.acquire_capped(allowed, flow, cap).await
    }

    /// A place under the caller's cap (`max_concurrency`) across the lanes,
    /// waited for at most the queue timeout.
    async fn cap(
        &self,
        flow: &Flow,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, GovernorError> {
        if flow.max_concurrency.is_none() {
            return Ok(None);
        }
        let timeout = self.first().governor.config().queue_timeout;
        tokio::time::timeout(timeout, self.caps.cap(flow))
            .await
            .map_err(|_| GovernorError::QueueTimeout {
                waited: timeout,
                retry_after: std::time::Duration::from_secs(1),
            })
    }

    /// [`Self::acquire`] with the caller's cap already in hand.
    async fn acquire_capped(
        &self,
        allowed: LaneSet,
        flow: &Flow,
        cap: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(usize, Permit), GovernorError> {
        // The cap is held here, across lanes, not by each lane's governor.
        let uncapped = Flow {
            max_concurrency: None,
            ..flow.clone()
        };
        let order = self.by_room(allowed);
        // Each try of a shared lane is a Redis round trip, and this
        // replica's count of its room is only its own: with shared state
        // the best lane alone is tried (its queue takes the request if it
        // is full), without it every lane in order (a try costs nothing).
        let tries = match self.first().governor.shared_state() {
            Some(true) => &order[..order.len().min(1)],
            _ => &order[..],
        };
        for &i in tries {
            let _choosing = Choosing::new(&self.choosing[i]);
            if let Some(permit) = self.lanes[i].governor.try_now(&uncapped).await {
                return Ok((i, permit.with_cap(cap)));
            }
        }
        let best = order.first().copied().unwrap_or(0);
        let _choosing = Choosing::new(&self.choosing[best]);
        let permit = self.lanes[best].governor.acquire_for(&uncapped).await?;
        Ok((best, permit.with_cap(cap)))
    }

    /// [`Self::acquire`] on `allowed` (the lanes whose credential failed
    /// for this request taken out), or `None` when none of them is in
    /// rotation. `cap` is the request's place under its caller's cap,
    /// taken from the slot it gave up: it moves with the request.
    pub async fn acquire_elsewhere(
        &self,
        allowed: LaneSet,
        flow: &Flow,
        cap: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Option<Result<(usize, Permit), GovernorError>> {
        let any = (0..self.lanes.len()).any(|i| allowed.has(i) && self.in_rotation(i));
        if !any {
            return None;
        }
        Some(self.acquire_capped(allowed, flow, cap).await)
    }

    /// The allowed lanes in rotation (all allowed ones when none is, so
    /// that the token error reaches the caller), open gates first by most
    /// room, then closed ones by the earliest reopening.
    fn by_room(&self, allowed: LaneSet) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.lanes.len())
            .filter(|&i| allowed.has(i) && self.in_rotation(i))
            .collect();
        if order.is_empty() {
            order = (0..self.lanes.len()).filter(|&i| allowed.has(i)).collect();
        }
        let n = self.lanes.len();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        order.sort_by_key(|&i| {
            let g = &self.lanes[i].governor;
            let room = g.room() - self.choosing[i].load(Ordering::Relaxed) as i64;
            let tie = (i + n - turn) % n;
            match g.gate_closed_until() {
                None => (0, std::cmp::Reverse(room), None, tie),
                Some(until) => (1, std::cmp::Reverse(0), Some(until), tie),
            }
        });
        order
    }
}

/// One request choosing a lane, counted until it holds a slot or gave up.
/// A request waiting in a lane's queue counts there too; it does so alike
/// on every lane, so the order between lanes holds.
struct Choosing<'a>(&'a AtomicUsize);

impl<'a> Choosing<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Choosing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.lanes.iter().map(|l| &*l.name).collect();
        f.debug_struct("Lanes")
            .field("org", &self.org)
            .field("lanes", &names)
            .finish()
    }
}

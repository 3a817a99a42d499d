//! Who waits next: a fair share of the org's slots among callers.
//!
//! When the slots are contended, callers waiting for one are served by
//! start-time fair queuing (Goyal et al., SFQ): each caller (a [`Flow`]:
//! the caller rule, the principal of a token caller, or the client address)
//! has a finish tag; a request entering the queue starts at
//! `max(virtual time, its flow's finish tag)` and moves that tag on by
//! `COST / weight`; the request with the smallest start tag goes first, and
//! the virtual time follows the start tags served. A greedy caller with 200
//! requests waiting thus runs ahead of the virtual time, and a caller with
//! two goes in ahead of it. Per-caller caps (`max_concurrency`) are a
//! semaphore per flow, taken before the queue, so a capped caller never
//! holds a place at its head.
//!
//! With the shared store, the queue decides which waiters are *heads*
//! (those that try the store for a slot): a few (each try is a round
//! trip), whose tickets Redis orders by the same tags across replicas
//! (`redis.rs`). A governor of this process only keeps its slots here
//! instead ([`FairQueue::with_slots`]): a slot given back goes straight to
//! the best-placed waiter, which wakes once and holds it. Nobody tries
//! twice, and the cost of a wait does not grow with the queue.
//!
//! Written here: tokio's semaphore is first-come first-served, and no crate
//! offers a weighted fair async queue.

use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::flow::Flow;
use super::store::{Ask, Gate, Lease, SlotStore, StoreFuture, TryAcquire};

/// A waiter's place: notified when it becomes a head (or, with slots
/// kept here, when it is given one).
#[derive(Debug, Default)]
struct Slot {
    head: AtomicBool,
    /// Its waiter left before its turn (set under the queue's lock).
    left: AtomicBool,
    wake: Notify,
}

/// A waiter in the heap, ordered by (start tag, arrival), smallest first.
#[derive(Debug)]
struct Waiting {
    start: u64,
    seq: u64,
    slot: Arc<Slot>,
}

impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.start, other.seq).cmp(&(self.start, self.seq))
    }
}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        (self.start, self.seq) == (other.start, other.seq)
    }
}

impl Eq for Waiting {}

/// The slots of a governor of this process only, kept with its queue.
#[derive(Debug)]
struct Slots {
    taken: usize,
    /// The limit in force, as the governor last set it.
    limit: usize,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct State {
    vtime: u64,
    finish: HashMap<Arc<str>, u64>,
    /// Waiters not yet heads, best first; entries whose waiter left are
    /// skipped when they come up (no map to look them up: one push and one
    /// pop per wait).
    heap: BinaryHeap<Waiting>,
    /// Waiters in the heap that have not left.
    waiting: usize,
    heads: usize,
    next: u64,
    /// `Some` when the slots are kept here (see the module comment).
    slots: Option<Slots>,
}

/// A flow's cap: its size, and the semaphore that keeps it.
type FlowCap = (usize, Arc<Semaphore>);

/// The fair queue of one org (per replica).
#[derive(Debug)]
pub struct FairQueue {
    state: Mutex<State>,
    max_heads: usize,
    caps: Caps,
    released: Notify,
}

/// Per-flow caps (`max_concurrency`): a semaphore per flow.
#[derive(Debug, Default)]
pub struct Caps(Mutex<HashMap<Arc<str>, FlowCap>>);

impl Caps {
    /// The flow's own cap, if it has one (waits for a place under it).
    pub async fn cap(&self, flow: &Flow) -> Option<OwnedSemaphorePermit> {
        let max = flow.max_concurrency?;
        let semaphore = {
            let mut caps = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if caps.len() > 1024 {
                // Flows with nothing in flight hold nothing worth keeping.
                caps.retain(|_, (m, s)| Arc::strong_count(s) > 1 || s.available_permits() < *m);
            }
            let entry = caps
                .entry(flow.key.clone())
                .or_insert_with(|| (max, Arc::new(Semaphore::new(max))));
            if entry.0 != max {
                // A reload changed the cap: new requests take the new one.
                *entry = (max, Arc::new(Semaphore::new(max)));
            }
            entry.1.clone()
        };
        semaphore.acquire_owned().await.ok()
    }
}

impl FairQueue {
    /// A queue letting `max_heads` waiters try for slots at once.
    pub fn new(max_heads: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_heads: max_heads.max(1),
            caps: Caps::default(),
            released: Notify::new(),
        }
    }

    /// A queue that keeps the slots itself, under `limit` (see
    /// [`Self::set_limit`]) while `gate` is open, and hands each one given
    /// back to the best-placed waiter.
    pub fn with_slots(limit: usize, gate: Arc<Gate>) -> Self {
        let queue = Self::new(1);
        queue.lock().slots = Some(Slots {
            taken: 0,
            limit,
            gate,
        });
        queue
    }

    /// The limit changed or the gate reopened: waiters get the slots now free.
    pub fn set_limit(&self, limit: usize) {
        let mut s = self.lock();
        if let Some(slots) = &mut s.slots {
            slots.limit = limit;
        }
        grant(&mut s);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The flow's own cap, if it has one (waits for a place under it).
    pub async fn cap(&self, flow: &Flow) -> Option<OwnedSemaphorePermit> {
        self.caps.cap(flow).await
    }

    /// Enters the queue; the place waits its turn with [`Place::turn`].
    pub fn enter(&self, flow: &Flow) -> Place<'_> {
        let slot = Arc::new(Slot::default());
        let mut s = self.lock();
        let vtime = s.vtime;
        let finish = s.finish.entry(flow.key.clone()).or_insert(0);
        let start = vtime.max(*finish);
        *finish = start + flow.cost();
        if s.finish.len() > 1024 && s.finish.len() > 4 * s.waiting {
            // A flow whose tag the virtual time has passed starts afresh anyway.
            s.finish.retain(|_, f| *f > vtime);
        }
        if s.heap.len() > 64 && s.heap.len() > 2 * s.waiting {
            // Waiters that left (timed out, their callers gone) take no room.
            s.heap.retain(|w| !w.slot.left.load(Ordering::Relaxed));
        }
        let seq = s.next;
        s.next += 1;
        s.waiting += 1;
        s.heap.push(Waiting {
            start,
            seq,
            slot: slot.clone(),
        });
        promote(&mut s, self.max_heads);
        drop(s);
        Place {
            queue: self,
            seq,
            slot,
            claimed: false,
        }
    }

    /// A slot kept here, if one is free, the gate open and nobody waiting.
    fn try_take(&self, limit: usize) -> bool {
        let mut s = self.lock();
        let nobody_waits = s.waiting == 0;
        let Some(slots) = &mut s.slots else {
            return false;
        };
        slots.limit = limit;
        let free = nobody_waits && slots.taken < limit && slots.gate.closed_until().is_none();
        slots.taken += usize::from(free);
        free
    }

    /// A slot kept here comes back: to the next waiter, if it may go.
    fn give_back(&self) {
        let mut s = self.lock();
        if let Some(slots) = &mut s.slots {
            slots.taken = slots.taken.saturating_sub(1);
        }
        grant(&mut s);
        drop(s);
        self.released.notify_one();
    }

    /// Waiters that are not heads yet.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

/// Makes the best-placed waiters heads while there is room (with the
/// slots kept here: gives them the free slots instead).
fn promote(s: &mut State, max_heads: usize) {
    if s.slots.is_some() {
        return grant(s);
    }
    while s.heads < max_heads {
        if !turn_next(s) {
            return;
        }
        s.heads += 1;
    }
}

/// Gives the best-placed waiters the slots free under the limit, while
/// the gate is open.
fn grant(s: &mut State) {
    while let Some(slots) = &s.slots
        && slots.taken < slots.limit
        && s.waiting > 0
        && slots.gate.closed_until().is_none()
    {
        if turn_next(s)
            && let Some(slots) = &mut s.slots
        {
            slots.taken += 1;
        }
    }
}

/// Wakes the best-placed waiter, if any (entries whose waiter left are
/// skipped); true if one was woken.
fn turn_next(s: &mut State) -> bool {
    while let Some(Waiting { start, slot, .. }) = s.heap.pop() {
        if slot.left.load(Ordering::Relaxed) {
            continue;
        }
        s.waiting -= 1;
        s.vtime = s.vtime.max(start);
        slot.head.store(true, Ordering::Release);
        slot.wake.notify_one();
        return true;
    }
    false
}

/// Slots kept with the queue, for a governor of this process only.
impl SlotStore for FairQueue {
    fn try_acquire(&self, ask: Ask<'_>) -> StoreFuture<'_, TryAcquire> {
        let answer = if self.try_take(ask.limit) {
            TryAcquire::Got {
                lease: Lease::Local,
                limit: ask.limit,
            }
        } else {
            TryAcquire::Full
        };
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn release(&self, _lease: Lease) {
        self.give_back();
    }

    fn released(&self) -> &Notify {
        &self.released
    }

    fn taken(&self) -> usize {
        self.lock().slots.as_ref().map_or(0, |s| s.taken)
    }
}

/// A waiter's place in the queue; leaving (drop) makes room for the next.
#[derive(Debug)]
pub struct Place<'a> {
    queue: &'a FairQueue,
    seq: u64,
    slot: Arc<Slot>,
    /// A slot given to this waiter is now the caller's (its permit's).
    claimed: bool,
}

impl Place<'_> {
    /// Resolves when this waiter is a head (with the slots kept here: when
    /// it holds one).
    pub async fn turn(&self) {
        loop {
            let woken = self.slot.wake.notified();
            if self.slot.head.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// This waiter's number (unique in the queue), for its ticket.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The slot this place was given goes to the caller's permit, which
    /// gives it back to the queue ([`SlotStore::release`]).
    pub fn claim(mut self) {
        self.claimed = self.slot.head.load(Ordering::Acquire);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut s = self.queue.lock();
        // Read under the lock: a grant (made under it) may have just come.
        let turned = self.slot.head.load(Ordering::Acquire);
        match (turned, s.slots.is_some()) {
            (false, _) => {
                self.slot.left.store(true, Ordering::Relaxed);
                s.waiting -= 1;
            }
            (true, false) => s.heads -= 1,
            // Given a slot but gone before taking it: it goes on.
            (true, true) if !self.claimed => {
                drop(s);
                return self.queue.give_back();
            }
            (true, true) => return,
        }
        promote(&mut s, self.queue.max_heads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(key: &str, weight: u32) -> Flow {
        Flow {
            key: Arc::from(key),
            weight,
            max_concurrency: None,
        }
    }

    /// The order in which waiters of `flows` (entered in this order) become
    /// heads, one at a time.
    fn order(q: &FairQueue, flows: &[Flow]) -> Vec<Arc<str>> {
        let mut places: Vec<(Arc<str>, Place<'_>)> =
            flows.iter().map(|f| (f.key.clone(), q.enter(f))).collect();
        let mut out = Vec::new();
        while !places.is_empty() {
            let i = places
                .iter()
                .position(|(_, p)| p.slot.head.load(Ordering::Acquire))
                .expect("one head");
            out.push(places.remove(i).0);
        }
        out
    }

    #[test]
    fn a_small_caller_goes_ahead_of_a_greedy_one_already_queued() {
        let q = FairQueue::new(1);
        let greedy = flow("greedy", 1);
        let small = flow("small", 1);
        let mut flows = vec![greedy.clone(); 20];
        flows.push(small.clone());
        flows.push(small);
        let order = order(&q, &flows);
        let first_small = order.iter().position(|k| &**k == "small").expect("served");
        assert!(
            first_small <= 2,
            "the small caller waited behind {first_small}: {order:?}"
        );
    }

    #[test]
    fn weights_share_the_slots_in_proportion() {
        let q = FairQueue::new(1);
        let (a, b) = (flow("a", 3), flow("b", 1));
        let mut flows = Vec::new();
        for _ in 0..30 {
            flows.push(a.clone());
            flows.push(b.clone());
        }
        let order = order(&q, &flows);
        let first_20 = &order[..20];
        let a_share = first_20.iter().filter(|k| &***k == "a").count();
        assert!(
            (14..=16).contains(&a_share),
            "a got {a_share} of 20: {order:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_makes_room_for_the_next() {
        let q = FairQueue::new(1);
        let f = flow("a", 1);
        let first = q.enter(&f);
        let second = q.enter(&f);
        first.turn().await;
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.turn())
            .await
            .expect("the second is a head now");
        let third = q.enter(&f);
        let fourth = q.enter(&f);
        drop(third); // left while waiting
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(1), fourth.turn())
            .await
            .expect("the fourth is a head now");
    }

    fn slots(limit: usize) -> FairQueue {
        FairQueue::with_slots(limit, Arc::new(Gate::default()))
    }

    #[test]
    fn a_slot_given_back_goes_to_the_best_placed_waiter_and_stays_taken() {
        let q = slots(1);
        assert!(q.try_take(1), "a free slot");
        assert!(!q.try_take(1), "the only slot is taken");
        let (greedy, small) = (flow("greedy", 1), flow("small", 1));
        let queued: Vec<_> = (0..5).map(|_| q.enter(&greedy)).collect();
        let small_place = q.enter(&small);
        assert!(queued.iter().all(|p| !p.slot.head.load(Ordering::Acquire)));
        q.give_back();
        assert_eq!(q.taken(), 1, "handed on, never free");
        let given: Vec<bool> = queued
            .iter()
            .map(|p| p.slot.head.load(Ordering::Acquire))
            .collect();
        assert_eq!(given, [true, false, false, false, false]);
        queued.into_iter().next().expect("first").claim();
        q.give_back();
        assert!(
            small_place.slot.head.load(Ordering::Acquire),
            "the small caller's one request goes ahead of the greedy queue"
        );
        assert!(!q.try_take(1), "no caller jumps the queue");
    }

    #[test]
    fn a_waiter_given_a_slot_that_leaves_hands_it_on() {
        let q = slots(1);
        assert!(q.try_take(1));
        let f = flow("a", 1);
        let (first, second) = (q.enter(&f), q.enter(&f));
        q.give_back();
        assert!(first.slot.head.load(Ordering::Acquire));
        drop(first); // its caller left before taking the slot
        assert!(second.slot.head.load(Ordering::Acquire));
        second.claim();
        assert_eq!(q.taken(), 1);
        q.give_back();
        assert_eq!(q.taken(), 0, "nobody waits: the slot is free");
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn waiters_that_left_take_no_room() {
        let q = slots(0);
        let f = flow("a", 1);
        let places: Vec<_> = (0..500).map(|_| q.enter(&f)).collect();
        drop(places); // all timed out
        assert_eq!(q.waiting(), 0);
        let _next = q.enter(&f);
        assert!(
            q.lock().heap.len() <= 1,
            "{} entries kept",
            q.lock().heap.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_gate_or_a_full_limit_holds_the_slots_back() {
        let gate = Arc::new(Gate::default());
        let q = FairQueue::with_slots(1, gate.clone());
        assert!(q.try_take(1));
        let waiter = q.enter(&flow("a", 1));
        gate.close(std::time::Duration::from_secs(2));
        q.give_back();
        assert!(!waiter.slot.head.load(Ordering::Acquire), "gate closed");
        assert_eq!(q.taken(), 0);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        q.set_limit(0);
        assert!(!waiter.slot.head.load(Ordering::Acquire), "no room");
        q.set_limit(1);
        assert!(waiter.slot.head.load(Ordering::Acquire), "reopened, room");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flow_cap_holds_its_requests_back() {
        let q = FairQueue::new(1);
        let capped = Flow {
            max_concurrency: Some(2),
            ..flow("capped", 1)
        };
        let a = q.cap(&capped).await;
        let b = q.cap(&capped).await;
        assert!(a.is_some() && b.is_some());
        let third = tokio::time::timeout(std::time::Duration::from_secs(1), q.cap(&capped)).await;
        assert!(third.is_err(), "the third waits for the cap");
        drop(a);
        assert!(q.cap(&capped).await.is_some());
        assert!(q.cap(&flow("free", 1)).await.is_none(), "no cap, no permit");
    }
}

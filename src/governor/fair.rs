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
//! The queue decides which waiters are *heads* (those that try the store
//! for a slot): one at a time with this process's store (it answers at
//! once), a few with the shared store (each try is a round trip), whose
//! tickets Redis orders by the same tags across replicas (`redis.rs`).
//!
//! Written here: tokio's semaphore is first-come first-served, and no crate
//! offers a weighted fair async queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A flow's cost per request at weight 1 (tags are integers).
pub const COST: u64 = 1000;

/// Who a request counts against, for the fair share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The caller rule's name, `rule/principal` for token callers, or
    /// `ip/ADDRESS` where no caller rule applies.
    pub key: Arc<str>,
    /// Share relative to other flows (1 by default).
    pub weight: u32,
    /// This flow's requests in flight at most, per replica.
    pub max_concurrency: Option<usize>,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            key: Arc::from("-"),
            weight: 1,
            max_concurrency: None,
        }
    }
}

impl Flow {
    /// The tag step of one request of this flow.
    pub fn cost(&self) -> u64 {
        COST / u64::from(self.weight.clamp(1, 1000))
    }
}

/// A waiter's place: notified when it becomes a head.
#[derive(Debug, Default)]
struct Slot {
    head: AtomicBool,
    wake: Notify,
}

#[derive(Debug, Default)]
struct State {
    vtime: u64,
    finish: HashMap<Arc<str>, u64>,
    /// Waiters not yet heads, by (start tag, arrival); entries whose waiter
    /// left are skipped when they come up.
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    waiting: HashMap<u64, Arc<Slot>>,
    heads: usize,
    next: u64,
}

/// A flow's cap: its size, and the semaphore that keeps it.
type FlowCap = (usize, Arc<Semaphore>);

/// The fair queue of one org (per replica).
#[derive(Debug)]
pub struct FairQueue {
    state: Mutex<State>,
    max_heads: usize,
    caps: Caps,
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
        }
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
        let start = s.vtime.max(s.finish.get(&flow.key).copied().unwrap_or(0));
        s.finish.insert(flow.key.clone(), start + flow.cost());
        if s.finish.len() > 1024 && s.finish.len() > 4 * s.waiting.len() {
            // A flow whose tag the virtual time has passed starts afresh anyway.
            let vtime = s.vtime;
            s.finish.retain(|_, f| *f > vtime);
        }
        let seq = s.next;
        s.next += 1;
        s.waiting.insert(seq, slot.clone());
        s.heap.push(Reverse((start, seq)));
        promote(&mut s, self.max_heads);
        drop(s);
        Place {
            queue: self,
            seq,
            slot,
        }
    }

    /// Waiters that are not heads yet.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// Makes the best-placed waiters heads while there is room.
fn promote(s: &mut State, max_heads: usize) {
    while s.heads < max_heads {
        let Some(Reverse((start, seq))) = s.heap.pop() else {
            return;
        };
        let Some(slot) = s.waiting.remove(&seq) else {
            continue;
        };
        s.heads += 1;
        s.vtime = s.vtime.max(start);
        slot.head.store(true, Ordering::Release);
        slot.wake.notify_one();
    }
}

/// A waiter's place in the queue; leaving (drop) makes room for the next.
#[derive(Debug)]
pub struct Place<'a> {
    queue: &'a FairQueue,
    seq: u64,
    slot: Arc<Slot>,
}

impl Place<'_> {
    /// Resolves when this waiter is a head.
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
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut s = self.queue.lock();
        if self.slot.head.load(Ordering::Acquire) {
            s.heads -= 1;
        } else {
            s.waiting.remove(&self.seq);
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

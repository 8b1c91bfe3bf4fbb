//! The agent's slot pool, shared by all its coordinator connections ("links").
//!
//! While slots are plentiful every link is offered all free slots. When more coordinators
//! have queued work than there are free slots, the free slots are offered round robin: to
//! the coordinators with demand that were served least recently, one each. An assignment
//! is accepted only within the link's offer, so a coordinator that is faster to assign
//! cannot starve the others; a declined assignment is simply requeued by its coordinator.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// Identifies one coordinator link (stable across reconnects of the same endpoint).
pub type LinkId = usize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LinkState {
    /// Queued jobs this coordinator has for us.
    demand: u32,
    /// Grant sequence number of the last slot this link got (0: never).
    served: u64,
}

/// The pool's state; every connection watches it to re-announce its offer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolState {
    pub total: u32,
    pub used: u32,
    pub draining: bool,
    links: BTreeMap<LinkId, LinkState>,
    grants: u64,
}

impl PoolState {
    pub fn free(&self) -> u32 {
        self.total.saturating_sub(self.used)
    }

    /// Free slots offered to `link` right now.
    pub fn offer(&self, link: LinkId) -> u32 {
        let free = self.free();
        if self.draining || free == 0 {
            return 0;
        }
        let mut demanders: Vec<(u64, LinkId)> = self
            .links
            .iter()
            .filter(|(_, state)| state.demand > 0)
            .map(|(id, state)| (state.served, *id))
            .collect();
        if demanders.len() <= free as usize {
            return free;
        }
        demanders.sort_unstable();
        let first = demanders
            .iter()
            .take(free as usize)
            .any(|(_, id)| *id == link);
        u32::from(first)
    }
}

#[derive(Debug, Clone)]
pub struct SlotPool {
    state: Arc<watch::Sender<PoolState>>,
}

/// One taken slot; dropping it frees the slot and notifies every connection.
#[derive(Debug)]
pub struct SlotLease {
    state: Arc<watch::Sender<PoolState>>,
}

impl SlotPool {
    pub fn new(total: u32) -> Self {
        let (state, _) = watch::channel(PoolState {
            total,
            ..PoolState::default()
        });
        Self {
            state: Arc::new(state),
        }
    }

    pub fn state(&self) -> PoolState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change, for announcing offers.
    pub fn subscribe(&self) -> watch::Receiver<PoolState> {
        self.state.subscribe()
    }

    /// Records how many jobs a coordinator has queued for us.
    pub fn set_demand(&self, link: LinkId, demand: u32) {
        self.state.send_if_modified(|state| {
            let entry = state.links.entry(link).or_default();
            std::mem::replace(&mut entry.demand, demand) != demand
        });
    }

    /// Takes a slot for `link` if its offer allows.
    pub fn try_acquire(&self, link: LinkId) -> Option<SlotLease> {
        let mut taken = false;
        self.state.send_if_modified(|state| {
            taken = state.offer(link) > 0;
            if taken {
                state.used += 1;
                state.grants += 1;
                let grant = state.grants;
                let entry = state.links.entry(link).or_default();
                entry.served = grant;
                entry.demand = entry.demand.saturating_sub(1);
            }
            taken
        });
        taken.then(|| SlotLease {
            state: Arc::clone(&self.state),
        })
    }

    pub fn set_draining(&self) {
        self.state
            .send_if_modified(|state| !std::mem::replace(&mut state.draining, true));
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.state
            .send_modify(|state| state.used = state.used.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_shared_and_returned() {
        let pool = SlotPool::new(1);
        let mut watcher = pool.subscribe();
        let lease = pool.try_acquire(0).expect("one slot");
        assert!(pool.try_acquire(1).is_none());
        assert!(watcher.has_changed().expect("open"));
        assert_eq!(watcher.borrow_and_update().free(), 0);
        drop(lease);
        assert_eq!(watcher.borrow_and_update().free(), 1);
        pool.set_draining();
        assert!(
            pool.try_acquire(0).is_none(),
            "a draining agent takes no work"
        );
        assert_eq!(pool.state().offer(0), 0);
    }

    #[test]
    fn plentiful_slots_are_offered_to_everyone() {
        let pool = SlotPool::new(4);
        pool.set_demand(0, 10);
        pool.set_demand(1, 10);
        assert_eq!(
            (
                pool.state().offer(0),
                pool.state().offer(1),
                pool.state().offer(2)
            ),
            (4, 4, 4)
        );
    }

    #[test]
    fn scarce_slots_go_round_robin_among_coordinators_with_demand() {
        let pool = SlotPool::new(1);
        pool.set_demand(0, 10);
        pool.set_demand(1, 10);
        pool.set_demand(2, 10);
        let mut order = Vec::new();
        for _ in 0..6 {
            let state = pool.state();
            let offered: Vec<LinkId> = (0..3).filter(|link| state.offer(*link) > 0).collect();
            assert_eq!(
                offered.len(),
                1,
                "exactly one coordinator is offered the one free slot"
            );
            // The others are declined even if they try.
            for other in (0..3).filter(|l| *l != offered[0]) {
                assert!(pool.try_acquire(other).is_none());
            }
            let lease = pool.try_acquire(offered[0]).expect("offered slot");
            order.push(offered[0]);
            drop(lease);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_coordinator_without_demand_gets_nothing_while_others_wait() {
        let pool = SlotPool::new(1);
        pool.set_demand(1, 3);
        pool.set_demand(2, 3);
        assert_eq!(pool.state().offer(0), 0);
        pool.set_demand(1, 0);
        pool.set_demand(2, 0);
        assert_eq!(pool.state().offer(0), 1);
    }
}

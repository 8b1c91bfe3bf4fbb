//! The agent's slot pool, shared by all its coordinator connections.

use std::sync::Arc;

use tokio::sync::watch;

/// What every connection announces to its coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    pub total: u32,
    pub free: u32,
    pub draining: bool,
}

#[derive(Debug, Clone)]
pub struct SlotPool {
    state: Arc<watch::Sender<SlotState>>,
}

/// One taken slot; dropping it frees the slot and notifies every connection.
#[derive(Debug)]
pub struct SlotLease {
    state: Arc<watch::Sender<SlotState>>,
}

impl SlotPool {
    pub fn new(total: u32) -> Self {
        let (state, _) = watch::channel(SlotState { total, free: total, draining: false });
        Self { state: Arc::new(state) }
    }

    pub fn state(&self) -> SlotState {
        *self.state.borrow()
    }

    /// A receiver that sees every change, for announcing free slots.
    pub fn subscribe(&self) -> watch::Receiver<SlotState> {
        self.state.subscribe()
    }

    /// Takes a slot if one is free and the agent is not draining.
    pub fn try_acquire(&self) -> Option<SlotLease> {
        let mut taken = false;
        self.state.send_if_modified(|state| {
            taken = state.free > 0 && !state.draining;
            if taken {
                state.free -= 1;
            }
            taken
        });
        taken.then(|| SlotLease { state: Arc::clone(&self.state) })
    }

    pub fn set_draining(&self) {
        self.state.send_if_modified(|state| !std::mem::replace(&mut state.draining, true));
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.state.send_modify(|state| state.free += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_shared_and_returned() {
        let pool = SlotPool::new(1);
        let mut watcher = pool.subscribe();
        let lease = pool.try_acquire().expect("one slot");
        assert!(pool.try_acquire().is_none());
        assert!(watcher.has_changed().expect("open"));
        assert_eq!(watcher.borrow_and_update().free, 0);
        drop(lease);
        assert_eq!(watcher.borrow_and_update().free, 1);
        pool.set_draining();
        assert!(pool.try_acquire().is_none(), "a draining agent takes no work");
    }
}

//! The agent's job table: the attempts every coordinator link has here, the slot pool they
//! share, and the results that still wait for their coordinator.
//!
//! It is a pure state machine (no I/O, no clocks, no locks): the connection code decides
//! *when* something happens, this table decides *what it means*. Keeping the pool and the
//! attempts in one place makes slot accounting exact: a slot is leased when an assignment
//! is admitted and freed only when its attempt has ended, so the number of used slots is
//! always the number of running attempts, whatever order frames and job ends arrive in.
//!
//! Jobs belong to the agent, not to a connection: when a link drops, its attempts keep
//! running and their results are held until the coordinator acknowledges them after it
//! reconnects. A result is only forgotten when its coordinator acknowledges or cancels it.
//!
//! Slot sharing: while slots are plentiful every link is offered all free slots. When more
//! coordinators have queued work than there are free slots, the free slots are offered round
//! robin: to the coordinators with demand that were served least recently, one each. An
//! assignment is accepted only within the link's offer, so a coordinator that is faster to
//! assign cannot starve the others; a declined assignment is simply requeued by its
//! coordinator.

use std::collections::BTreeMap;
use std::fmt;

use buildpool_core::bus::HeldAttempt;
use buildpool_core::{AttemptKey, Completion};

/// Identifies one coordinator link (stable across reconnects of the same endpoint).
pub type LinkId = usize;

/// Why an assignment was not taken (the coordinator requeues it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decline {
    Draining,
    /// The free slots are offered to other coordinators now.
    OfferedElsewhere,
    /// All slots are busy.
    Busy {
        total: u32,
    },
    MissingLabels(Vec<String>),
    /// The job does not fit in the disk budget beside the running ones.
    DiskBudget(String),
}

impl fmt::Display for Decline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decline::Draining => f.write_str("draining"),
            Decline::OfferedElsewhere => {
                f.write_str("the free slots are offered to other coordinators now")
            }
            Decline::Busy { total } => write!(f, "all {total} slots busy"),
            Decline::MissingLabels(labels) => write!(f, "missing labels {labels:?}"),
            Decline::DiskBudget(reason) => f.write_str(reason),
        }
    }
}

/// The answer to an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A slot is leased for the attempt: run it.
    Start,
    /// A duplicate assignment of an attempt that runs or holds a result here: ignore it.
    AlreadyKnown,
    Declined(Decline),
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelEffect {
    /// The attempt runs: the caller kills its process. The stop is asynchronous, so the
    /// attempt stays running (and keeps its slot) until its end, whose result (cancelled)
    /// is delivered as usual.
    Stop,
    /// The attempt had ended: its result, which nobody wants now, is dropped.
    Forgotten,
    Unknown,
}

/// What to do with a result when its attempt ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The link is connected: send the result now (it stays held until acknowledged).
    SendNow,
    /// The link is down: the result is sent after its next hello.
    Held,
    /// The attempt was not running (forgotten meanwhile, or a repeated end): nothing to send.
    Dropped,
}

/// One link's share of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LinkShare {
    /// Queued jobs this coordinator has for us.
    demand: u32,
    /// Grant sequence number of the last slot this link got (0: never), so the scarce free
    /// slots go to the coordinators served least recently.
    served: u64,
}

/// A snapshot of the pool, for announcing each link's offer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    pub total: u32,
    pub used: u32,
    pub draining: bool,
    shares: BTreeMap<LinkId, LinkShare>,
}

impl PoolView {
    pub fn free(&self) -> u32 {
        self.total.saturating_sub(self.used)
    }

    /// Jobs waiting at `link`'s coordinator that this agent could take: what it last said,
    /// less what this agent took since.
    pub fn demand(&self, link: LinkId) -> u32 {
        self.shares.get(&link).map_or(0, |share| share.demand)
    }

    /// Free slots offered to `link` right now.
    pub fn offer(&self, link: LinkId) -> u32 {
        let free = self.free();
        if self.draining || free == 0 {
            return 0;
        }
        let mut waiting: Vec<(u64, LinkId)> = self
            .shares
            .iter()
            .filter(|(_, share)| share.demand > 0)
            .map(|(id, share)| (share.served, *id))
            .collect();
        if waiting.len() <= free as usize {
            return free;
        }
        waiting.sort_unstable();
        let served_least_recently = waiting
            .iter()
            .take(free as usize)
            .any(|(_, id)| *id == link);
        u32::from(served_least_recently)
    }
}

/// Where one attempt stands.
#[derive(Debug)]
enum AttemptState {
    /// Its process or workspace may still be in use: it holds a slot.
    Running,
    /// It ended; the result is kept until the coordinator acknowledges or cancels it.
    Finished(Completion),
}

/// Everything the agent keeps about one coordinator, across reconnects.
#[derive(Debug, Default)]
struct LinkJobs {
    /// A connection finished its handshake and has not dropped since.
    connected: bool,
    /// Ordered, so hellos and re-sent results come in key order.
    attempts: BTreeMap<AttemptKey, AttemptState>,
}

/// The attempts of every link and the slot pool they share.
#[derive(Debug, Default)]
pub struct JobTable {
    pool: PoolView,
    /// Grants so far; the sequence number of the latest grant.
    grants: u64,
    links: BTreeMap<LinkId, LinkJobs>,
}

impl JobTable {
    pub fn new(slots: u32) -> Self {
        Self {
            pool: PoolView {
                total: slots,
                ..PoolView::default()
            },
            ..Self::default()
        }
    }

    /// A snapshot of the pool; every connection compares it with what it announced last.
    pub fn view(&self) -> PoolView {
        self.pool.clone()
    }

    /// Records how many jobs a coordinator has queued for us.
    pub fn set_demand(&mut self, link: LinkId, queued: u32) {
        self.pool.shares.entry(link).or_default().demand = queued;
    }

    /// From now on every offer is 0; running attempts finish and results are still delivered.
    pub fn set_draining(&mut self) {
        self.pool.draining = true;
    }

    /// Admits an assignment if it fits `link`'s offer.
    ///
    /// `refusal` is a reason the caller found not to run it (it knows the agent's labels
    /// and disk). A known attempt is recognised before anything else, so a coordinator
    /// that re-sends an assignment is never told to requeue an attempt that runs here.
    pub fn assign(&mut self, link: LinkId, key: AttemptKey, refusal: Option<Decline>) -> Admission {
        if self.attempt(link, key).is_some() {
            return Admission::AlreadyKnown;
        }
        if let Some(refusal) = refusal {
            return Admission::Declined(refusal);
        }
        if self.pool.offer(link) == 0 {
            return Admission::Declined(self.reason_for_no_offer());
        }
        self.pool.used += 1;
        self.grants += 1;
        let share = self.pool.shares.entry(link).or_default();
        share.served = self.grants;
        share.demand = share.demand.saturating_sub(1);
        self.links
            .entry(link)
            .or_default()
            .attempts
            .insert(key, AttemptState::Running);
        Admission::Start
    }

    /// The attempt's process and workspace are gone: free the slot, record the result.
    ///
    /// The slot is freed here and only here, so a slot is never free while its workspace is
    /// still in use. Only a running attempt frees a slot, so an end that arrives for an
    /// attempt that was forgotten or had ended already cannot free a slot twice.
    pub fn attempt_ended(
        &mut self,
        link: LinkId,
        key: AttemptKey,
        completion: Completion,
    ) -> Delivery {
        let Some(jobs) = self.links.get_mut(&link) else {
            return Delivery::Dropped;
        };
        match jobs.attempts.get_mut(&key) {
            Some(state @ AttemptState::Running) => {
                *state = AttemptState::Finished(completion);
                self.pool.used = self.pool.used.saturating_sub(1);
                if jobs.connected {
                    Delivery::SendNow
                } else {
                    Delivery::Held
                }
            }
            // The first end stands: its result may have been sent already.
            Some(AttemptState::Finished(_)) | None => Delivery::Dropped,
        }
    }

    /// The coordinator gave up on an attempt.
    pub fn cancel(&mut self, link: LinkId, key: AttemptKey) -> CancelEffect {
        let Some(jobs) = self.links.get_mut(&link) else {
            return CancelEffect::Unknown;
        };
        match jobs.attempts.get(&key) {
            Some(AttemptState::Running) => CancelEffect::Stop,
            Some(AttemptState::Finished(_)) => {
                jobs.attempts.remove(&key);
                CancelEffect::Forgotten
            }
            None => CancelEffect::Unknown,
        }
    }

    /// The coordinator has the result: forget the finished attempt.
    ///
    /// An ack of a running or unknown attempt is ignored: forgetting a running attempt would
    /// lose its slot accounting and its result.
    pub fn result_acked(&mut self, link: LinkId, key: AttemptKey) {
        if let Some(jobs) = self.links.get_mut(&link)
            && matches!(jobs.attempts.get(&key), Some(AttemptState::Finished(_)))
        {
            jobs.attempts.remove(&key);
        }
    }

    /// A connection of `link` finished its handshake: it is connected now.
    ///
    /// Returns the held results to send (finished attempts, in key order). They stay held
    /// until acknowledged, because this connection may drop before they arrive.
    pub fn link_up(&mut self, link: LinkId) -> Vec<(AttemptKey, Completion)> {
        let jobs = self.links.entry(link).or_default();
        jobs.connected = true;
        jobs.attempts
            .iter()
            .filter_map(|(key, state)| match state {
                AttemptState::Finished(completion) => Some((*key, completion.clone())),
                AttemptState::Running => None,
            })
            .collect()
    }

    /// The connection dropped. Its demand is void (it comes again with the next connection),
    /// so the free slots are not reserved for a coordinator that cannot take them; running
    /// attempts keep running and their ends are held.
    pub fn link_down(&mut self, link: LinkId) {
        if let Some(jobs) = self.links.get_mut(&link) {
            jobs.connected = false;
        }
        if let Some(share) = self.pool.shares.get_mut(&link) {
            share.demand = 0;
        }
    }

    /// Links whose connection finished its handshake and has not dropped since.
    pub fn connected_links(&self) -> usize {
        self.links.values().filter(|jobs| jobs.connected).count()
    }

    /// What to report in the next hello of `link` (running and finished-unacked attempts),
    /// in key order.
    pub fn held_attempts(&self, link: LinkId) -> Vec<HeldAttempt> {
        self.links.get(&link).map_or_else(Vec::new, |jobs| {
            jobs.attempts
                .iter()
                .map(|(key, state)| HeldAttempt {
                    key: *key,
                    finished: matches!(state, AttemptState::Finished(_)),
                })
                .collect()
        })
    }

    pub fn is_running(&self, link: LinkId, key: AttemptKey) -> bool {
        matches!(self.attempt(link, key), Some(AttemptState::Running))
    }

    /// No attempt is running and every result was acknowledged (drain is complete).
    pub fn is_idle(&self) -> bool {
        self.links.values().all(|jobs| jobs.attempts.is_empty())
    }

    /// Attempts running now, which is also the number of slots in use.
    pub fn running(&self) -> u32 {
        self.pool.used
    }

    fn attempt(&self, link: LinkId, key: AttemptKey) -> Option<&AttemptState> {
        self.links.get(&link)?.attempts.get(&key)
    }

    fn reason_for_no_offer(&self) -> Decline {
        if self.pool.draining {
            Decline::Draining
        } else if self.pool.free() > 0 {
            Decline::OfferedElsewhere
        } else {
            Decline::Busy {
                total: self.pool.total,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job_id: u64) -> AttemptKey {
        AttemptKey::new(job_id, 1)
    }

    fn result(text: &str) -> Completion {
        Completion::failed(text)
    }

    fn start(table: &mut JobTable, link: LinkId, key: AttemptKey) {
        assert_eq!(
            table.assign(link, key, None),
            Admission::Start,
            "link {link} {key}"
        );
    }

    #[test]
    fn slots_are_shared_and_returned() {
        let mut table = JobTable::new(1);
        start(&mut table, 0, key(1));
        assert_eq!(
            table.assign(1, key(2), None),
            Admission::Declined(Decline::Busy { total: 1 })
        );
        assert_eq!(table.view().free(), 0);
        table.attempt_ended(0, key(1), result("done"));
        assert_eq!(table.view().free(), 1);
        table.set_draining();
        assert_eq!(
            table.assign(0, key(3), None),
            Admission::Declined(Decline::Draining),
            "a draining agent takes no work"
        );
        assert_eq!(table.view().offer(0), 0);
    }

    #[test]
    fn plentiful_slots_are_offered_to_everyone() {
        let mut table = JobTable::new(4);
        table.set_demand(0, 10);
        table.set_demand(1, 10);
        let view = table.view();
        assert_eq!((view.offer(0), view.offer(1), view.offer(2)), (4, 4, 4));
    }

    #[test]
    fn scarce_slots_go_round_robin_among_coordinators_with_demand() {
        let mut table = JobTable::new(1);
        for link in 0..3 {
            table.set_demand(link, 10);
        }
        let mut order = Vec::new();
        for job_id in 0..6 {
            let view = table.view();
            let offered: Vec<LinkId> = (0..3).filter(|link| view.offer(*link) > 0).collect();
            assert_eq!(
                offered.len(),
                1,
                "exactly one coordinator is offered the one free slot"
            );
            // The others are declined even if they try.
            for other in (0..3).filter(|link| *link != offered[0]) {
                assert_eq!(
                    table.assign(other, key(job_id), None),
                    Admission::Declined(Decline::OfferedElsewhere)
                );
            }
            start(&mut table, offered[0], key(job_id));
            order.push(offered[0]);
            table.attempt_ended(offered[0], key(job_id), result("done"));
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_coordinator_without_demand_gets_nothing_while_others_wait() {
        let mut table = JobTable::new(1);
        table.set_demand(1, 3);
        table.set_demand(2, 3);
        assert_eq!(table.view().offer(0), 0);
        table.set_demand(1, 0);
        table.set_demand(2, 0);
        assert_eq!(table.view().offer(0), 1);
    }

    #[test]
    fn assignments_are_admitted_only_within_the_offer() {
        let mut table = JobTable::new(2);
        for link in 0..3 {
            table.set_demand(link, 10);
        }
        // Two free slots, three coordinators waiting: the two served least recently get one
        // each, ties broken by link id.
        let view = table.view();
        assert_eq!((view.offer(0), view.offer(1), view.offer(2)), (1, 1, 0));
        assert_eq!(
            table.assign(2, key(1), None),
            Admission::Declined(Decline::OfferedElsewhere)
        );
        start(&mut table, 0, key(1));
        let view = table.view();
        assert_eq!(view.shares[&0].demand, 9, "a grant consumes one demand");
        assert_eq!(view.shares[&0].served, 1);
        // One slot left: it goes to a coordinator not served yet, and link 0 must wait.
        assert_eq!((view.offer(0), view.offer(1), view.offer(2)), (0, 1, 0));
        assert_eq!(
            table.assign(0, key(2), None),
            Admission::Declined(Decline::OfferedElsewhere)
        );
        start(&mut table, 1, key(1));
        assert_eq!(
            table.assign(2, key(1), None),
            Admission::Declined(Decline::Busy { total: 2 })
        );
        assert_eq!(table.running(), 2);
        // A slot comes back: link 2 has waited longest.
        table.attempt_ended(0, key(1), result("done"));
        let view = table.view();
        assert_eq!((view.offer(0), view.offer(1), view.offer(2)), (0, 0, 1));
        start(&mut table, 2, key(1));
    }

    #[test]
    fn demand_never_drops_below_zero_when_a_link_assigns_without_announcing_it() {
        let mut table = JobTable::new(2);
        start(&mut table, 0, key(1));
        assert_eq!(table.view().shares[&0].demand, 0);
        assert_eq!(table.view().offer(0), 1);
    }

    #[test]
    fn decline_reasons_read_as_before() {
        assert_eq!(Decline::Draining.to_string(), "draining");
        assert_eq!(
            Decline::OfferedElsewhere.to_string(),
            "the free slots are offered to other coordinators now"
        );
        assert_eq!(Decline::Busy { total: 3 }.to_string(), "all 3 slots busy");
        assert_eq!(
            Decline::MissingLabels(vec!["gpu".into(), "arm".into()]).to_string(),
            r#"missing labels ["gpu", "arm"]"#
        );
    }

    #[test]
    fn a_repeated_assignment_of_a_held_attempt_is_already_known() {
        let mut table = JobTable::new(2);
        start(&mut table, 0, key(1));
        assert_eq!(table.assign(0, key(1), None), Admission::AlreadyKnown);
        table.set_draining();
        assert_eq!(
            table.assign(0, key(1), Some(Decline::MissingLabels(vec!["gpu".into()]))),
            Admission::AlreadyKnown,
            "a known attempt is recognised before labels and offer"
        );
        table.attempt_ended(0, key(1), result("done"));
        assert_eq!(
            table.assign(0, key(1), None),
            Admission::AlreadyKnown,
            "its result waits for acknowledgement"
        );
        assert_eq!(table.running(), 0, "a duplicate takes no slot");
        table.result_acked(0, key(1));
        assert_eq!(
            table.assign(0, key(1), None),
            Admission::Declined(Decline::Draining),
            "forgotten once acknowledged"
        );
    }

    #[test]
    fn missing_labels_are_declined_before_the_offer_is_checked() {
        let mut table = JobTable::new(1);
        start(&mut table, 0, key(1));
        assert_eq!(
            table.assign(1, key(1), Some(Decline::MissingLabels(vec!["gpu".into()]))),
            Admission::Declined(Decline::MissingLabels(vec!["gpu".into()]))
        );
        assert_eq!(table.running(), 1);
        assert!(table.held_attempts(1).is_empty());
    }

    #[test]
    fn the_same_attempt_key_on_two_links_is_two_attempts() {
        let mut table = JobTable::new(2);
        table.link_up(0);
        start(&mut table, 0, key(7));
        start(&mut table, 1, key(7));
        assert_eq!(
            table.attempt_ended(0, key(7), result("zero")),
            Delivery::SendNow
        );
        assert!(table.is_running(1, key(7)));
        assert_eq!(table.running(), 1);
        assert_eq!(table.cancel(1, key(7)), CancelEffect::Stop);
        assert_eq!(
            table.link_up(0),
            [(key(7), result("zero"))],
            "link 1's attempt is not link 0's"
        );
        table.result_acked(1, key(7));
        assert!(table.is_running(1, key(7)), "an ack of a running attempt");
        assert_eq!(
            table.attempt_ended(1, key(7), result("one")),
            Delivery::Held
        );
        assert_eq!(table.link_up(1), [(key(7), result("one"))]);
    }

    #[test]
    fn connected_links_count_handshakes_not_attempts() {
        let mut table = JobTable::new(2);
        // An attempt of a link that never finished a handshake makes no connection.
        start(&mut table, 0, key(1));
        assert_eq!(table.connected_links(), 0);
        table.link_up(0);
        table.link_up(1);
        table.link_up(1);
        assert_eq!(table.connected_links(), 2, "a reconnect is the same link");
        table.link_down(0);
        assert_eq!(table.connected_links(), 1);
        table.link_down(1);
        assert_eq!(table.connected_links(), 0);
    }

    #[test]
    fn a_result_is_sent_now_while_connected_and_held_until_acknowledged() {
        let mut table = JobTable::new(1);
        assert!(table.link_up(0).is_empty());
        start(&mut table, 0, key(1));
        assert_eq!(
            table.attempt_ended(0, key(1), result("done")),
            Delivery::SendNow
        );
        assert_eq!(
            table.held_attempts(0),
            [HeldAttempt {
                key: key(1),
                finished: true
            }]
        );
        assert!(!table.is_idle(), "sent is not acknowledged");
        table.result_acked(0, key(1));
        assert!(table.held_attempts(0).is_empty());
        assert!(table.is_idle());
    }

    #[test]
    fn results_are_held_while_disconnected_and_resent_on_every_link_up_until_acked() {
        let mut table = JobTable::new(2);
        // Never connected counts as disconnected.
        start(&mut table, 0, key(1));
        assert_eq!(
            table.attempt_ended(0, key(1), result("one")),
            Delivery::Held
        );
        assert_eq!(table.link_up(0), [(key(1), result("one"))]);
        start(&mut table, 0, key(2));
        start(&mut table, 0, key(3));
        table.link_down(0);
        assert!(table.is_running(0, key(2)), "jobs outlive their connection");
        assert_eq!(
            table.attempt_ended(0, key(3), result("three")),
            Delivery::Held
        );
        assert_eq!(
            table.held_attempts(0),
            [
                HeldAttempt {
                    key: key(1),
                    finished: true
                },
                HeldAttempt {
                    key: key(2),
                    finished: false
                },
                HeldAttempt {
                    key: key(3),
                    finished: true
                },
            ]
        );
        assert_eq!(
            table.link_up(0),
            [(key(1), result("one")), (key(3), result("three"))],
            "finished attempts, in key order"
        );
        table.result_acked(0, key(3));
        table.link_down(0);
        assert_eq!(
            table.link_up(0),
            [(key(1), result("one"))],
            "an unacknowledged result may have been lost with the connection"
        );
        table.result_acked(0, key(1));
        assert_eq!(
            table.attempt_ended(0, key(2), result("two")),
            Delivery::SendNow
        );
        table.result_acked(0, key(2));
        assert!(table.is_idle());
        assert!(table.link_up(0).is_empty());
    }

    #[test]
    fn a_dropped_link_loses_its_demand_but_not_its_turn() {
        let mut table = JobTable::new(1);
        table.link_up(0);
        table.link_up(1);
        table.set_demand(0, 5);
        table.set_demand(1, 5);
        start(&mut table, 0, key(1));
        table.attempt_ended(0, key(1), result("done"));
        table.link_down(1);
        assert_eq!(table.view().shares[&1].demand, 0);
        assert_eq!(
            table.view().offer(0),
            1,
            "the free slot is not reserved for a coordinator that cannot take it"
        );
        table.link_up(1);
        table.set_demand(1, 5);
        assert_eq!(
            (table.view().offer(0), table.view().offer(1)),
            (0, 1),
            "link 1 still waited longest"
        );
    }

    #[test]
    fn cancelling_a_running_attempt_stops_it_and_its_result_is_still_delivered() {
        let mut table = JobTable::new(1);
        table.link_up(0);
        start(&mut table, 0, key(1));
        assert_eq!(table.cancel(0, key(1)), CancelEffect::Stop);
        assert!(table.is_running(0, key(1)), "the stop is asynchronous");
        assert_eq!(
            table.held_attempts(0),
            [HeldAttempt {
                key: key(1),
                finished: false
            }]
        );
        assert_eq!(
            table.attempt_ended(0, key(1), result("cancelled")),
            Delivery::SendNow
        );
        assert_eq!(table.link_up(0), [(key(1), result("cancelled"))]);
    }

    #[test]
    fn cancelling_a_finished_attempt_forgets_its_result() {
        let mut table = JobTable::new(1);
        start(&mut table, 0, key(1));
        table.attempt_ended(0, key(1), result("done"));
        assert_eq!(table.cancel(0, key(1)), CancelEffect::Forgotten);
        assert!(table.held_attempts(0).is_empty());
        assert!(table.link_up(0).is_empty());
        assert!(table.is_idle());
        assert_eq!(table.cancel(0, key(1)), CancelEffect::Unknown);
        assert_eq!(table.cancel(5, key(1)), CancelEffect::Unknown);
    }

    #[test]
    fn a_slot_is_free_only_after_its_attempt_ended() {
        let mut table = JobTable::new(1);
        table.link_up(0);
        start(&mut table, 0, key(1));
        table.cancel(0, key(1));
        table.result_acked(0, key(1));
        table.link_down(0);
        assert_eq!(
            table.assign(1, key(1), None),
            Admission::Declined(Decline::Busy { total: 1 }),
            "cancel, ack and disconnect leave the workspace in use"
        );
        assert_eq!(
            table.attempt_ended(0, key(1), result("done")),
            Delivery::Held
        );
        start(&mut table, 1, key(1));
    }

    #[test]
    fn an_end_of_an_attempt_that_is_not_running_frees_nothing() {
        let mut table = JobTable::new(2);
        start(&mut table, 0, key(1));
        start(&mut table, 0, key(2));
        assert_eq!(
            table.attempt_ended(0, key(1), result("first")),
            Delivery::Held
        );
        assert_eq!(
            table.attempt_ended(0, key(1), result("second")),
            Delivery::Dropped
        );
        assert_eq!(
            table.attempt_ended(0, key(9), result("x")),
            Delivery::Dropped
        );
        assert_eq!(
            table.attempt_ended(3, key(2), result("x")),
            Delivery::Dropped
        );
        assert_eq!(table.running(), 1, "no slot is freed twice");
        assert_eq!(table.cancel(0, key(1)), CancelEffect::Forgotten);
        assert_eq!(
            table.attempt_ended(0, key(1), result("x")),
            Delivery::Dropped
        );
        assert_eq!(table.running(), 1);
        assert_eq!(table.view().used, 1);
        table.attempt_ended(0, key(2), result("done"));
        assert_eq!(table.running(), 0);
        assert_eq!(table.link_up(0), [(key(2), result("done"))]);
    }

    #[test]
    fn the_table_is_idle_once_nothing_runs_and_every_result_is_acknowledged() {
        let mut table = JobTable::new(1);
        assert!(table.is_idle());
        start(&mut table, 0, key(1));
        table.set_draining();
        assert!(!table.is_idle());
        table.attempt_ended(0, key(1), result("done"));
        assert!(!table.is_idle(), "the result waits for its coordinator");
        for (key, _) in table.link_up(0) {
            table.result_acked(0, key);
        }
        assert!(table.is_idle());
    }

    /// A small deterministic PRNG (xorshift64), so failures reproduce by seed.
    #[derive(Debug)]
    struct XorShift(u64);

    impl XorShift {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, bound: usize) -> usize {
            usize::try_from(self.next() % bound as u64).expect("below a usize")
        }

        fn percent(&mut self, chance: u64) -> bool {
            self.next() % 100 < chance
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
            (!items.is_empty()).then(|| items[self.below(items.len())])
        }
    }

    const LINKS: usize = 3;

    #[derive(Debug, Clone, PartialEq)]
    enum ModelAttempt {
        Running,
        Finished(Completion),
    }

    /// One coordinator as the test sees it: the truth about its attempts, and the results
    /// it actually received (only from the table's answers, and lost with the connection
    /// unless acknowledged).
    #[derive(Debug, Default)]
    struct ModelLink {
        connected: bool,
        attempts: BTreeMap<AttemptKey, ModelAttempt>,
        received: BTreeMap<AttemptKey, Completion>,
    }

    #[derive(Debug)]
    struct Simulation {
        table: JobTable,
        links: Vec<ModelLink>,
        rng: XorShift,
        ends: u64,
    }

    impl Simulation {
        fn new(seed: u64) -> Self {
            let slots = 1 + u32::try_from(seed % 4).expect("small");
            Self {
                table: JobTable::new(slots),
                links: (0..LINKS).map(|_| ModelLink::default()).collect(),
                rng: XorShift::new(seed),
                ends: 0,
            }
        }

        fn random_key(&mut self) -> AttemptKey {
            let job_id = self.rng.below(6) as u64;
            let attempt = 1 + u32::try_from(self.rng.below(2)).expect("small");
            AttemptKey::new(job_id, attempt)
        }

        fn attempts_where(
            &self,
            wanted: impl Fn(&ModelLink, &ModelAttempt) -> bool,
        ) -> Vec<(LinkId, AttemptKey)> {
            self.links
                .iter()
                .enumerate()
                .flat_map(|(link, model)| {
                    model
                        .attempts
                        .iter()
                        .filter(|(_, attempt)| wanted(model, attempt))
                        .map(move |(key, _)| (link, *key))
                })
                .collect()
        }

        fn running_attempts(&self) -> Vec<(LinkId, AttemptKey)> {
            self.attempts_where(|_, attempt| *attempt == ModelAttempt::Running)
        }

        fn step(&mut self) {
            match self.rng.below(100) {
                0..25 => self.assign(),
                25..45 => {
                    let running = self.running_attempts();
                    if let Some((link, key)) = self.rng.pick(&running) {
                        self.end(link, key);
                    }
                }
                45..50 => self.end_not_running(),
                50..58 => self.cancel(),
                58..72 => self.ack(),
                72..80 => {
                    let link = self.rng.below(LINKS);
                    self.link_up(link);
                }
                80..87 => {
                    let link = self.rng.below(LINKS);
                    self.link_down(link);
                }
                _ => {
                    let link = self.rng.below(LINKS);
                    if self.links[link].connected {
                        let queued = u32::try_from(self.rng.below(5)).expect("small");
                        self.table.set_demand(link, queued);
                    }
                }
            }
        }

        fn assign(&mut self) {
            let link = self.rng.below(LINKS);
            let key = self.random_key();
            let labels_missing = if self.rng.percent(5) {
                vec!["gpu".to_owned()]
            } else {
                Vec::new()
            };
            let view = self.table.view();
            let expected = if self.links[link].attempts.contains_key(&key) {
                Admission::AlreadyKnown
            } else if !labels_missing.is_empty() {
                Admission::Declined(Decline::MissingLabels(labels_missing.clone()))
            } else if view.offer(link) == 0 {
                Admission::Declined(if view.draining {
                    Decline::Draining
                } else if view.free() > 0 {
                    Decline::OfferedElsewhere
                } else {
                    Decline::Busy { total: view.total }
                })
            } else {
                Admission::Start
            };
            assert!(view.offer(link) <= view.free());
            assert_eq!(
                self.table.assign(
                    link,
                    key,
                    (!labels_missing.is_empty()).then_some(Decline::MissingLabels(labels_missing)),
                ),
                expected,
                "assign {key} on link {link}"
            );
            if expected == Admission::Start {
                self.links[link].attempts.insert(key, ModelAttempt::Running);
            }
        }

        fn end(&mut self, link: LinkId, key: AttemptKey) {
            self.ends += 1;
            let completion = Completion::failed(format!("end {}", self.ends));
            let delivery = self.table.attempt_ended(link, key, completion.clone());
            let model = &mut self.links[link];
            if model.connected {
                assert_eq!(delivery, Delivery::SendNow, "end {key} on link {link}");
                model.received.insert(key, completion.clone());
            } else {
                assert_eq!(delivery, Delivery::Held, "end {key} on link {link}");
            }
            model
                .attempts
                .insert(key, ModelAttempt::Finished(completion));
        }

        /// An end the table must ignore: for a forgotten, finished or never seen attempt.
        fn end_not_running(&mut self) {
            let link = self.rng.below(LINKS);
            let key = self.random_key();
            if self.links[link].attempts.get(&key) == Some(&ModelAttempt::Running) {
                return;
            }
            let used = self.table.view().used;
            assert_eq!(
                self.table
                    .attempt_ended(link, key, Completion::failed("spurious")),
                Delivery::Dropped
            );
            assert_eq!(self.table.view().used, used, "no slot is freed twice");
        }

        fn cancel(&mut self) {
            let known = self.attempts_where(|_, _| true);
            let (link, key) = match self.rng.pick(&known) {
                Some(attempt) if self.rng.percent(80) => attempt,
                _ => (self.rng.below(LINKS), self.random_key()),
            };
            let model = &mut self.links[link];
            let expected = match model.attempts.get(&key) {
                Some(ModelAttempt::Running) => CancelEffect::Stop,
                Some(ModelAttempt::Finished(_)) => {
                    model.attempts.remove(&key);
                    model.received.remove(&key);
                    CancelEffect::Forgotten
                }
                None => CancelEffect::Unknown,
            };
            assert_eq!(
                self.table.cancel(link, key),
                expected,
                "cancel {key} on link {link}"
            );
        }

        /// A connected coordinator acknowledges a result it received; now and then it acks
        /// something else, which the table must ignore.
        fn ack(&mut self) {
            let receipts: Vec<(LinkId, AttemptKey)> = self
                .links
                .iter()
                .enumerate()
                .filter(|(_, model)| model.connected)
                .flat_map(|(link, model)| model.received.keys().map(move |key| (link, *key)))
                .collect();
            if let Some((link, key)) = self.rng.pick(&receipts)
                && self.rng.percent(85)
            {
                let model = &mut self.links[link];
                let completion = model.received.remove(&key).expect("picked from received");
                assert_eq!(
                    model.attempts.remove(&key),
                    Some(ModelAttempt::Finished(completion)),
                    "an ack only ever arrives for a result delivered as it ended"
                );
                self.table.result_acked(link, key);
                return;
            }
            let link = self.rng.below(LINKS);
            let key = self.random_key();
            if !matches!(
                self.links[link].attempts.get(&key),
                Some(ModelAttempt::Finished(_))
            ) {
                self.table.result_acked(link, key);
            }
        }

        fn link_up(&mut self, link: LinkId) {
            let resent = self.table.link_up(link);
            let model = &mut self.links[link];
            let expected: Vec<(AttemptKey, Completion)> = model
                .attempts
                .iter()
                .filter_map(|(key, attempt)| match attempt {
                    ModelAttempt::Finished(completion) => Some((*key, completion.clone())),
                    ModelAttempt::Running => None,
                })
                .collect();
            assert_eq!(resent, expected, "results re-sent on link {link} up");
            model.connected = true;
            model.received.extend(resent);
        }

        fn link_down(&mut self, link: LinkId) {
            self.table.link_down(link);
            let model = &mut self.links[link];
            model.connected = false;
            // Whatever was in flight may be lost with the connection.
            model.received.clear();
            assert_eq!(
                self.table.view().shares.get(&link).map_or(0, |s| s.demand),
                0
            );
        }

        fn check_invariants(&self) {
            let view = self.table.view();
            let running = self.running_attempts().len();
            assert_eq!(self.table.running() as usize, running, "running count");
            assert_eq!(
                view.used as usize, running,
                "used slots are running attempts"
            );
            assert!(view.used <= view.total, "{view:?}");
            for (link, model) in self.links.iter().enumerate() {
                let expected: Vec<HeldAttempt> = model
                    .attempts
                    .iter()
                    .map(|(key, attempt)| HeldAttempt {
                        key: *key,
                        finished: matches!(attempt, ModelAttempt::Finished(_)),
                    })
                    .collect();
                assert_eq!(self.table.held_attempts(link), expected, "link {link}");
                for (key, attempt) in &model.attempts {
                    assert_eq!(
                        self.table.is_running(link, *key),
                        *attempt == ModelAttempt::Running
                    );
                    // No result is lost: a connected coordinator has received every result
                    // of its link (a disconnected one gets them all on its next link up,
                    // which the table still holds as checked above).
                    if let ModelAttempt::Finished(completion) = attempt
                        && model.connected
                    {
                        assert_eq!(
                            model.received.get(key),
                            Some(completion),
                            "link {link} {key} ended but was never delivered"
                        );
                    }
                }
            }
            let idle = self.links.iter().all(|model| model.attempts.is_empty());
            assert_eq!(self.table.is_idle(), idle);
        }

        /// Ends every running attempt, connects every link and acknowledges every result.
        fn finish(&mut self) {
            for (link, key) in self.running_attempts() {
                self.end(link, key);
            }
            for link in 0..LINKS {
                if !self.links[link].connected {
                    self.link_up(link);
                }
            }
            self.check_invariants();
            for (link, model) in self.links.iter_mut().enumerate() {
                for (key, completion) in std::mem::take(&mut model.received) {
                    assert_eq!(
                        model.attempts.remove(&key),
                        Some(ModelAttempt::Finished(completion))
                    );
                    self.table.result_acked(link, key);
                }
                assert!(
                    model.attempts.is_empty(),
                    "link {link}: undelivered results"
                );
            }
            self.check_invariants();
            assert!(self.table.is_idle());
            assert_eq!(self.table.running(), 0);
        }
    }

    /// Names the seed of a failing run, so it can be replayed alone.
    #[derive(Debug)]
    struct SeedReport(u64);

    impl Drop for SeedReport {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("failing seed: {}", self.0);
            }
        }
    }

    #[test]
    fn random_interleavings_keep_the_invariants_and_lose_no_result() {
        for seed in 0..500 {
            let _report = SeedReport(seed);
            let mut simulation = Simulation::new(seed);
            for step in 0..200 {
                if seed % 4 == 0 && step == 150 {
                    simulation.table.set_draining();
                }
                simulation.step();
                simulation.check_invariants();
            }
            simulation.finish();
        }
    }
}

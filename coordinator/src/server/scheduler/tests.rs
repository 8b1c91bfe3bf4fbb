use super::*;
use buildpool_proto::JobKind;

fn registration(agent_id: &str, slots: u32, local: bool) -> AgentRegistration {
    AgentRegistration {
        agent_id: agent_id.to_owned(),
        labels: vec!["linux".to_owned()],
        system: "x86_64-linux".to_owned(),
        slots_total: slots,
        slots_free: slots,
        draining: false,
        local,
        address: String::new(),
        connected_at_unix_ms: 0,
    }
}

fn spec() -> JobSpec {
    JobSpec { kind: JobKind::Build as i32, ..JobSpec::default() }
}

fn submit(scheduler: &mut Scheduler, job_id: JobId, now: Instant) -> Vec<Action> {
    scheduler.submit(job_id, spec(), Source::default(), String::new(), now, 0)
}

fn assigns(actions: &[Action]) -> Vec<(ConnId, JobId, u32)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Assign { conn, job_id, attempt, .. } => Some((*conn, *job_id, *attempt)),
            _ => None,
        })
        .collect()
}

fn finished(actions: &[Action]) -> Vec<(JobId, JobResult)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Event { job_id, event: JobEvent::Finished(result) } => Some((*job_id, result.clone())),
            _ => None,
        })
        .collect()
}

fn exited(code: i32) -> Completion {
    Completion { outcome: Outcome::Exited as i32, exit_code: Some(code), ..Completion::default() }
}

#[test]
fn a_job_waits_for_an_agent_and_says_why() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    let actions = submit(&mut scheduler, 1, now);
    assert_eq!(actions, vec![Action::Event {
        job_id: 1,
        event: JobEvent::Queued { position: 0, reason: "no agents connected".into() },
    }]);
    let actions = scheduler.agent_connected(10, registration("a", 2, false), now);
    assert_eq!(assigns(&actions), [(10, 1, 1)]);
}

#[test]
fn the_local_agent_runs_jobs_only_while_no_agent_is_connected() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("local", 2, true), now);
    assert_eq!(assigns(&submit(&mut scheduler, 1, now)), [(1, 1, 1)]);
    assert!(scheduler.local_busy());
    scheduler.agent_connected(2, registration("remote", 1, false), now);
    assert_eq!(assigns(&submit(&mut scheduler, 2, now)), [(2, 2, 1)]);
    // The remote agent is busy, but connected: the next job waits for it.
    let queued = submit(&mut scheduler, 3, now);
    assert!(assigns(&queued).is_empty());
    assert!(matches!(&queued[0], Action::Event { event: JobEvent::Queued { reason, .. }, .. } if reason.contains("busy")));
}

#[test]
fn results_from_a_superseded_attempt_or_another_agent_are_dropped() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), now);
    scheduler.agent_connected(2, registration("b", 1, false), now);
    let first = assigns(&submit(&mut scheduler, 7, now));
    let (holder, _, attempt) = first[0];
    let other = if holder == 1 { 2 } else { 1 };
    assert!(scheduler.holds(holder, 7, attempt));
    assert!(!scheduler.holds(other, 7, attempt));
    assert!(scheduler.finished(other, 7, attempt, exited(0), now).is_empty());

    // The holder vanishes: attempt 2 goes to the other agent.
    let requeued = scheduler.agent_disconnected(holder, now);
    assert_eq!(assigns(&requeued), [(other, 7, 2)]);
    assert!(scheduler.finished(holder, 7, 1, exited(1), now).is_empty(), "late result of attempt 1");
    assert!(scheduler.finished(other, 7, 1, exited(1), now).is_empty(), "wrong attempt");
    let done = finished(&scheduler.finished(other, 7, 2, exited(0), now));
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].1.attempt, done[0].1.completion.exit_code), (2, Some(0)));
}

#[test]
fn a_declined_assignment_is_requeued_never_failed() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), now);
    let (conn, job_id, attempt) = assigns(&submit(&mut scheduler, 1, now))[0];
    // Another coordinator took the slot first.
    let actions = scheduler.declined(conn, job_id, attempt, now);
    assert!(finished(&actions).is_empty());
    assert!(assigns(&actions).is_empty(), "the decliner gets nothing until it has free slots");
    scheduler.agent_connected(2, registration("b", 1, false), now);
    let later = scheduler.jobs();
    assert_eq!(later[0].running_on, Some(("b".to_owned(), 2)));
}

#[test]
fn lost_attempts_are_capped() {
    let now = Instant::now();
    let mut scheduler = Scheduler::new(SchedulerConfig { max_lost_attempts: 2, ..SchedulerConfig::default() });
    submit(&mut scheduler, 1, now);
    scheduler.agent_connected(1, registration("a", 1, false), now);
    let actions = scheduler.agent_disconnected(1, now);
    assert!(finished(&actions).is_empty());
    scheduler.agent_connected(2, registration("a", 1, false), now);
    let done = finished(&scheduler.agent_disconnected(2, now));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1.completion.outcome, Outcome::Failed as i32);
    assert!(done[0].1.completion.error.contains("disconnected"), "{}", done[0].1.completion.error);
}

#[test]
fn cancel_of_a_queued_job_ends_it_and_of_a_running_job_asks_the_agent() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    submit(&mut scheduler, 1, now);
    let done = finished(&scheduler.cancel(1, now).expect("known"));
    assert_eq!(done[0].1.completion.outcome, Outcome::Cancelled as i32);
    assert!(scheduler.cancel(1, now).is_none(), "already ended");

    scheduler.agent_connected(5, registration("a", 1, false), now);
    submit(&mut scheduler, 2, now);
    assert_eq!(scheduler.cancel(2, now).expect("known"), [Action::Cancel { conn: 5, job_id: 2, attempt: 1 }]);
    assert!(scheduler.tick(now + Duration::from_secs(1)).is_empty());
    // The agent never confirms: the coordinator ends the job itself after the grace period.
    let done = finished(&scheduler.tick(now + Duration::from_secs(11)));
    assert_eq!(done[0].1.completion.outcome, Outcome::Cancelled as i32);
}

#[test]
fn labels_route_jobs() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("plain", 4, false), now);
    let mut gpu = registration("gpu", 1, false);
    gpu.labels.push("gpu".into());
    let mut job = spec();
    job.required_labels = vec!["gpu".into()];
    let actions = scheduler.submit(1, job.clone(), Source::default(), String::new(), now, 0);
    assert!(matches!(&actions[0], Action::Event { event: JobEvent::Queued { reason, .. }, .. } if reason.contains("labels")));
    assert_eq!(assigns(&scheduler.agent_connected(2, gpu, now)), [(2, 1, 1)]);
}

/// Random interleavings of submissions, agents coming and going, declines, results and
/// cancels: every job ends exactly once, and only its current attempt's result counts.
#[test]
fn no_job_is_lost_or_finished_twice_under_random_interleavings() {
    for seed in 0..200 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let start = Instant::now();
        let mut scheduler = Scheduler::new(SchedulerConfig { max_lost_attempts: 1000, ..SchedulerConfig::default() });
        let mut finished_count: HashMap<JobId, u32> = HashMap::new();
        let mut in_flight: Vec<(ConnId, JobId, u32)> = Vec::new();
        let mut connected: Vec<ConnId> = Vec::new();
        let mut next_conn = 1;
        let mut next_job = 1;
        for step in 0..300u64 {
            let now = start + Duration::from_millis(step);
            let actions = match rng.u8(0..6) {
                0 => {
                    next_job += 1;
                    submit(&mut scheduler, next_job, now)
                }
                1 => {
                    next_conn += 1;
                    connected.push(next_conn);
                    scheduler.agent_connected(next_conn, registration("x", rng.u32(1..3), false), now)
                }
                2 if !connected.is_empty() => {
                    let conn = connected.swap_remove(rng.usize(..connected.len()));
                    scheduler.agent_disconnected(conn, now)
                }
                3 if !in_flight.is_empty() => {
                    let (conn, job, attempt) = in_flight.swap_remove(rng.usize(..in_flight.len()));
                    scheduler.finished(conn, job, attempt, exited(0), now)
                }
                4 if !in_flight.is_empty() => {
                    let (conn, job, attempt) = in_flight.swap_remove(rng.usize(..in_flight.len()));
                    scheduler.declined(conn, job, attempt, now)
                }
                5 if next_job > 1 => scheduler.cancel(rng.u64(2..=next_job), now).unwrap_or_default(),
                _ => Vec::new(),
            };
            in_flight.extend(assigns(&actions));
            for (job_id, _) in finished(&actions) {
                *finished_count.entry(job_id).or_default() += 1;
            }
        }
        assert!(finished_count.values().all(|n| *n == 1), "seed {seed}: a job finished twice");
        let open: Vec<JobId> = scheduler.jobs().iter().map(|job| job.job_id).collect();
        for job_id in 2..=next_job {
            let ended = finished_count.contains_key(&job_id);
            assert!(ended != open.contains(&job_id), "seed {seed}: job {job_id} lost or doubled");
        }
    }
}

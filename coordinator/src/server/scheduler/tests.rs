use super::*;
use buildpool_core::JobKind;

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
        sandboxed: true,
        disk: DiskUsage::default(),
        identity: format!("key of {agent_id}"),
    }
}

fn spec() -> JobSpec {
    JobSpec::new(JobKind::Build)
}

fn source() -> Source {
    Source {
        repo_id: "repo".into(),
        git_path: "/repo.git".into(),
        git_port: None,
        commit: "0".repeat(40),
        git_ref: "refs/buildpool/snapshots/x".into(),
        base_commit: String::new(),
        pack: None,
    }
}

fn submit(scheduler: &mut Scheduler, job_id: JobId, now: Instant) -> Vec<Action> {
    scheduler.submit(job_id, spec(), source(), String::new(), now, 0)
}

fn assigns(actions: &[Action]) -> Vec<(ConnId, JobId, u32)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Assign { conn, assignment } => {
                Some((*conn, assignment.key.job_id, assignment.key.attempt))
            }
            _ => None,
        })
        .collect()
}

fn finished(actions: &[Action]) -> Vec<(JobId, JobResult)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Event {
                job_id,
                event: JobEvent::Finished(result),
            } => Some((*job_id, result.clone())),
            _ => None,
        })
        .collect()
}

fn exited(code: i32) -> Completion {
    Completion::new(JobEnd::Exited { code })
}

fn key(job_id: JobId, attempt: u32) -> AttemptKey {
    AttemptKey::new(job_id, attempt)
}

/// The failure reason of a finished job, or a panic naming what it was instead.
fn failure(result: &JobResult) -> &str {
    match &result.completion.end {
        JobEnd::Failed { reason } => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn a_job_waits_for_an_agent_and_says_why() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    let actions = submit(&mut scheduler, 1, now);
    assert_eq!(
        actions,
        vec![Action::Event {
            job_id: 1,
            event: JobEvent::Queued {
                position: 0,
                reason: "no agents connected".into()
            },
        }]
    );
    let actions = scheduler.agent_connected(10, registration("a", 2, false), &[], now);
    assert_eq!(assigns(&actions), [(10, 1, 1)]);
}

#[test]
fn the_local_agent_runs_jobs_only_while_no_agent_is_connected() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("local", 2, true), &[], now);
    assert_eq!(assigns(&submit(&mut scheduler, 1, now)), [(1, 1, 1)]);
    assert!(scheduler.local_busy());
    scheduler.agent_connected(2, registration("remote", 1, false), &[], now);
    assert_eq!(assigns(&submit(&mut scheduler, 2, now)), [(2, 2, 1)]);
    // The remote agent is busy, but connected: the next job waits for it.
    let queued = submit(&mut scheduler, 3, now);
    assert!(assigns(&queued).is_empty());
    assert!(
        matches!(&queued[0], Action::Event { event: JobEvent::Queued { reason, .. }, .. } if reason.contains("busy"))
    );
}

#[test]
fn results_from_a_superseded_attempt_or_another_agent_are_dropped() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    scheduler.agent_connected(2, registration("b", 1, false), &[], now);
    let first = assigns(&submit(&mut scheduler, 7, now));
    let (holder, _, attempt) = first[0];
    let other = if holder == 1 { 2 } else { 1 };
    assert!(scheduler.holds(holder, key(7, attempt)));
    assert!(!scheduler.holds(other, key(7, attempt)));
    assert!(
        scheduler
            .finished(other, key(7, attempt), exited(0), now)
            .is_empty()
    );

    // The holder vanishes and does not come back within the grace window: attempt 2 goes
    // to the other agent.
    assert!(
        assigns(&scheduler.agent_disconnected(holder, now)).is_empty(),
        "held for reattach"
    );
    let requeued = scheduler.tick(now + Duration::from_secs(16));
    assert_eq!(assigns(&requeued), [(other, 7, 2)]);
    assert!(
        scheduler
            .finished(holder, key(7, 1), exited(1), now)
            .is_empty(),
        "late result of attempt 1"
    );
    assert!(
        scheduler
            .finished(other, key(7, 1), exited(1), now)
            .is_empty(),
        "wrong attempt"
    );
    let done = finished(&scheduler.finished(other, key(7, 2), exited(0), now));
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].1.attempt, &done[0].1.completion.end),
        (2, &JobEnd::Exited { code: 0 })
    );
}

#[test]
fn a_closing_connection_gets_no_more_jobs_while_its_last_result_is_applied() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 2, false), &[], now);
    let (conn, _, attempt) = assigns(&submit(&mut scheduler, 7, now))[0];
    assert_eq!(conn, 1);
    scheduler.closing(1);
    // The result frees a slot and the queue has a job, yet nothing goes to the closing
    // connection: the job waits for another agent.
    assert!(assigns(&submit(&mut scheduler, 8, now)).is_empty());
    let actions = scheduler.finished(1, key(7, attempt), exited(0), now);
    assert_eq!(finished(&actions).len(), 1, "the result still counts");
    assert!(assigns(&actions).is_empty(), "{actions:?}");
    let placed = assigns(&scheduler.agent_connected(2, registration("b", 1, false), &[], now));
    assert_eq!(placed, [(2, 8, 1)]);
}

#[test]
fn a_declined_assignment_is_requeued_never_failed() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    let (conn, job_id, attempt) = assigns(&submit(&mut scheduler, 1, now))[0];
    // Another coordinator took the slot first.
    let actions = scheduler.declined(conn, key(job_id, attempt), now);
    assert!(finished(&actions).is_empty());
    assert!(
        assigns(&actions).is_empty(),
        "the decliner gets nothing until it has free slots"
    );
    scheduler.agent_connected(2, registration("b", 1, false), &[], now);
    let later = scheduler.jobs();
    assert_eq!(
        later[0].place,
        JobPlace::Running {
            agent_id: "b".to_owned(),
            attempt: 2
        }
    );
    assert_eq!(
        scheduler.counters().requeues,
        1,
        "a decline counts as a requeue"
    );
}

#[test]
fn lost_attempts_are_capped() {
    let now = Instant::now();
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_lost_attempts: 2,
        ..SchedulerConfig::default()
    });
    submit(&mut scheduler, 1, now);
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    // The agent comes back without the attempt (it restarted): requeued at once.
    let actions = scheduler.agent_connected(2, registration("a", 1, false), &[], now);
    assert!(finished(&actions).is_empty());
    assert_eq!(assigns(&actions), [(2, 1, 2)]);
    scheduler.agent_disconnected(2, now);
    let done = finished(&scheduler.tick(now + Duration::from_secs(16)));
    assert_eq!(done.len(), 1);
    assert!(failure(&done[0].1).contains("was lost"), "{:?}", done[0].1);
    assert_eq!(
        scheduler.counters(),
        Counters {
            requeues: 1,
            lost_attempts: 2
        }
    );
}

#[test]
fn cancel_of_a_queued_job_ends_it_and_of_a_running_job_asks_the_agent() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    submit(&mut scheduler, 1, now);
    let done = finished(&scheduler.cancel(1, now).expect("known"));
    assert_eq!(done[0].1.completion.end, JobEnd::Cancelled);
    assert!(scheduler.cancel(1, now).is_none(), "already ended");

    scheduler.agent_connected(5, registration("a", 1, false), &[], now);
    submit(&mut scheduler, 2, now);
    assert_eq!(
        scheduler.cancel(2, now).expect("known"),
        [Action::Cancel {
            conn: 5,
            key: key(2, 1)
        }]
    );
    assert!(scheduler.tick(now + Duration::from_secs(1)).is_empty());
    // The agent never confirms: the coordinator ends the job itself after the grace period.
    let done = finished(&scheduler.tick(now + Duration::from_secs(11)));
    assert_eq!(done[0].1.completion.end, JobEnd::Cancelled);
}

#[test]
fn labels_route_jobs() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("plain", 4, false), &[], now);
    let mut gpu = registration("gpu", 1, false);
    gpu.labels.push("gpu".into());
    let mut job = spec();
    job.required_labels = vec!["gpu".into()];
    let actions = scheduler.submit(1, job.clone(), source(), String::new(), now, 0);
    assert!(
        matches!(&actions[0], Action::Event { event: JobEvent::Queued { reason, .. }, .. } if reason.contains("labels"))
    );
    assert_eq!(
        assigns(&scheduler.agent_connected(2, gpu, &[], now)),
        [(2, 1, 1)]
    );
}

/// Random interleavings of submissions, agents coming and going, declines, results and
/// cancels: every job ends exactly once, and only its current attempt's result counts.
/// An agent's reconnect in the interleavings: its attempts move from connection `old` to
/// `new`, and it reports a random subset of them.
fn move_attempts(
    in_flight: &mut [(ConnId, JobId, u32)],
    old: ConnId,
    new: ConnId,
    rng: &mut fastrand::Rng,
) -> Vec<AttemptKey> {
    let reports = in_flight
        .iter()
        .filter(|(conn, _, _)| *conn == old && rng.bool())
        .map(|(_, job_id, attempt)| key(*job_id, *attempt))
        .collect();
    for (conn, _, _) in in_flight.iter_mut() {
        if *conn == old {
            *conn = new;
        }
    }
    reports
}

#[test]
fn no_job_is_lost_or_finished_twice_under_random_interleavings() {
    for seed in 0..200 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let start = Instant::now();
        let config = SchedulerConfig {
            max_lost_attempts: 1000,
            ..SchedulerConfig::default()
        };
        let mut scheduler = Scheduler::new(config);
        let mut finished_count: HashMap<JobId, u32> = HashMap::new();
        let mut in_flight: Vec<(ConnId, JobId, u32)> = Vec::new();
        let mut connected: Vec<ConnId> = Vec::new();
        // Each connection's agent id, and what the coordinator's store would hold (kept
        // from the actions as `Dispatch::apply` keeps it): unfinished jobs, their agent and
        // attempt.
        let mut agent_ids: HashMap<ConnId, String> = HashMap::new();
        let mut stored: BTreeMap<JobId, (Option<String>, u32, u32)> = BTreeMap::new();
        let mut next_conn = 1;
        let mut next_job = 1;
        let mut clock = start;
        for _ in 0..300u64 {
            clock += Duration::from_millis(rng.u64(0..3000));
            let now = clock;
            let actions = match rng.u8(0..9) {
                0 => {
                    next_job += 1;
                    stored.insert(next_job, (None, 0, 0));
                    submit(&mut scheduler, next_job, now)
                }
                1 => {
                    next_conn += 1;
                    connected.push(next_conn);
                    agent_ids.insert(next_conn, format!("x{next_conn}"));
                    scheduler.agent_connected(
                        next_conn,
                        registration(&format!("x{next_conn}"), rng.u32(1..3), false),
                        &[],
                        now,
                    )
                }
                2 if !connected.is_empty() => {
                    let conn = connected.swap_remove(rng.usize(..connected.len()));
                    scheduler.agent_disconnected(conn, now)
                }
                3 if !in_flight.is_empty() => {
                    let (conn, job, attempt) = in_flight.swap_remove(rng.usize(..in_flight.len()));
                    scheduler.finished(conn, key(job, attempt), exited(0), now)
                }
                4 if !in_flight.is_empty() => {
                    let (conn, job, attempt) = in_flight.swap_remove(rng.usize(..in_flight.len()));
                    scheduler.declined(conn, key(job, attempt), now)
                }
                5 if next_job > 1 => scheduler
                    .cancel(rng.u64(2..=next_job), now)
                    .unwrap_or_default(),
                6 => scheduler.tick(now),
                // An agent reconnects (new connection, same id) reporting some of its attempts.
                7 if !connected.is_empty() => {
                    let old = connected[rng.usize(..connected.len())];
                    next_conn += 1;
                    let reports = move_attempts(&mut in_flight, old, next_conn, &mut rng);
                    connected.retain(|c| *c != old);
                    connected.push(next_conn);
                    let agent_id = agent_ids[&old].clone();
                    agent_ids.insert(next_conn, agent_id.clone());
                    scheduler.agent_connected(
                        next_conn,
                        registration(&agent_id, 2, false),
                        &reports,
                        now,
                    )
                }
                // The coordinator restarts: a new scheduler restores what the store holds,
                // and every agent reconnects, reporting some of its attempts.
                8 => {
                    scheduler = Scheduler::new(config);
                    let restored = stored
                        .iter()
                        .map(
                            |(job_id, (running_on, attempt, lost_attempts))| RestoredJob {
                                attempt: *attempt,
                                lost_attempts: *lost_attempts,
                                running_on: running_on.clone(),
                                ..restored(*job_id, 0, None)
                            },
                        )
                        .collect();
                    let mut actions = scheduler.restore(restored, now, 0);
                    for old in std::mem::take(&mut connected) {
                        next_conn += 1;
                        let reports = move_attempts(&mut in_flight, old, next_conn, &mut rng);
                        connected.push(next_conn);
                        let agent_id = agent_ids[&old].clone();
                        agent_ids.insert(next_conn, agent_id.clone());
                        actions.extend(scheduler.agent_connected(
                            next_conn,
                            registration(&agent_id, 2, false),
                            &reports,
                            now,
                        ));
                    }
                    actions
                }
                _ => Vec::new(),
            };
            for action in &actions {
                if let Action::Event { job_id, event } = action {
                    match event {
                        JobEvent::Assigned {
                            agent_id, attempt, ..
                        } => {
                            if let Some(entry) = stored.get_mut(job_id) {
                                entry.0 = Some(agent_id.clone());
                                entry.1 = *attempt;
                            }
                        }
                        JobEvent::Queued { .. } => {
                            if let (Some(entry), Some((attempt, lost))) =
                                (stored.get_mut(job_id), scheduler.attempts(*job_id))
                            {
                                *entry = (None, attempt, lost);
                            }
                        }
                        JobEvent::Finished(_) => {
                            stored.remove(job_id);
                        }
                        JobEvent::Output { .. } => {}
                    }
                }
            }
            in_flight.extend(assigns(&actions));
            for (job_id, _) in finished(&actions) {
                *finished_count.entry(job_id).or_default() += 1;
            }
        }
        assert!(
            finished_count.values().all(|n| *n == 1),
            "seed {seed}: a job finished twice"
        );
        let open: Vec<JobId> = scheduler.jobs().iter().map(|job| job.job_id).collect();
        for job_id in 2..=next_job {
            let ended = finished_count.contains_key(&job_id);
            assert!(
                ended != open.contains(&job_id),
                "seed {seed}: job {job_id} lost or doubled"
            );
        }
    }
}

#[test]
fn a_reconnecting_agent_reattaches_its_attempts_within_the_grace_window() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    submit(&mut scheduler, 1, now);
    scheduler.agent_connected(2, registration("b", 1, false), &[], now);

    // a's connection drops; within the grace window nothing is requeued.
    let actions = scheduler.agent_disconnected(1, now);
    assert!(assigns(&actions).is_empty() && finished(&actions).is_empty());
    assert!(scheduler.tick(now + Duration::from_secs(5)).is_empty());

    // a comes back on connection 3, still running job 1 attempt 1: reattached, not rerun.
    let reports = [key(1, 1)];
    let actions = scheduler.agent_connected(
        3,
        registration("a", 1, false),
        &reports,
        now + Duration::from_secs(6),
    );
    assert!(assigns(&actions).is_empty(), "{actions:?}");
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Cancel { .. })),
        "{actions:?}"
    );
    assert!(scheduler.holds(3, key(1, 1)));
    let done = finished(&scheduler.finished(3, key(1, 1), exited(0), now + Duration::from_secs(7)));
    assert_eq!((done.len(), done[0].1.attempt), (1, 1));
}

/// An agent id belongs to the identity that registered it: while that agent is connected,
/// while an attempt waits for it to reattach, and for [`IDENTITY_HOLD`] after it left.
/// Only then may another identity take the id; the same identity always may.
#[test]
fn an_agent_id_is_refused_to_another_identity_while_its_agent_holds_it() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    let real = registration("a", 1, false);
    let impostor = AgentRegistration {
        identity: "another key".into(),
        ..registration("a", 4, false)
    };
    assert_eq!(scheduler.refusal(&impostor, now), None, "a new id is free");
    scheduler.agent_connected(1, real.clone(), &[], now);
    submit(&mut scheduler, 1, now);
    assert!(scheduler.holds(1, key(1, 1)));
    let refused = scheduler
        .refusal(&impostor, now)
        .expect("refused while connected");
    assert!(refused.contains("belongs to another agent"), "{refused}");
    assert_eq!(
        scheduler.refusal(&real, now),
        None,
        "its own reconnect takes over"
    );

    // Gone, with its attempt orphaned: still its agent's, however long the wait.
    scheduler.agent_disconnected(1, now);
    assert!(scheduler.refusal(&impostor, now + IDENTITY_HOLD).is_some());
    // The attempt is requeued after the grace; the id is held until the hold ends.
    let later = now + Duration::from_secs(16);
    scheduler.tick(later);
    assert!(scheduler.refusal(&impostor, later).is_some());
    let after_hold = now + IDENTITY_HOLD + Duration::from_secs(1);
    assert_eq!(scheduler.refusal(&impostor, after_hold), None);
    // The local agent's id is never claimed.
    assert_eq!(
        scheduler.refusal(&registration("local", 1, true), now),
        None
    );
}

#[test]
fn after_the_grace_window_the_attempt_is_requeued_and_the_returning_agent_told_to_stop_it() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    submit(&mut scheduler, 1, now);
    scheduler.agent_disconnected(1, now);
    scheduler.agent_connected(2, registration("b", 1, false), &[], now);
    let later = now + Duration::from_secs(16);
    assert_eq!(assigns(&scheduler.tick(later)), [(2, 1, 2)]);
    let reports = [key(1, 1)];
    let actions = scheduler.agent_connected(3, registration("a", 1, false), &reports, later);
    assert!(
        actions.contains(&Action::Cancel {
            conn: 3,
            key: key(1, 1)
        }),
        "{actions:?}"
    );
    assert!(
        scheduler
            .finished(3, key(1, 1), exited(0), later)
            .is_empty(),
        "the stale result is ignored"
    );
    assert!(scheduler.holds(2, key(1, 2)));
}

#[test]
fn a_new_connection_of_the_same_agent_supersedes_the_old_one() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    submit(&mut scheduler, 1, now);
    // Half-open: the old connection is not detected dead yet when the agent reconnects.
    let reports = [key(1, 1)];
    let actions = scheduler.agent_connected(2, registration("a", 1, false), &reports, now);
    assert!(actions.contains(&Action::Close { conn: 1 }), "{actions:?}");
    assert!(scheduler.holds(2, key(1, 1)));
    // The stale connection's cleanup arrives later and must not disturb the new one.
    assert!(scheduler.agent_disconnected(1, now).is_empty());
    assert!(scheduler.holds(2, key(1, 1)));
    assert_eq!(scheduler.agents().len(), 1);
}

#[test]
fn a_job_no_agent_can_run_fails_after_the_configured_wait() {
    let now = Instant::now();
    let mut scheduler = Scheduler::new(SchedulerConfig {
        unroutable_wait: Duration::from_secs(30),
        ..SchedulerConfig::default()
    });
    scheduler.agent_connected(1, registration("plain", 1, false), &[], now);
    let mut job = spec();
    job.required_labels = vec!["gpu".into()];
    scheduler.submit(1, job, source(), String::new(), now, 0);
    assert!(finished(&scheduler.tick(now + Duration::from_secs(1))).is_empty());
    let done = finished(&scheduler.tick(now + Duration::from_secs(32)));
    assert_eq!(done.len(), 1);
    assert!(failure(&done[0].1).contains("gpu"), "{:?}", done[0].1);
    // A job that only waits for a busy agent is not unroutable.
    submit(&mut scheduler, 2, now);
    submit(&mut scheduler, 3, now);
    assert!(finished(&scheduler.tick(now + Duration::from_secs(100))).is_empty());
}

fn demands(actions: &[Action]) -> Vec<(ConnId, u32)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Demand { conn, queued } => Some((*conn, *queued)),
            _ => None,
        })
        .collect()
}

#[test]
fn demand_goes_only_to_agents_whose_demand_changed() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    let mut gpu = registration("gpu", 1, false);
    gpu.labels.push("gpu".into());
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    scheduler.agent_connected(2, gpu, &[], now);
    scheduler.agent_connected(3, registration("local", 1, true), &[], now);
    // Told zero once on connecting; then an idle fleet hears nothing, job after job.
    for job_id in 1..=3 {
        let actions = submit(&mut scheduler, job_id, now);
        assert_eq!(demands(&actions), [], "{actions:?}");
        let (conn, _, attempt) = assigns(&actions)[0];
        let actions = scheduler.finished(conn, key(job_id, attempt), exited(0), now);
        assert_eq!(demands(&actions), []);
        scheduler.slots_changed(conn, 1, 1, false, now);
    }
    // Both busy: each agent hears what waits that it could run, by its labels.
    submit(&mut scheduler, 10, now);
    submit(&mut scheduler, 11, now);
    let mut needs_gpu = spec();
    needs_gpu.required_labels = vec!["gpu".into()];
    let actions = scheduler.submit(12, needs_gpu, source(), String::new(), now, 0);
    assert_eq!(demands(&actions), [(2, 1)], "{actions:?}");
    let actions = submit(&mut scheduler, 13, now);
    assert_eq!(
        demands(&actions),
        [(1, 1)],
        "the local agent hears none, and the gpu agent (one slot) nothing new"
    );
    // The queue drains: each hears zero once.
    let actions = scheduler.cancel(12, now).expect("queued");
    assert_eq!(demands(&actions), []);
    let actions = scheduler.cancel(13, now).expect("queued");
    assert_eq!(demands(&actions), [(1, 0), (2, 0)]);
    let actions = submit(&mut scheduler, 14, now);
    assert_eq!(demands(&actions), [(1, 1), (2, 1)]);
    let actions = scheduler.agent_disconnected(1, now);
    assert_eq!(
        demands(&actions),
        [],
        "job 14 still waits for agent 2: {actions:?}"
    );
    let actions = scheduler.cancel(14, now).expect("queued");
    assert_eq!(demands(&actions), [(2, 0)], "the gone agent is not told");
}

#[test]
fn jobs_no_free_agent_can_run_wait_while_later_ones_with_other_labels_are_placed() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    let mut gpu = registration("gpu", 1, false);
    gpu.labels.push("gpu".into());
    scheduler.agent_connected(1, gpu, &[], now);
    scheduler.agent_connected(2, registration("a", 2, false), &[], now);
    let needs_gpu = || {
        let mut spec = spec();
        spec.required_labels = vec!["gpu".into()];
        spec
    };
    let first = scheduler.submit(1, needs_gpu(), source(), String::new(), now, 0);
    assert_eq!(assigns(&first), [(1, 1, 1)]);
    // The gpu agent is busy: the gpu jobs wait, and the jobs behind them go to agent 2.
    for job_id in 2..=3 {
        let actions = scheduler.submit(job_id, needs_gpu(), source(), String::new(), now, 0);
        assert_eq!(assigns(&actions), []);
    }
    assert_eq!(assigns(&submit(&mut scheduler, 4, now)), [(2, 4, 1)]);
    assert_eq!(assigns(&submit(&mut scheduler, 5, now)), [(2, 5, 1)]);
    // Every slot is taken: the next waits too, and the gpu jobs still go first when the gpu
    // agent is free again.
    assert_eq!(assigns(&submit(&mut scheduler, 6, now)), []);
    scheduler.finished(1, key(1, 1), exited(0), now);
    let actions = scheduler.slots_changed(1, 1, 1, false, now);
    assert_eq!(assigns(&actions), [(1, 2, 1)]);
    scheduler.finished(2, key(4, 1), exited(0), now);
    let actions = scheduler.slots_changed(2, 1, 2, false, now);
    assert_eq!(assigns(&actions), [(2, 6, 1)], "job 3 needs the gpu agent");
}

#[test]
fn a_long_queue_tells_an_agent_at_most_its_slots_and_again_after_each_assignment() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 2, false), &[], now);
    submit(&mut scheduler, 1, now);
    submit(&mut scheduler, 2, now);
    assert_eq!(demands(&submit(&mut scheduler, 3, now)), [(1, 1)]);
    assert_eq!(demands(&submit(&mut scheduler, 4, now)), [(1, 2)]);
    for job_id in 5..=10 {
        let actions = submit(&mut scheduler, job_id, now);
        assert_eq!(demands(&actions), [], "job {job_id}: {actions:?}");
    }
    // The agent takes a job and counts it against its demand, so it hears it again.
    scheduler.finished(1, key(1, 1), exited(0), now);
    let actions = scheduler.slots_changed(1, 1, 2, false, now);
    assert_eq!(assigns(&actions), [(1, 3, 1)]);
    assert_eq!(demands(&actions), [(1, 2)], "{actions:?}");
}

#[test]
fn agents_hear_how_much_work_waits_for_them_and_drain_on_request() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    submit(&mut scheduler, 1, now);
    let actions = submit(&mut scheduler, 2, now);
    assert!(
        actions.contains(&Action::Demand { conn: 1, queued: 1 }),
        "{actions:?}"
    );
    let (count, actions) = scheduler.drain("a", now);
    assert_eq!(count, 1);
    assert!(actions.contains(&Action::Drain { conn: 1 }));
    assert!(
        actions.contains(&Action::Demand { conn: 1, queued: 0 }),
        "a draining agent is offered no work: {actions:?}"
    );
    assert!(assigns(&scheduler.slots_changed(1, 1, 1, true, now)).is_empty());
}

fn restored(job_id: JobId, attempt: u32, running_on: Option<&str>) -> RestoredJob {
    RestoredJob {
        job_id,
        spec: spec(),
        source: source(),
        worktree: String::new(),
        submitted_unix_ms: 1_000,
        attempt,
        lost_attempts: 0,
        running_on: running_on.map(str::to_owned),
    }
}

#[test]
fn after_a_restart_queued_jobs_queue_in_order_and_running_ones_wait_for_their_agent() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    let jobs = vec![
        restored(1, 1, Some("a")),
        restored(2, 0, None),
        restored(3, 2, None),
        restored(4, 1, Some("gone")),
    ];
    assert!(assigns(&scheduler.restore(jobs, now, 5_000)).is_empty());

    // Agent a reports its attempt of job 1: reattached, never rerun. The queued jobs go
    // in their order, each on an attempt number the old coordinator never handed out.
    let later = now + Duration::from_secs(3);
    let actions = scheduler.agent_connected(1, registration("a", 3, false), &[key(1, 1)], later);
    assert!(scheduler.holds(1, key(1, 1)), "{actions:?}");
    assert_eq!(assigns(&actions), [(1, 2, 2), (1, 3, 4)]);

    // The agent of job 4 does not come back within the grace (counted from the restart).
    assert!(assigns(&scheduler.tick(now + Duration::from_secs(14))).is_empty());
    let actions = scheduler.finished(1, key(2, 2), exited(0), now + Duration::from_secs(15));
    assert_eq!(assigns(&actions), [], "job 4 still waits for its agent");
    let actions = scheduler.tick(now + Duration::from_secs(16));
    assert_eq!(assigns(&actions), [(1, 4, 2)], "{actions:?}");
}

/// Submits job `job_id` from `worktree` on `base_commit`, returns the connection it went to.
fn submit_from(
    scheduler: &mut Scheduler,
    job_id: JobId,
    worktree: &str,
    base_commit: &str,
    now: Instant,
) -> Option<ConnId> {
    let source = Source {
        base_commit: base_commit.to_owned(),
        ..source()
    };
    let actions = scheduler.submit(job_id, spec(), source, worktree.to_owned(), now, 0);
    let placed = assigns(&actions);
    placed.first().map(|(conn, _, _)| *conn)
}

/// Ends attempt 1 of `job_id` on `conn`, whose agent then offers all `slots` again.
fn end_job(scheduler: &mut Scheduler, conn: ConnId, job_id: JobId, slots: u32, now: Instant) {
    scheduler.finished(conn, key(job_id, 1), exited(0), now);
    scheduler.slots_changed(conn, slots, slots, false, now);
}

#[test]
fn a_job_goes_to_the_agent_whose_workspace_last_built_its_worktree() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 2, false), &[], now);
    scheduler.agent_connected(2, registration("b", 2, false), &[], now);
    // Both idle and cold: the first job takes a's never used slot, so does the second
    // worktree's; the third finds a's slots both used and b's never used.
    assert_eq!(submit_from(&mut scheduler, 1, "/w1", "", now), Some(1));
    end_job(&mut scheduler, 1, 1, 2, now);
    assert_eq!(submit_from(&mut scheduler, 2, "/w2", "", now), Some(1));
    end_job(&mut scheduler, 1, 2, 2, now);
    assert_eq!(submit_from(&mut scheduler, 3, "/w3", "", now), Some(2));
    end_job(&mut scheduler, 2, 3, 2, now);
    // Each worktree comes back to the agent that built it, whichever has more free slots.
    for (job_id, worktree, agent) in [(4, "/w3", 2), (5, "/w1", 1), (6, "/w2", 1), (7, "/w3", 2)] {
        assert_eq!(
            submit_from(&mut scheduler, job_id, worktree, "", now),
            Some(agent),
            "{worktree}"
        );
        end_job(&mut scheduler, agent, job_id, 2, now);
    }
    // While /w1's agent has a free slot, a second job of /w1 goes there too.
    assert_eq!(submit_from(&mut scheduler, 8, "/w1", "", now), Some(1));
    assert_eq!(submit_from(&mut scheduler, 9, "/w1", "", now), Some(1));
    // Its agent full, the next one takes the other agent's least recently used slot.
    assert_eq!(submit_from(&mut scheduler, 10, "/w1", "", now), Some(2));
}

#[test]
fn without_the_same_worktree_the_same_base_commit_wins_then_the_least_recently_used() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    scheduler.agent_connected(2, registration("b", 1, false), &[], now);
    assert_eq!(
        submit_from(&mut scheduler, 1, "/w1", "base-x", now),
        Some(1)
    );
    end_job(&mut scheduler, 1, 1, 1, now);
    assert_eq!(
        submit_from(&mut scheduler, 2, "/w2", "base-y", now),
        Some(2)
    );
    end_job(&mut scheduler, 2, 2, 1, now);
    // A new worktree on base y: b's workspace is the nearest snapshot.
    assert_eq!(
        submit_from(&mut scheduler, 3, "/w3", "base-y", now),
        Some(2)
    );
    end_job(&mut scheduler, 2, 3, 1, now);
    // Unrelated: a's workspace was used least recently.
    assert_eq!(
        submit_from(&mut scheduler, 4, "/w4", "base-z", now),
        Some(1)
    );
}

#[test]
fn an_agent_keeps_its_affinity_across_a_reconnect() {
    let now = Instant::now();
    let mut scheduler = Scheduler::default();
    scheduler.agent_connected(1, registration("a", 1, false), &[], now);
    scheduler.agent_connected(2, registration("b", 1, false), &[], now);
    assert_eq!(submit_from(&mut scheduler, 1, "/w1", "", now), Some(1));
    assert_eq!(submit_from(&mut scheduler, 2, "/w2", "", now), Some(2));
    end_job(&mut scheduler, 1, 1, 1, now);
    end_job(&mut scheduler, 2, 2, 1, now);
    scheduler.agent_disconnected(2, now);
    scheduler.agent_connected(3, registration("b", 1, false), &[], now);
    // b's workspace still holds /w2, newer than a's /w1: an unrelated job takes a's.
    assert_eq!(submit_from(&mut scheduler, 3, "/w3", "", now), Some(1));
}

#[test]
fn with_affinity_off_jobs_go_to_the_agent_with_most_free_slots() {
    let now = Instant::now();
    let mut scheduler = Scheduler::new(SchedulerConfig {
        affinity: false,
        ..SchedulerConfig::default()
    });
    scheduler.agent_connected(1, registration("a", 2, false), &[], now);
    scheduler.agent_connected(2, registration("b", 2, false), &[], now);
    for (job_id, worktree) in [(1, "/w1"), (2, "/w2"), (3, "/w3"), (4, "/w2")] {
        assert_eq!(
            submit_from(&mut scheduler, job_id, worktree, "", now),
            Some(1)
        );
        end_job(&mut scheduler, 1, job_id, 2, now);
    }
}

#[test]
fn the_warm_index_picks_what_visiting_every_agent_would() {
    let now = Instant::now();
    let worktrees = ["", "/w1", "/w2", "/w3"];
    let bases = ["", "base-x", "base-y"];
    let mut warm_picks = 0;
    for seed in 0..40 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut scheduler = Scheduler::default();
        // Connected agents: connection -> (agent id, slots); running attempts by connection.
        let mut connected: BTreeMap<ConnId, (String, u32)> = BTreeMap::new();
        let mut running: Vec<(ConnId, JobId, u32)> = Vec::new();
        let mut next_conn = 1;
        let track = |running: &mut Vec<_>, actions: &[Action]| running.extend(assigns(actions));
        for job_id in 1..300 {
            match rng.u8(..20) {
                0..=1 if connected.len() < 6 => {
                    let agent_id = format!("agent-{}", rng.u8(..8));
                    let slots = rng.u32(1..4);
                    connected.retain(|_, (id, _)| *id != agent_id);
                    let registration = registration(&agent_id, slots, false);
                    let actions = scheduler.agent_connected(next_conn, registration, &[], now);
                    running.retain(|(conn, ..)| connected.contains_key(conn));
                    track(&mut running, &actions);
                    connected.insert(next_conn, (agent_id, slots));
                    next_conn += 1;
                }
                2 if !connected.is_empty() => {
                    let conn = *connected
                        .keys()
                        .nth(rng.usize(..connected.len()))
                        .expect("one");
                    connected.remove(&conn);
                    running.retain(|(c, ..)| *c != conn);
                    let actions = scheduler.agent_disconnected(conn, now);
                    track(&mut running, &actions);
                }
                3..=10 if !running.is_empty() => {
                    let (conn, ended, attempt) = running.swap_remove(rng.usize(..running.len()));
                    let actions = scheduler.finished(conn, key(ended, attempt), exited(0), now);
                    track(&mut running, &actions);
                    let total = connected.get(&conn).map_or(0, |(_, slots)| *slots);
                    let busy = running.iter().filter(|(c, ..)| *c == conn).count() as u32;
                    let actions = scheduler.slots_changed(
                        conn,
                        total.saturating_sub(busy),
                        total,
                        false,
                        now,
                    );
                    track(&mut running, &actions);
                }
                _ => {
                    let worktree = worktrees[rng.usize(..worktrees.len())];
                    let base_commit = bases[rng.usize(..bases.len())];
                    let probe = Job {
                        spec: spec(),
                        source: Source {
                            base_commit: base_commit.to_owned(),
                            ..source()
                        },
                        worktree: worktree.to_owned(),
                        submitted: now,
                        submitted_unix_ms: 0,
                        first_assigned: None,
                        attempt: 0,
                        lost_attempts: 0,
                        state: JobState::Queued,
                        unroutable_since: None,
                    };
                    let remote = scheduler.remote_available();
                    let picked = scheduler.pick(&probe, remote);
                    assert_eq!(
                        picked,
                        scheduler.pick_by_visiting_all(&probe, remote),
                        "seed {seed}, job {job_id}: {worktree:?} on {base_commit:?}"
                    );
                    if picked.is_some()
                        && scheduler
                            .warm
                            .warmest(worktree, base_commit, |_| true)
                            .is_some()
                    {
                        warm_picks += 1;
                    }
                    let source = Source {
                        base_commit: base_commit.to_owned(),
                        ..source()
                    };
                    let actions =
                        scheduler.submit(job_id, spec(), source, worktree.to_owned(), now, 0);
                    track(&mut running, &actions);
                }
            }
        }
    }
    assert!(
        warm_picks > 100,
        "the index answered only {warm_picks} picks"
    );
}

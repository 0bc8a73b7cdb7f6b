//! The fake upstream, as the tests run it.

use std::time::{Duration, Instant};

use ketchup_fake_upstream::{FakeConfig, FakeHandle, TaskStatus};

use crate::{DEADLINE, UPSTREAM_TOKEN};

/// A fake taking [`UPSTREAM_TOKEN`] whose tasks spend 100 ms in each of pending, submitted and
/// in_progress.
pub fn fake_config() -> FakeConfig {
    rendering(Duration::from_millis(100))
}

/// A fake taking [`UPSTREAM_TOKEN`] whose tasks spend `phase` in each of pending, submitted and
/// in_progress.
fn rendering(phase: Duration) -> FakeConfig {
    let mut fake = FakeConfig::new(UPSTREAM_TOKEN);
    fake.pending_for = phase;
    fake.submitted_for = phase;
    fake.in_progress_for = phase;
    fake
}

/// [`rendering`], with each `google/gempix2` image consuming `consumed` credits.
pub fn rendering_at(phase: Duration, consumed: &str) -> FakeConfig {
    let mut fake = rendering(phase);
    fake.consumed
        .insert("google/gempix2".into(), consumed.parse().expect("amount"));
    fake
}

pub async fn start_fake(config: FakeConfig) -> FakeHandle {
    ketchup_fake_upstream::start(config)
        .await
        .expect("fake upstream starts")
}

/// Status reads of `task` the fake has answered (faults that stop a read before it is looked
/// up, such as an injected 500, are not counted here).
pub fn upstream_reads(fake: &FakeHandle, task: &str) -> u64 {
    fake.stats().queries_by_task.get(task).copied().unwrap_or(0)
}

/// Waits until the fake says every one of `tasks` is final.
pub async fn wait_until_final(fake: &FakeHandle, tasks: &[String]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stats = fake.stats();
        let pending: Vec<&String> = tasks
            .iter()
            .filter(|id| {
                !stats
                    .tasks
                    .get(*id)
                    .is_some_and(|t| matches!(t.status, TaskStatus::Success | TaskStatus::Failed))
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tasks never became final upstream: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `fake` has received a generation: the gateway holds its reservation and is now
/// waiting on the upstream.
pub async fn until_a_generation_reached(fake: &FakeHandle) {
    let deadline = Instant::now() + DEADLINE;
    while fake.stats().generate_requests == 0 {
        assert!(
            Instant::now() < deadline,
            "the generation never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

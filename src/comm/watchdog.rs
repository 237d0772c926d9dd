//! Collective timeout and context labels: how long a backend waits for the other ranks before
//! it gives up on the whole job, and what its message says about where the job was.
//!
//! - [`set_collective_timeout`] / [`collective_timeout`]: process-wide (`--collective-timeout`).
//! - [`context`]: a label for the collectives that follow on this thread (`"step 12: fused
//!   all-reduce"`); the guard it returns restores the previous label when dropped. Cheap (a
//!   thread-local string), safe to call anywhere, in any backend, and a no-op for [`SingleProcess`].
//! - [`Backoff`]: the polling schedule of a waiting rank: quick polls, then short bursts of polls
//!   between sleeps that double up to [`MAX_SLEEP`], so a waiting rank uses ~0 % CPU.
//!
//! [`SingleProcess`]: super::SingleProcess

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default `--collective-timeout` in seconds (PyTorch's NCCL watchdog also waits 10 minutes).
pub const DEFAULT_TIMEOUT_S: f64 = 600.0;

/// Longest sleep between two polls of a pending collective: 1 ms, growing to 10 ms (2 % of the
/// time already waited) in long waits, where a few more milliseconds do not matter.
pub const MAX_SLEEP: Duration = Duration::from_millis(10);

/// Sleep cap for the first half second of a wait.
const SHORT_SLEEP: Duration = Duration::from_millis(1);

/// Polls before the first sleep (each is one `MPI_Test`, well under a microsecond).
const QUICK_POLLS: u32 = 64;

/// Polls after each sleep: MPI progresses a transfer only inside MPI calls, one fragment or
/// round at a time, so a burst keeps a large transfer moving at a fraction of the CPU.
const BURST: u32 = 16;

/// Timeout in nanoseconds; 0 = none. Starts at the default so library callers get it too.
static TIMEOUT_NS: AtomicU64 = AtomicU64::new((DEFAULT_TIMEOUT_S * 1e9) as u64);

/// Sets the timeout of every collective in this process (`None`: wait forever).
pub fn set_collective_timeout(timeout: Option<Duration>) {
    TIMEOUT_NS.store(
        timeout.map_or(0, |t| t.as_nanos().clamp(1, u64::MAX as u128) as u64),
        Ordering::Relaxed,
    );
}

/// The timeout of collectives in this process, if any.
pub fn collective_timeout() -> Option<Duration> {
    Some(TIMEOUT_NS.load(Ordering::Relaxed))
        .filter(|&ns| ns > 0)
        .map(Duration::from_nanos)
}

/// What to do just before a timed-out rank aborts the job (the CLI removes its temporary
/// output directory): set once per process with [`set_abort_hook`].
static ABORT_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers the function a backend calls right before it aborts the job after a timeout.
/// Later registrations are ignored.
pub fn set_abort_hook(hook: fn()) {
    let _ = ABORT_HOOK.set(hook);
}

/// Runs the hook of [`set_abort_hook`], if any (backends call it before `MPI_Abort`).
pub fn before_abort() {
    if let Some(hook) = ABORT_HOOK.get() {
        hook();
    }
}

thread_local! {
    static LABEL: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Restores the previous context label when dropped (see [`context`]).
#[must_use = "the label applies while the guard lives"]
pub struct ContextGuard {
    previous: String,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let previous = std::mem::take(&mut self.previous);
        LABEL.with(|l| *l.borrow_mut() = previous);
    }
}

/// Labels the collectives this thread calls while the guard lives, for timeout and failure
/// messages: `let _ctx = comm::context(format!("step {t}: fused all-reduce"));`.
pub fn context(label: impl Into<String>) -> ContextGuard {
    let label = label.into();
    let previous = LABEL.with(|l| std::mem::replace(&mut *l.borrow_mut(), label));
    ContextGuard { previous }
}

/// The current context label of this thread (empty when none is set).
pub fn current_context() -> String {
    LABEL.with(|l| l.borrow().clone())
}

/// The message of a collective that timed out: `op` names the collective, `missing` the ranks
/// known not to have arrived (empty: unknown).
pub fn timeout_message(
    op: &str,
    rank: usize,
    size: usize,
    waited: Duration,
    missing: Option<&[usize]>,
) -> String {
    let ctx = current_context();
    let at = if ctx.is_empty() {
        String::new()
    } else {
        format!(" ({ctx})")
    };
    let who = match missing {
        Some([]) | None => "the ranks that did not arrive are not known".to_string(),
        Some(m) => format!(
            "ranks that did not arrive: {}",
            m.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "collective {op}{at} did not complete within --collective-timeout {:.0} s on rank {rank} of {size}; {who}; a rank is hung, stopped or much slower than the others",
        waited.as_secs_f64()
    )
}

/// The polling schedule of a rank waiting for a collective, with its deadline.
pub struct Backoff {
    started: Instant,
    deadline: Option<Instant>,
    polls: u32,
    sleep: Duration,
}

impl Backoff {
    /// Starts waiting now, with the process's [`collective_timeout`].
    pub fn start() -> Self {
        let started = Instant::now();
        Backoff {
            started,
            deadline: collective_timeout().map(|t| started + t),
            polls: 0,
            sleep: Duration::from_micros(2),
        }
    }

    /// Waits before the next poll; `Err(waited)` once the deadline has passed.
    pub fn pause(&mut self) -> Result<(), Duration> {
        if let Some(d) = self.deadline {
            if Instant::now() >= d {
                return Err(self.started.elapsed());
            }
        }
        self.polls += 1;
        if self.polls <= QUICK_POLLS || (self.polls - QUICK_POLLS) % BURST != 0 {
            std::hint::spin_loop();
            return Ok(());
        }
        std::thread::sleep(self.sleep);
        let cap = (self.started.elapsed() / 50).clamp(SHORT_SLEEP, MAX_SLEEP);
        self.sleep = (self.sleep * 2).min(cap);
        Ok(())
    }

    /// Whether the quick polls are over (the waiter now sleeps between bursts).
    pub fn sleeping(&self) -> bool {
        self.polls > QUICK_POLLS
    }

    /// The deadline, if any (for condition-variable waits).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time since the wait started.
    pub fn waited(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_labels_nest_and_restore() {
        assert_eq!(current_context(), "");
        {
            let _a = context("step 3");
            assert_eq!(current_context(), "step 3");
            {
                let _b = context("step 3: fused all-reduce");
                assert_eq!(current_context(), "step 3: fused all-reduce");
            }
            assert_eq!(current_context(), "step 3");
            let msg = timeout_message("all-reduce", 0, 2, Duration::from_secs(5), Some(&[1]));
            assert!(
                msg.contains("all-reduce (step 3)") && msg.contains("ranks that did not arrive: 1"),
                "{msg}"
            );
        }
        assert_eq!(current_context(), "");
    }

    #[test]
    fn backoff_stops_at_the_deadline_and_sleeps_at_most_max_sleep() {
        let mut b = Backoff {
            started: Instant::now(),
            deadline: Some(Instant::now() + Duration::from_millis(30)),
            polls: 0,
            sleep: Duration::from_micros(2),
        };
        let mut n = 0;
        while b.pause().is_ok() {
            n += 1;
        }
        assert!(b.waited() >= Duration::from_millis(30), "{:?}", b.waited());
        // 30 ms at <= 1 ms per sleep: at least 25 bursts after the quick polls.
        assert!(
            n >= (QUICK_POLLS + 25 * BURST) as usize && b.sleep == SHORT_SLEEP && b.sleeping(),
            "{n} polls, sleep {:?}",
            b.sleep
        );
    }
}

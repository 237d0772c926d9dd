//! SIGTERM and SIGINT: a handler thread removes the temporary output directory (and releases
//! the checkpoint directory's owner marker) and exits with 128 + the signal's number (143, 130),
//! so a preempted job never leaves a partial `--out`.
//!
//! The signal itself only wakes the thread (signal-hook's self-pipe); everything else runs on
//! that ordinary thread. It waits for a rename of the output into place that is under way
//! ([`write::remove_staged`] holds the same lock), so `--out` is either complete or absent.
//! Under `mpirun`/`srun` every rank receives the signal and exits on its own; a rank killed
//! alone is noticed by the launcher, which ends the others.
//!
//! With `--checkpoint` ([`checkpoint::arm`]) the first signal only asks the step loop to stop:
//! the ranks agree on it after the step under way, write a checkpoint and exit with the same
//! code. The thread then waits up to [`checkpoint::SIGNAL_GRACE`] for that, or for a second
//! signal, before it exits as above (the last complete checkpoint is still on disk).

use crate::adapter::write;
use crate::engine::checkpoint;
use crate::log::say;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signal that interrupted the run, if one arrived (the process is about to exit).
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

fn name(sig: i32) -> &'static str {
    if sig == SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    }
}

/// Asks the step loop for a checkpoint and waits until the process exits with it, a second
/// signal arrives or the grace period ends.
fn grace(signals: &mut Signals, sig: i32) {
    checkpoint::request_stop(sig);
    say(&format!(
        "eva: {}: writing a checkpoint after the step under way, then exiting (at most {} s; a second signal exits at once)",
        name(sig),
        checkpoint::SIGNAL_GRACE.as_secs()
    ));
    let deadline = std::time::Instant::now() + checkpoint::SIGNAL_GRACE;
    while std::time::Instant::now() < deadline {
        if signals.pending().next().is_some() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Installs the handler thread once per process; later calls do nothing. A failure to install
/// is reported as a warning and leaves the default actions in place.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut signals = match Signals::new([SIGTERM, SIGINT]) {
            Ok(s) => s,
            Err(e) => {
                say(&format!("eva: warning: cannot install the SIGTERM/SIGINT handler ({e}); an interrupted run may leave a temporary directory beside --out"));
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("eva-signals".into()).spawn(move || {
            let first = signals.forever().next();
            if let Some(sig) = first {
                RECEIVED.store(sig, Ordering::SeqCst);
                if checkpoint::armed() {
                    grace(&mut signals, sig);
                }
                // Holding the registry's lock until exit keeps a commit from starting.
                let (_lock, removed) = write::remove_staged();
                checkpoint::owner::release_claimed();
                let cleaned = match removed.as_slice() {
                    [] => String::new(),
                    dirs => format!("; removed {}, --out was not written", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")),
                };
                say(&format!("eva: error: interrupted by {}{cleaned}", name(sig)));
                // SAFETY: _exit ends the process without running atexit handlers or destructors,
                // which other threads (MPI, BLAS) may be inside of.
                unsafe { libc::_exit(128 + sig) };
            }
        });
        if let Err(e) = spawned {
            say(&format!("eva: warning: cannot start the signal thread ({e})"));
        }
    });
}

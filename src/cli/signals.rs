//! SIGTERM and SIGINT: a handler thread removes the temporary output directory and exits with
//! 128 + the signal's number (143, 130), so a preempted job never leaves a partial `--out`.
//!
//! The signal itself only wakes the thread (signal-hook's self-pipe); everything else runs on
//! that ordinary thread. It waits for a rename of the output into place that is under way
//! ([`write::remove_staged`] holds the same lock), so `--out` is either complete or absent.
//! Under `mpirun`/`srun` every rank receives the signal and exits on its own; a rank killed
//! alone is noticed by the launcher, which ends the others.

use crate::adapter::write;
use crate::cli::progress::say;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signal that interrupted the run, if one arrived (the process is about to exit).
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
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
            if let Some(sig) = signals.forever().next() {
                RECEIVED.store(sig, Ordering::SeqCst);
                // Holding the registry's lock until exit keeps a commit from starting.
                let (_lock, removed) = write::remove_staged();
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                let cleaned = match removed.as_slice() {
                    [] => String::new(),
                    dirs => format!("; removed {}, --out was not written", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")),
                };
                say(&format!("eva: error: interrupted by {name}{cleaned}"));
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

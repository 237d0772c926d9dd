//! What eva prints on stderr: step progress (a redrawn line on a terminal, plain log lines at
//! most once per second otherwise, nothing with `--quiet`) and whole-line messages.

use crate::engine::StepInfo;
use crate::log::{say, write_once};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Renders [`StepInfo`] to stderr.
pub struct Progress {
    quiet: bool,
    tty: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// A progress printer; `quiet` silences it.
    pub fn new(quiet: bool) -> Self {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    fn line(info: &StepInfo) -> String {
        format!(
            "step {}/{} | converged layers {}/{} | {} tokens | {:.0} tokens/s",
            info.step,
            info.total_steps,
            info.converged_layers,
            info.layers,
            info.tokens,
            info.tokens_per_s
        )
    }

    /// Shows one step (and the checkpoint written after it, on a line of its own).
    pub fn step(&mut self, info: &StepInfo) {
        if self.quiet {
            return;
        }
        if let Some(c) = &info.checkpoint {
            self.finish();
            let mb = |b: u64| b as f64 / 1e6;
            say(&format!(
                "[eva] checkpoint of step {} in {}: {:.1} MB on the largest rank, {:.1} MB in all, {:.2} s",
                c.step,
                c.dir.display(),
                mb(c.largest_bytes),
                mb(c.total_bytes),
                c.seconds
            ));
        }
        if self.tty {
            write_once(&format!("\r\x1b[2K[eva] {}", Self::line(info)));
            self.drawn = true;
        } else if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            || info.step == info.total_steps
        {
            say(&format!("[eva] {}", Self::line(info)));
            self.last = Some(Instant::now());
        }
    }

    /// Ends the progress line so that the next message starts on its own line.
    pub fn finish(&mut self) {
        if self.drawn {
            write_once("\n");
            self.drawn = false;
        }
    }
}

//! Step progress: a redrawn line on a terminal, plain log lines (at most one per second)
//! otherwise, nothing with `--quiet`.

use crate::engine::StepInfo;
use std::io::{IsTerminal, Write};
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
        Progress { quiet, tty: std::io::stderr().is_terminal(), last: None, drawn: false }
    }

    fn line(info: &StepInfo) -> String {
        format!(
            "step {}/{} | converged layers {}/{} | {} tokens | {:.0} tokens/s",
            info.step, info.total_steps, info.converged_layers, info.layers, info.tokens, info.tokens_per_s
        )
    }

    /// Shows one step.
    pub fn step(&mut self, info: &StepInfo) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K[eva] {}", Self::line(info));
            let _ = err.flush();
            self.drawn = true;
        } else if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) || info.step == info.total_steps {
            let _ = writeln!(err, "[eva] {}", Self::line(info));
            self.last = Some(Instant::now());
        }
    }

    /// Ends the progress line so that the next message starts on its own line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

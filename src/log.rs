//! Whole lines on stderr, each in one write, so that the lines of ranks sharing a terminal
//! under `mpirun` never interleave mid-line (`eprintln!` writes each formatted piece apart).

use std::io::Write;

/// Prints one line on stderr in a single write.
pub fn say(line: &str) {
    write_once(&format!("{line}\n"));
}

/// Writes `text` to stderr in a single write (a progress line redrawn in place, a line end).
pub fn write_once(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

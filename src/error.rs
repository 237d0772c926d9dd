//! The library's error type: every message names what was expected and what was found.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in eva. [`Error::exit_code`] maps each kind to the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value or combination that cannot work (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Input data that is missing, malformed or inconsistent (exit code 1).
    #[error("{0}")]
    Data(String),
    /// An I/O failure on a named path (exit code 1).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A numerical routine that failed to produce a result (exit code 1).
    #[error("numerical failure in {op}: {detail}")]
    Numeric { op: &'static str, detail: String },
    /// A collective operation failed or another rank reported an error (exit code 1).
    #[error("{0}")]
    Comm(String),
    /// An error on one rank of a multi-rank world (exit code of the inner error).
    #[error("rank {rank}: {source}")]
    Rank {
        rank: usize,
        #[source]
        source: Box<Error>,
    },
    /// An error inside one pipeline stage (exit code of the inner error).
    #[error("stage {stage} ({slice}): {source}")]
    Stage {
        stage: usize,
        slice: String,
        #[source]
        source: Box<Error>,
    },
    /// A GPU operation failed: a driver, cuBLAS or NVRTC status, or out of device memory (exit code 1).
    #[error("{0}")]
    Device(String),
    /// SIGTERM or SIGINT stopped the run after a checkpoint (exit code 128 + the signal).
    #[error("interrupted by {name} after step {step}; {detail}")]
    Interrupted {
        signal: i32,
        name: &'static str,
        step: usize,
        detail: String,
    },
    /// A backend that this build does not include was asked for (exit code 2).
    #[error("{backend} is not available: {hint}")]
    NotCompiled {
        backend: &'static str,
        hint: &'static str,
    },
}

impl Error {
    /// Shorthand for a usage error.
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }

    /// Shorthand for a data error.
    pub fn data(msg: impl Into<String>) -> Self {
        Error::Data(msg.into())
    }

    /// Wraps an I/O error with the operation and path involved.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Process exit code: 2 for usage errors (and missing backends), 128 + the signal for an
    /// interrupted run, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::NotCompiled { .. } => 2,
            Error::Rank { source, .. } | Error::Stage { source, .. } => source.exit_code(),
            Error::Interrupted { signal, .. } => 128 + signal,
            _ => 1,
        }
    }
}

//! Twin of the NCCL backend for builds without the `nccl` feature: it cannot be constructed.

use super::threads::ThreadWorld;
use super::MpiWorld;
use crate::{Error, Result};

/// Uninhabited: this eva was built without CUDA.
pub enum NcclWorld {}

impl NcclWorld {
    /// Always fails: rebuild with `--features nccl`.
    pub fn init(_mpi: Option<MpiWorld>, _local_rank: usize) -> Result<Self> {
        Err(Self::not_compiled())
    }

    /// Always fails: rebuild with `--features nccl`.
    pub fn over_threads(_world: ThreadWorld) -> Result<Self> {
        Err(Self::not_compiled())
    }

    fn not_compiled() -> Error {
        Error::NotCompiled { backend: "NCCL", hint: "this eva was built without NCCL; rebuild with `cargo build --release --features nccl`" }
    }
}

uninhabited_communicator!(NcclWorld);

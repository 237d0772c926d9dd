//! Twin of the MPI backend for builds without the `mpi` feature: it cannot be constructed.

use crate::{Error, Result};

/// Uninhabited: this eva was built without MPI.
pub enum MpiWorld {}

impl MpiWorld {
    /// Always fails: rebuild with `--features mpi`.
    pub fn init() -> Result<Self> {
        Err(Error::NotCompiled {
            backend: "MPI",
            hint: "MPI was asked for (a launcher such as mpirun/srun started this process, or --comm mpi), but this eva was built without it; rebuild with `cargo build --release --features mpi` (`--features nccl` for NCCL; needs libopenmpi-dev and libclang-dev)",
        })
    }

    /// The real backend's watchdog hook (uninhabited here).
    #[allow(dead_code)]
    pub(super) fn answer_questions(&self) {
        match *self {}
    }

    /// The real backend's timeout (uninhabited here).
    #[allow(dead_code)]
    pub(super) fn time_out(&self, _op: &str, _waited: std::time::Duration) -> ! {
        match *self {}
    }

    /// The real backend's split (uninhabited here).
    #[allow(dead_code)]
    pub(super) fn split_world(&self, _color: usize, _key: usize) -> Result<MpiWorld> {
        match *self {}
    }
}

uninhabited_communicator!(MpiWorld);

//! Twin of the MPI backend for builds without the `mpi` feature: it cannot be constructed.

use crate::{Error, Result};

/// Uninhabited: this eva was built without MPI.
pub enum MpiWorld {}

impl MpiWorld {
    /// Always fails: rebuild with `--features mpi`.
    pub fn init() -> Result<Self> {
        Err(Error::NotCompiled {
            backend: "MPI",
            hint: "MPI was asked for (a launcher such as mpirun/srun started this process, or --comm mpi/nccl), but this eva was built without it; rebuild with `cargo build --release --features mpi` (`--features nccl` for NCCL; needs libopenmpi-dev and libclang-dev)",
        })
    }
}

uninhabited_communicator!(MpiWorld);

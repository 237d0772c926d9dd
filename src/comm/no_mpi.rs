//! Twin of the MPI backend for builds without the `mpi` feature: it cannot be constructed.

use super::Communicator;
use crate::{Error, Result};

/// Uninhabited: this eva was built without MPI.
pub enum MpiWorld {}

impl MpiWorld {
    /// Always fails: rebuild with `--features mpi`.
    pub fn init() -> Result<Self> {
        Err(Error::NotCompiled {
            backend: "MPI",
            hint: "MPI was asked for (a launcher such as mpirun/srun started this process, or --comm mpi/nccl), but this eva was built without it; rebuild with `cargo build --release --features mpi` (`--features cuda` for NCCL; needs libopenmpi-dev and libclang-dev)",
        })
    }
}

impl Communicator for MpiWorld {
    fn rank(&self) -> usize {
        match *self {}
    }
    fn size(&self) -> usize {
        match *self {}
    }
    fn all_reduce_sum(&self, _: &mut [f64]) -> Result<()> {
        match *self {}
    }
    fn broadcast(&self, _: &mut Vec<u8>, _: usize) -> Result<()> {
        match *self {}
    }
    fn gather(&self, _: &[u8], _: usize) -> Result<Option<Vec<Vec<u8>>>> {
        match *self {}
    }
    fn barrier(&self) -> Result<()> {
        match *self {}
    }
    fn split(&self, _: usize, _: usize) -> Result<Box<dyn Communicator>> {
        match *self {}
    }
    fn backend(&self) -> &'static str {
        match *self {}
    }
}

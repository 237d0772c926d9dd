//! Twin of the NCCL backend for builds without the `cuda` feature: it cannot be constructed.

use super::{Communicator, MpiWorld};
use crate::{Error, Result};

/// Uninhabited: this eva was built without CUDA.
pub enum NcclWorld {}

impl NcclWorld {
    /// Always fails: rebuild with `--features cuda`.
    pub fn init(_mpi: MpiWorld, _local_rank: usize) -> Result<Self> {
        Err(Error::NotCompiled { backend: "NCCL", hint: "this eva was built without CUDA; rebuild with `cargo build --release --features cuda`" })
    }
}

impl Communicator for NcclWorld {
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

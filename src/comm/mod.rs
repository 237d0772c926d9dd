//! Collectives between ranks. Every backend implements [`Communicator`]; the engine talks to
//! nothing else, so single-process, thread, MPI and NCCL worlds share one code path.
//!
//! | backend | world |
//! |---|---|
//! | [`SingleProcess`] | one rank; every collective is the identity |

use crate::Result;

/// What a rank can do with the others. All methods are collective: every rank of the world
/// must call them in the same order with buffers of the same length.
pub trait Communicator {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum across ranks, in place; every rank receives the result.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `buf` on every rank with `root`'s bytes (lengths may differ before the call).
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// Rank 0 leads: it decides and writes the output.
    fn is_leader(&self) -> bool {
        self.rank() == 0
    }
}

/// A world of one process: collectives return at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

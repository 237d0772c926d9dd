//! MPI backend (rsmpi). Initialized only when a launcher started this process; finalized when
//! the last handle (world or split) is dropped.

use super::Communicator as EvaCommunicator;
use crate::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use std::rc::Rc;

/// Elements per MPI call: MPI counts are 32-bit.
const MAX_COUNT: usize = 1 << 30;

/// Tag of eva's point-to-point messages, apart from the gathers' (the default tag 0).
const P2P_TAG: i32 = 1;

/// An MPI communicator (the world, or a split of it).
pub struct MpiWorld {
    comm: SimpleCommunicator,
    _universe: Rc<mpi::environment::Universe>,
}

impl MpiWorld {
    /// Initializes MPI and returns the world.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Comm("MPI is already initialized in this process".into()))?;
        let comm = universe.world();
        Ok(MpiWorld {
            comm,
            _universe: Rc::new(universe),
        })
    }
}

impl EvaCommunicator for MpiWorld {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.comm
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let root = self.comm.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let lens = if self.rank() == root {
            let mut lens = vec![0u64; self.size()];
            self.comm
                .process_at_rank(root as i32)
                .gather_into_root(&(send.len() as u64), &mut lens[..]);
            lens
        } else {
            self.comm
                .process_at_rank(root as i32)
                .gather_into(&(send.len() as u64));
            Vec::new()
        };
        if self.rank() != root {
            for chunk in send.chunks(MAX_COUNT) {
                self.comm.process_at_rank(root as i32).send(chunk);
            }
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.size());
        for (r, &len) in lens.iter().enumerate() {
            if r == root {
                out.push(send.to_vec());
                continue;
            }
            let mut v = Vec::with_capacity(len as usize);
            while (v.len() as u64) < len {
                let (part, _) = self.comm.process_at_rank(r as i32).receive_vec::<u8>();
                v.extend_from_slice(&part);
            }
            out.push(v);
        }
        Ok(Some(out))
    }

    fn barrier(&self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn EvaCommunicator>> {
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| {
                Error::Comm(format!(
                    "MPI split by color {color} returned no communicator"
                ))
            })?;
        Ok(Box::new(MpiWorld {
            comm,
            _universe: self._universe.clone(),
        }))
    }

    fn send(&self, buf: &[u8], dest: usize) -> Result<()> {
        let to = self.comm.process_at_rank(dest as i32);
        to.send_with_tag(&(buf.len() as u64), P2P_TAG);
        for chunk in buf.chunks(MAX_COUNT) {
            to.send_with_tag(chunk, P2P_TAG);
        }
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        let from = self.comm.process_at_rank(src as i32);
        let (len, _) = from.receive_with_tag::<u64>(P2P_TAG);
        let mut v = vec![0u8; len as usize];
        for chunk in v.chunks_mut(MAX_COUNT) {
            from.receive_into_with_tag(chunk, P2P_TAG);
        }
        Ok(v)
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }
}

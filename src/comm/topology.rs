//! The grid of ranks: `dp` data-parallel replicas times `pp` pipeline stages, stage-major.
//!
//! World rank `w` is replica `w mod dp` of stage `w div dp`: the ranks of one stage are
//! consecutive, so launchers that fill nodes with consecutive ranks (mpirun's and srun's
//! default block distribution) keep a stage's data-parallel group, whose all-reduces carry the
//! statistics, inside a node whenever a node holds a multiple of `dp` ranks; the hidden states
//! between stages (point-to-point, one pass at a time) are what crosses nodes. This is the
//! order of Megatron-LM, where the pipeline dimension is outermost.

use super::{Communicator, SingleProcess};
use crate::{Error, Result};
use std::ops::Deref;
use std::rc::Rc;

/// A group of ranks: the world itself, or a part split from it.
pub enum Group {
    World(Rc<dyn Communicator>),
    Split(Box<dyn Communicator>),
}

impl Deref for Group {
    type Target = dyn Communicator;

    fn deref(&self) -> &Self::Target {
        match self {
            Group::World(c) => c.as_ref(),
            Group::Split(c) => c.as_ref(),
        }
    }
}

/// Where this rank sits in the grid, with the communicators of its groups. It shares the world
/// with its caller (one thread: communicators are not `Send`), so that an engine can own its
/// topology and outlive the caller's frame (the Python package keeps one between calls).
pub struct Topology {
    /// Every rank.
    pub world: Rc<dyn Communicator>,
    /// This rank's stage's data-parallel group (rank = replica): the world itself with one
    /// stage (so that NCCL carries the statistics), a split of it otherwise.
    pub stage_comm: Group,
    /// The stage leaders (replica 0 of each stage; rank = stage): the world itself with one
    /// replica; for ranks other than replica 0, a group of no use.
    pub leaders: Group,
    /// This rank's stage, `0..stages`.
    pub stage: usize,
    /// Pipeline stages (`--pp`).
    pub stages: usize,
    /// This rank's replica, `0..replicas`.
    pub replica: usize,
    /// Data-parallel replicas (`world size / stages`).
    pub replicas: usize,
}

/// Checks that a world of `world` ranks divides into `stages` stages.
pub fn check_grid(world: usize, stages: usize) -> Result<()> {
    if stages == 0 || world % stages != 0 {
        return Err(Error::usage(format!(
            "--pp {stages} does not divide the {world} ranks of this world into equal pipeline stages (the world must be a multiple of --pp)"
        )));
    }
    Ok(())
}

impl Topology {
    /// Splits `world` into `stages` stages (collective: every rank calls it).
    pub fn new(world: Rc<dyn Communicator>, stages: usize) -> Result<Self> {
        check_grid(world.size(), stages)?;
        let replicas = world.size() / stages;
        let (stage, replica) = (world.rank() / replicas, world.rank() % replicas);
        // Only a grid with both dimensions needs new communicators (split is collective: every
        // rank takes the same branch).
        let stage_comm = match (stages, replicas) {
            (1, _) => Group::World(world.clone()),
            (_, 1) => Group::Split(Box::new(SingleProcess)),
            _ => Group::Split(world.split(stage, replica)?),
        };
        let leaders = match (stages, replicas) {
            (_, 1) => Group::World(world.clone()),
            // One stage: its leader, rank 0, is the only stage leader.
            (1, _) => Group::Split(Box::new(SingleProcess)),
            _ => Group::Split(world.split(usize::from(replica != 0), stage)?),
        };
        Ok(Topology {
            world,
            stage_comm,
            leaders,
            stage,
            stages,
            replica,
            replicas,
        })
    }

    /// World rank of `replica` of `stage`.
    pub fn rank_of(&self, stage: usize, replica: usize) -> usize {
        stage * self.replicas + replica
    }

    /// Whether this rank leads its stage (replica 0): it solves through products, tests
    /// convergence and talks to the global leader.
    pub fn is_stage_leader(&self) -> bool {
        self.replica == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::threads::ThreadWorld;

    #[test]
    fn ranks_are_stage_major_and_groups_are_split_accordingly() {
        let worlds = ThreadWorld::create(6);
        let seen: Vec<(usize, usize, usize, usize, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| {
                    s.spawn(move || {
                        let w: Rc<dyn Communicator> = Rc::new(w);
                        let t = Topology::new(w.clone(), 3).unwrap();
                        let mut v = [w.rank() as f64];
                        t.stage_comm.all_reduce_sum(&mut v).unwrap();
                        (
                            t.stage,
                            t.replica,
                            t.stage_comm.rank(),
                            t.leaders.size(),
                            v[0] as usize,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // dp = 2: stage s holds world ranks 2s and 2s + 1; the stage sum is 4s + 1.
        for (w, &(stage, replica, stage_rank, leaders, sum)) in seen.iter().enumerate() {
            assert_eq!(
                (stage, replica, stage_rank, sum),
                (w / 2, w % 2, w % 2, 4 * (w / 2) + 1)
            );
            assert_eq!(leaders, 3);
        }
        assert!(check_grid(6, 4).unwrap_err().to_string().contains("--pp 4"));
    }
}

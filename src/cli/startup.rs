//! What every rank of `eva init` checks and takes before the source is opened, after `--out`'s
//! check, in this order ([operations](../../docs/operations.md#before-any-work)):
//!
//! 1. every rank can write `--checkpoint DIR` (a probe named after its rank and process, nothing
//!    else touched: another run may hold `DIR`);
//! 2. every rank fingerprints the run and all hold the same fingerprint
//!    ([`crate::comm::unanimous`]): ranks started with other flags or files stop here;
//! 3. rank 0 takes `DIR` for this run ([`checkpoint::owner`]), then every rank removes its
//!    partial files of an interrupted write.
//!
//! The returned [`Startup`] holds the directory until the run ends: dropped, it releases the
//! owner marker and removes the directories step 1 created if they are still empty.

use super::InitArgs;
use crate::comm::{agree, unanimous, Communicator};
use crate::config::RunConfig;
use crate::engine::checkpoint::{self, owner::Claim, Created};
use crate::log::say;
use crate::Result;

/// This run's hold on its checkpoint directory (nothing without `--checkpoint`).
#[derive(Debug)]
pub struct Startup {
    // Dropped in this order: the marker goes before its (then empty) directory.
    claim: Option<Claim>,
    created: Created,
}

impl Startup {
    /// The run succeeded: the checkpoint directory stays even if empty (the marker is still
    /// released when `self` drops).
    pub fn succeeded(self) {
        let Startup { claim, created } = self;
        drop(claim);
        created.keep();
    }
}

/// Runs the checks on every rank (collective); fills in `cfg`'s checkpoint fingerprint. The
/// sequence of collectives does not depend on the flags until the ranks agree on them: a rank
/// without `--checkpoint` next to one with it must reach the agreement, not another collective.
pub fn run(comm: &dyn Communicator, args: &InitArgs, cfg: &mut RunConfig) -> Result<Startup> {
    // The ranks of a thread world share one command line; a world of one needs the
    // fingerprint for checkpoints only.
    let separate = comm.size() > 1 && comm.backend() != "threads";
    let checked = match cfg.checkpoint.as_ref() {
        Some(c) => checkpoint::check_writable(&c.dir, comm.rank()),
        None => Ok(Created::default()),
    };
    // A directory that cannot be written is reported before the data is read.
    let local = checked.and_then(|created| {
        let fingerprint = if separate || cfg.checkpoint.is_some() {
            super::fingerprint::of(args)?
        } else {
            Vec::new()
        };
        Ok((created, fingerprint))
    });
    let (created, fingerprint) = agree(comm, local)?;
    if separate {
        unanimous::check(
            comm,
            "command line and files",
            &super::fingerprint::startup(args, &fingerprint),
        )?;
    }
    let mut claim = None;
    if let Some(c) = cfg.checkpoint.as_mut() {
        let hash = super::fingerprint::hash(&fingerprint);
        let take = || checkpoint::owner::claim(&c.dir, &hash, args.checkpoint_takeover);
        claim = agree(comm, comm.is_leader().then(take).transpose())?;
        if let Some(note) = claim.as_ref().and_then(|c| c.note.as_ref()) {
            if !cfg.quiet {
                say(&format!("[eva] {note}"));
            }
        }
        agree(comm, checkpoint::prepare(&c.dir, comm.rank()))?;
        c.fingerprint = fingerprint;
    }
    Ok(Startup { claim, created })
}

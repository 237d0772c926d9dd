//! When the ranks write checkpoints and how they agree on the one to resume from: one small
//! all-reduce after each step (a rank that received SIGTERM/SIGINT, a period by the leader's
//! clock) so that every rank takes the same decision at the same step.

use super::state;
use crate::comm::codec::{Reader, Writer};
use crate::config::{Checkpointing, Every};
use crate::engine::{fingerprint, Engine};
use crate::{Error, Result};
use std::time::Instant;

/// A checkpoint the step loop wrote (reported with the step's progress).
#[derive(Clone, Debug)]
pub struct Written {
    /// The step it holds.
    pub step: usize,
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// Bytes of the largest rank file and of all rank files together.
    pub largest_bytes: u64,
    pub total_bytes: u64,
    /// Seconds from the decision to write to every rank's file being in place.
    pub seconds: f64,
}

/// The name of a signal number eva handles.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

impl Engine {
    /// What a checkpoint of this run must match: the command line's fingerprint, the grid and
    /// the catalog with its stage plan.
    fn full_fingerprint(&self, c: &Checkpointing) -> Vec<(String, String)> {
        let mut f = c.fingerprint.clone();
        let catalog = fingerprint(&self.catalog, self.units, &self.owner);
        let mut sum = super::codec::Checksum::new();
        sum.update(catalog.as_bytes());
        f.extend([
            ("world size".into(), self.topo.world.size().to_string()),
            ("pipeline stages".into(), self.topo.stages.to_string()),
            ("stage split".into(), self.split.join("; ")),
            (
                "layers".into(),
                format!(
                    "{} layers of {} units, hash {:016x}",
                    self.catalog.layers.len(),
                    self.units,
                    sum.finish()
                ),
            ),
        ]);
        f
    }

    /// With `--resume`: the latest step every rank has a complete file of, if any rank has one.
    fn resumable_step(&self, c: &Checkpointing) -> Result<Option<usize>> {
        let world = self.world();
        let steps = super::complete_steps(&c.dir, world.comm.rank());
        let mut msg = Writer::default();
        for s in steps {
            msg.u64(s as u64);
        }
        let lists = world.gather(&msg.0, 0)?;
        let chosen = match lists {
            Some(lists) => {
                let lists: Vec<Vec<u64>> = lists
                    .iter()
                    .map(|b| {
                        b.chunks_exact(8)
                            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                            .collect()
                    })
                    .collect();
                choose_step(&c.dir, &lists)
            }
            None => Ok(None),
        };
        let chosen = world.agree(chosen)?;
        let mut buf = Writer::default()
            .u64(chosen.map_or(0, |s| s as u64 + 1))
            .0
            .clone();
        world.broadcast(&mut buf, 0)?;
        let v = Reader::new(&buf).u64()?;
        Ok(v.checked_sub(1).map(|s| s as usize))
    }

    /// With `--resume` and a checkpoint in the directory: replaces the state set up from the
    /// command line with the checkpoint's, after checking it is this run's. Returns the step.
    pub(crate) fn resume(&mut self) -> Result<Option<usize>> {
        let cfg = self.cfg.clone();
        let Some(c) = cfg.checkpoint.as_ref().filter(|c| c.resume) else {
            return Ok(None);
        };
        let Some(step) = self.resumable_step(c)? else {
            return Ok(None);
        };
        let _label = crate::comm::context(format!("resuming from the checkpoint of step {step}"));
        let local = self.load_checkpoint(c, step);
        self.world().agree(local)?;
        Ok(Some(step))
    }

    /// Reads this rank's file of `step` into the engine.
    fn load_checkpoint(&mut self, c: &Checkpointing, step: usize) -> Result<()> {
        let (rank, size) = (self.topo.world.rank(), self.topo.world.size());
        let mut d = super::read_rank_file(&c.dir, step, rank)?;
        let header = state::read_header(&mut d)?;
        let diffs = super::differences(&header.fingerprint, &self.full_fingerprint(c));
        if !diffs.is_empty() {
            return Err(Error::usage(format!(
                "the checkpoint in {} is of another run, refusing to resume from it ({}); start afresh without --resume, or with another --checkpoint directory",
                c.dir.display(),
                diffs.join("; ")
            )));
        }
        if (header.rank, header.size, header.step) != (rank, size, step) {
            return Err(d.damaged(format!(
                "it is rank {} of {} at step {}, read as rank {rank} of {size} at step {step}",
                header.rank, header.size, header.step
            )));
        }
        self.load_state(&mut d, step)?;
        d.finish()
    }

    /// After step `self.step` (and its progress): writes a checkpoint when one is due or a
    /// signal asked for one, then stops the run with [`Error::Interrupted`] if a signal did.
    /// `finishing` is true when the run ends after this step anyway (then only a signal writes).
    pub(crate) fn after_step(&mut self, finishing: bool) -> Result<Option<Written>> {
        let cfg = self.cfg.clone();
        let Some(c) = cfg.checkpoint.as_ref() else {
            return Ok(None);
        };
        let world = self.world();
        let signal = super::stop_requested();
        let timed_out = match c.every {
            Every::Time(period) => {
                world.comm.is_leader() && self.last_checkpoint.elapsed() >= period
            }
            Every::Steps(_) => false,
        };
        let mut flags = [signal.is_some() as u8 as f64, timed_out as u8 as f64];
        world.all_reduce_sum(&mut flags)?;
        let signalled = flags[0] > 0.0;
        let due = match c.every {
            Every::Steps(n) => self.step % n == 0,
            Every::Time(_) => flags[1] > 0.0,
        };
        let written = if signalled || (due && !finishing) {
            Some(self.write_checkpoint(c)?)
        } else {
            None
        };
        if signalled {
            // The signal this rank received, or the one that reached another rank (reported as
            // SIGTERM, which is what launchers forward).
            let sig = signal.unwrap_or(libc::SIGTERM);
            let w = written.as_ref().expect("written when signalled");
            return Err(Error::Interrupted {
                signal: sig,
                name: signal_name(sig),
                step: self.step,
                detail: format!(
                    "wrote the checkpoint {}; the same command with --resume continues from it",
                    w.dir.display()
                ),
            });
        }
        Ok(written)
    }

    /// Every rank writes its file of this step; once all have, each removes its older ones.
    fn write_checkpoint(&mut self, c: &Checkpointing) -> Result<Written> {
        let started = Instant::now();
        let step = self.step;
        let _label = crate::comm::context(format!("step {step}: writing the checkpoint"));
        let (rank, size) = (self.topo.world.rank(), self.topo.world.size());
        let fp = self.full_fingerprint(c);
        let bytes = super::write_rank_file(&c.dir, step, rank, |e| self.save_state(e, &fp));
        let previous = self.checkpointed;
        let world = self.world();
        let bytes = commit_step(&c.dir, step, rank, previous, bytes, |r| world.agree(r))?;
        world.agree(super::prune(&c.dir, rank, step))?;
        let mut sizes = vec![0.0; size];
        sizes[rank] = bytes as f64;
        world.all_reduce_sum(&mut sizes)?;
        self.last_checkpoint = Instant::now();
        self.checkpointed = Some(step);
        Ok(Written {
            step,
            dir: super::step_dir(&c.dir, step),
            largest_bytes: sizes.iter().fold(0.0f64, |a, &b| a.max(b)) as u64,
            total_bytes: sizes.iter().sum::<f64>() as u64,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The ranks agree on their writes of `step` (`local`: this rank's size or error) through
/// `agree`; if any rank failed, every rank removes its files of the step and the step directory
/// ([`super::discard_step`]) and returns the error with what remains resumable (`previous`).
fn commit_step(
    dir: &std::path::Path,
    step: usize,
    rank: usize,
    previous: Option<usize>,
    local: Result<u64>,
    agree: impl FnOnce(Result<u64>) -> Result<u64>,
) -> Result<u64> {
    agree(local).map_err(|e| {
        super::discard_step(dir, step, rank);
        super::write_failed(dir, step, previous, e)
    })
}

/// The step to resume from, given each rank's complete steps (rank order): none when no rank has
/// one, else the latest every rank has; an error when some ranks have files and others none, or
/// no step is complete on all.
fn choose_step(dir: &std::path::Path, lists: &[Vec<u64>]) -> Result<Option<usize>> {
    if lists.iter().all(|l| l.is_empty()) {
        return Ok(None);
    }
    if let Some(r) = lists.iter().position(|l| l.is_empty()) {
        let (w, l) = lists
            .iter()
            .enumerate()
            .find(|(_, l)| !l.is_empty())
            .expect("some rank has steps");
        return Err(Error::usage(format!(
            "rank {r} finds no checkpoint in {} while rank {w} finds step {}: the checkpoint was written by another number of ranks, or {} is not the same directory on every rank",
            dir.display(),
            l.last().expect("not empty"),
            dir.display()
        )));
    }
    let common = lists[0]
        .iter()
        .rev()
        .find(|s| lists.iter().all(|l| l.contains(s)));
    match common {
        Some(&s) => Ok(Some(s as usize)),
        None => Err(Error::data(format!(
            "no checkpoint in {} is complete on every rank (latest per rank: {})",
            dir.display(),
            lists
                .iter()
                .map(|l| l.last().map_or("none".into(), |s| s.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{choose_step, commit_step};
    use crate::comm::{agree, threads::run_world, Communicator};
    use crate::engine::checkpoint::{complete_steps, step_dir, write_rank_file};
    use crate::Error;
    use std::path::Path;

    #[test]
    fn a_write_that_fails_on_one_rank_removes_the_step_on_every_rank() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        let results = run_world(3, |w| {
            let rank = w.rank();
            let write = |step: usize, fail: bool| {
                write_rank_file(&ck, step, rank, |e| {
                    e.u64(step as u64)?;
                    if fail {
                        return Err(Error::data("No space left on device (simulated)"));
                    }
                    Ok(())
                })
            };
            commit_step(&ck, 4, rank, None, write(4, false), |r| agree(w, r)).unwrap();
            // Step 8: rank 1's disk is full; ranks 0 and 2 have written theirs.
            let local = write(8, rank == 1);
            w.barrier().unwrap();
            let r = commit_step(&ck, 8, rank, Some(4), local, |r| agree(w, r));
            r.unwrap_err().to_string()
        });
        for (rank, e) in results.iter().enumerate() {
            assert!(
                e.contains("No space left on device (simulated)")
                    && e.contains("writing the checkpoint of step 8 failed")
                    && e.contains("the checkpoint of step 4")
                    && e.contains("--resume continues from it"),
                "rank {rank}: {e}"
            );
        }
        assert!(results[0].contains("rank 1 failed"), "{}", results[0]);
        assert!(!step_dir(&ck, 8).exists());
        for rank in 0..3 {
            assert_eq!(complete_steps(&ck, rank), vec![4]);
        }
        // Without an earlier checkpoint the error says --resume would start afresh.
        let e = commit_step(&ck, 2, 0, None, Err(Error::data("EFBIG")), |r| r).unwrap_err();
        assert!(
            e.to_string().contains("no earlier complete checkpoint"),
            "{e}"
        );
    }

    #[test]
    fn resumes_from_the_latest_step_every_rank_holds() {
        let d = Path::new("ck");
        assert_eq!(choose_step(d, &[vec![], vec![]]).unwrap(), None);
        assert_eq!(choose_step(d, &[vec![4, 6], vec![4]]).unwrap(), Some(4));
        assert_eq!(choose_step(d, &[vec![6], vec![6]]).unwrap(), Some(6));
        let e = choose_step(d, &[vec![6], vec![]]).unwrap_err().to_string();
        assert!(e.contains("rank 1 finds no checkpoint"), "{e}");
        assert!(choose_step(d, &[vec![4], vec![6]]).is_err());
    }
}

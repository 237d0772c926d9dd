//! The read phase: which passes of a step a replica reads, and how they flow through the stages.
//!
//! A step's units are cut into passes ([`passes_of_step`]), dealt round-robin to the `dp`
//! replicas. Each replica's passes flow through its chain of stages: stage `s` receives a pass's
//! hidden state from the same replica of stage `s − 1`, runs its blocks, accumulates its inputs
//! and sends its own hidden state on, then takes the next pass, so that stages work on
//! different passes at once (GPipe's fill and drain). A stage whose inputs and later stages'
//! inputs are all done is left out; the last stage that any input needs stops after its last
//! needed block. Sources whose stages read on their own (shards, synthetic data) send nothing.
//!
//! Every receive has its send on every path: a stage that fails on a pass still receives the
//! step's later passes and passes the failure on in place of a hidden state, so every rank
//! reaches the step's agreement, which names the failing rank.

use super::accounting::Wire;
use super::Engine;
use crate::comm::topology::Topology;
use crate::source::{Sink, Source};
use crate::{Error, Result};
use std::time::{Duration, Instant};

/// The passes of global step `step` that `replica` of `replicas` reads: the step's units
/// `[step·batch, (step+1)·batch)` cut into runs of `pass` consecutive units, pass `j` (numbered
/// across steps) going to replica `j mod replicas`; the cut never depends on the grid. With
/// `pass = 1` replica `p` reads the units `u ≡ p (mod replicas)`.
pub fn passes_of_step(
    step: usize,
    batch: usize,
    pass: usize,
    units: usize,
    replica: usize,
    replicas: usize,
) -> Vec<Vec<usize>> {
    let start = step.saturating_mul(batch).min(units);
    let end = start.saturating_add(batch).min(units);
    let pass = pass.max(1);
    let first = step.saturating_mul(passes_per_step(batch, pass));
    (start..end)
        .step_by(pass)
        .enumerate()
        .filter(|(i, _)| (first + i) % replicas == replica)
        .map(|(_, p)| (p..(p + pass).min(end)).collect())
        .collect()
}

/// Passes per step: replicas beyond this count have nothing to read.
pub fn passes_per_step(batch: usize, pass: usize) -> usize {
    batch.div_ceil(pass.max(1))
}

/// Reads `passes` through this rank's stage for the inputs `wanted` selects (over the whole
/// catalog; `owner` gives each input's stage), handing this stage's rows to `sink`. Returns this
/// rank's own failure, if any, after every pass's messages have been exchanged.
pub fn pipeline(
    world: &Wire,
    topo: &Topology,
    owner: &[usize],
    source: &mut dyn Source,
    passes: &[Vec<usize>],
    wanted: &[bool],
    sink: &mut Sink<'_>,
) -> Result<()> {
    let stage = topo.stage;
    let mine: Vec<bool> = wanted
        .iter()
        .zip(owner)
        .map(|(&w, &o)| w && o == stage)
        .collect();
    let here = mine.contains(&true);
    if !source.pipelined() {
        if here {
            for pass in passes {
                source.read_stage(pass, &mine, None, false, sink)?;
            }
        }
        return Ok(());
    }
    let later = wanted.iter().zip(owner).any(|(&w, &o)| w && o > stage);
    let receive = stage > 0 && (here || later);
    let (prev, next) = (
        topo.rank_of(stage.saturating_sub(1), topo.replica),
        topo.rank_of(stage + 1, topo.replica),
    );
    // A GPU stage receives the previous stage's hidden states on its GPU.
    let gpu = source.device();
    let mut failed: Result<()> = Ok(());
    for pass in passes {
        let (input, upstream_ok) = if receive {
            let h = match world.recv_hidden(prev, gpu.as_ref()) {
                Ok(h) => h,
                // This rank could not put the hidden state on its GPU (its memory), after the
                // message was taken (through the host; with NCCL the sender's send is left to
                // the collective timeout): this pass fails here, the passes go on.
                Err(e @ Error::Device(_)) => {
                    if failed.is_ok() {
                        failed = Err(e);
                    }
                    None
                }
                Err(e) => return Err(e),
            };
            let ok = h.is_some();
            (h, ok)
        } else {
            (None, true)
        };
        let mut output = None;
        if failed.is_ok() && upstream_ok && (here || later) {
            match source.read_stage(pass, &mine, input, later, sink) {
                Ok(out) if later && out.is_none() => {
                    failed = Err(Error::Comm(format!(
                        "stage {stage} produced no hidden state for units {pass:?}"
                    )))
                }
                Ok(out) => output = out,
                Err(e) => failed = Err(e),
            }
        }
        if later {
            world.send_hidden(output.as_ref(), next)?;
        }
    }
    failed
}

impl Engine {
    /// Read: this replica's passes of the step through this rank's stage, accumulating the
    /// stage's accumulating inputs. Forward, statistics and waiting for the previous stage are
    /// timed apart.
    pub(super) fn read(&mut self, source: &mut dyn Source) -> Result<()> {
        let passes = passes_of_step(
            self.step,
            self.cfg.batch_size,
            source.pass_units(),
            self.units,
            self.topo.replica,
            self.topo.replicas,
        );
        let start = Instant::now();
        let comm_before = self.acct.time();
        let mut stat_time = Duration::ZERO;
        let world = Wire::new(&*self.topo.world, &self.acct);
        let (stats, decision) = (&mut self.stats, &self.decision);
        let result = pipeline(
            &world,
            &self.topo,
            &self.owner,
            source,
            &passes,
            &decision.accumulate,
            &mut |g, x| {
                let t = Instant::now();
                let r = match stats.local[g].as_mut() {
                    Some(s) => s.accumulate(x, &mut stats.workspace),
                    None => Err(Error::Comm(format!(
                        "the source delivered input {g}, which belongs to another stage"
                    ))),
                };
                stat_time += t.elapsed();
                r
            },
        );
        // A GPU's queued work drains here (its checks' verdict): counted as forward time.
        let result = self.settled(result);
        let waited = self.acct.time() - comm_before;
        self.times.forward += (start.elapsed() - stat_time - waited).as_secs_f64();
        self.times.statistics += stat_time.as_secs_f64();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::passes_of_step;

    #[test]
    fn every_grid_covers_each_step_exactly_once_in_the_same_passes() {
        for pass in 1..=4 {
            let one: Vec<Vec<usize>> = (0..4)
                .flat_map(|step| passes_of_step(step, 5, pass, 17, 0, 1))
                .collect();
            for size in 1..=5 {
                for step in 0..4 {
                    let mut all: Vec<usize> = (0..size)
                        .flat_map(|r| passes_of_step(step, 5, pass, 17, r, size))
                        .flatten()
                        .collect();
                    all.sort_unstable();
                    let want: Vec<usize> = (step * 5..((step + 1) * 5).min(17)).collect();
                    assert_eq!(all, want, "size {size}, step {step}, pass {pass}");
                }
                // The same passes, whichever replica reads them.
                let mut passes: Vec<Vec<usize>> = (0..4)
                    .flat_map(|step| {
                        (0..size).flat_map(move |r| passes_of_step(step, 5, pass, 17, r, size))
                    })
                    .collect();
                passes.sort();
                let mut want = one.clone();
                want.sort();
                assert_eq!(passes, want, "size {size}, pass {pass}");
            }
        }
        assert_eq!(passes_of_step(1, 4, 1, 10, 1, 2), vec![vec![5], vec![7]]);
        // Step 1 of batch 8 in passes of 3: global passes 3 ([8,9,10]), 4 ([11,12,13]), 5 ([14,15]).
        assert_eq!(
            passes_of_step(1, 8, 3, 20, 1, 2),
            vec![vec![8, 9, 10], vec![14, 15]]
        );
    }
}

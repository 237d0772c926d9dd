//! The step loop, on a grid of `dp` replicas × `pp` pipeline stages ([`crate::comm::topology`]). Every global
//! step, on every rank, five phases (and, when asked, a checkpoint):
//!
//! | phase | where | what |
//! |---|---|---|
//! | read ([`read`]) | each replica's chain of stages | this replica's passes of the step flow stage to stage (hidden states, point-to-point); each stage accumulates its accumulating inputs; the world agrees that no rank failed |
//! | reduce | each stage | one fused all-reduce of the stage's shared parts (counts, sums, sketches, small Grams) |
//! | solve ([`solve`]) | each stage | inputs under test are solved round-robin inside the stage, Grams that stay on their ranks through the stage leader's products; the stage leader tests convergence |
//! | decide | world | stage leaders send their estimates (ratios and convergence flags) to the global leader, which redistributes ranks over all layers and broadcasts one decision |
//! | checkpoint ([`checkpoint`]) | every rank, its own file | with `--checkpoint`: after the decision, when one is due or a signal asked for one, each rank writes its state; `--resume` restores it in [`Engine::new`] |
//! | finish ([`finish`]) | after the last step | final solves in the stages, the final allocation, `lora_A` from the stage leaders to rank 0, the adapter and report broadcast |
//!
//! [`Engine`] holds the run's state between steps; [`run`] drives it. Callers that produce layer
//! inputs themselves (rather than from a [`Source`]) can call [`Engine::accumulate`] and
//! [`Engine::end_step`].

pub mod accounting;
pub mod checkpoint;
pub mod external;
pub mod finish;
pub mod messages;
pub mod products;
pub mod read;
pub mod solve;

use crate::adapter::report::Report;
use crate::adapter::report::Times;
use crate::adapter::Adapter;
use crate::catalog::Catalog;
use crate::comm;
use crate::comm::codec::{Reader, Writer};
use crate::comm::topology::Topology;
use crate::config::RunConfig;
use crate::device::cuda::Cuda;
use crate::device::gpu::Gpu;
use crate::device::rows::Rows;
use crate::leader::{Decision, Leader, Precision, Tracker};
use crate::source::stages::Staged;
use crate::source::Source;
use crate::stats::{self, InputStats, Shared, Workspace};
use crate::{Error, Result};
use accounting::{Accounting, Wire};
use messages::Verdict;
use ndarray::Array2;
pub use read::{passes_of_step, passes_per_step};
use std::sync::Arc;
use std::time::Instant;

/// Progress after one global step (shown by the leader).
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps the data allows (or `--max-steps`, if smaller).
    pub total_steps: usize,
    /// Layers whose components are stable.
    pub converged_layers: usize,
    /// Target layers.
    pub layers: usize,
    /// Tokens accumulated so far (all ranks) by the input that has seen the most.
    pub tokens: u64,
    /// Tokens per second since the start.
    pub tokens_per_s: f64,
    /// The checkpoint written after this step, if one was (`--checkpoint`).
    pub checkpoint: Option<checkpoint::Written>,
}

/// The adapter and the report of a finished run (identical on every rank).
pub struct Outcome {
    pub adapter: Adapter,
    pub report: Report,
}

/// Why the step loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Every input's allocated components are stable.
    Converged,
    /// `--max-steps` reached.
    MaxSteps,
    /// The data ran out before convergence.
    DataExhausted,
    /// `--no-early-stop`: all data used once.
    AllData,
}

impl StopReason {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Converged => "converged",
            StopReason::MaxSteps => "max_steps",
            StopReason::DataExhausted => "data_exhausted",
            StopReason::AllData => "all_data",
        }
    }
}

/// This rank's statistics of its stage's inputs (`None` at the inputs of other stages).
pub struct Stats {
    /// What this rank accumulated.
    pub local: Vec<Option<InputStats>>,
    /// The stage's all-reduced part.
    pub shared: Vec<Option<Shared>>,
    /// The basis of this rank's previous solve of each input (warm start).
    pub warm: Vec<Option<Array2<f64>>>,
    workspace: Workspace,
}

impl Stats {
    /// The summed token count of an input of this stage (0 elsewhere).
    fn tokens(&self, g: usize) -> u64 {
        self.shared[g].as_ref().map_or(0, |s| s.moments.n)
    }
}

/// The state of a run between steps. It owns its topology (which shares the world with the
/// caller) and shares the run's configuration, so it can outlive the caller's frame.
pub struct Engine {
    cfg: Arc<RunConfig>,
    topo: Topology,
    acct: Accounting,
    catalog: Catalog,
    /// Stage of each unique input.
    owner: Vec<usize>,
    /// This stage's inputs, in catalog order.
    mine: Vec<usize>,
    /// How the stages were cut, for the report.
    split: Vec<String>,
    source_desc: String,
    units: usize,
    /// The global leader's state (used on world rank 0 only).
    leader: Leader,
    /// The stage leader's previous estimates (used on stage leaders only).
    tracker: Tracker,
    stats: Stats,
    decision: Decision,
    /// The final summaries of every input (global leader, after [`Engine::finish`]'s allocation).
    finals: Vec<crate::leader::Summary>,
    step: usize,
    times: Times,
    step_bytes: Vec<u64>,
    step_hidden: Vec<u64>,
    /// Collective and hidden-state bytes when the current step began.
    marks: (u64, u64),
    started: Instant,
    /// When the last checkpoint was written (or the run started).
    last_checkpoint: Instant,
    /// The step this run resumed from (`--resume`), if it did.
    resumed_from: Option<usize>,
    /// Tokens the leader's estimates held when the run resumed (0 otherwise).
    resumed_tokens: u64,
    /// The shift of each of this stage's inputs (empty elsewhere), kept for the rows' second
    /// moment ([`crate::stats::Moments::second_moment`]).
    references: Vec<Vec<f32>>,
    /// The latest checkpoint complete on every rank that this run wrote or resumed from (what
    /// a failed checkpoint leaves resumable).
    checkpointed: Option<usize>,
    /// The GPU the source computes on, whose queued finiteness checks [`Engine::settled`] reads.
    device: Option<Arc<Cuda>>,
}

/// A one-line description of the catalog, for checking that every rank sees the same layers.
fn fingerprint(catalog: &Catalog, units: usize, owner: &[usize]) -> String {
    let layers: Vec<String> = catalog
        .layers
        .iter()
        .map(|l| {
            format!(
                "{}:{}x{}@{}/{}",
                l.name, l.in_features, l.out_features, l.input, owner[l.input]
            )
        })
        .collect();
    format!("{units} units; {}", layers.join(","))
}

/// Fails unless every rank's source has the leader's layers, unit count and stage plan.
fn check_same_source(world: &Wire, catalog: &Catalog, units: usize, owner: &[usize]) -> Result<()> {
    let mine = fingerprint(catalog, units, owner);
    let mut leaders = mine.clone().into_bytes();
    world.broadcast(&mut leaders, 0)?;
    let local = if leaders == mine.as_bytes() {
        Ok(())
    } else {
        Err(Error::data(format!(
            "rank {} sees a different source than rank 0 (layers, stages or number of units differ): {} vs {}",
            world.comm.rank(),
            mine.chars().take(200).collect::<String>(),
            String::from_utf8_lossy(&leaders).chars().take(200).collect::<String>()
        )))
    };
    world.agree(local)
}

impl Engine {
    /// Sets up a run over `staged`'s source on the grid `topo` (its `owner` gives the stage of
    /// every unique input, its `split` describes the cut for the report). Collective over the
    /// world.
    pub fn new(staged: &mut Staged, topo: Topology, cfg: Arc<RunConfig>) -> Result<Self> {
        let started = Instant::now();
        let acct = Accounting::default();
        let source = staged.source.as_mut();
        let catalog = source.catalog().clone();
        let units = source.units();
        let owner = staged.owner.clone();
        // First collective: from here on every rank takes the same decisions on the same catalog.
        check_same_source(&Wire::new(&*topo.world, &acct), &catalog, units, &owner)?;
        let params = &cfg.eva;
        if let Some(l) = catalog
            .layers
            .iter()
            .find(|l| l.in_features < params.layer_rank(l.target()))
        {
            return Err(Error::usage(format!(
                "{} is larger than in_features = {} of layer {}",
                params.rank_phrase(params.layer_rank(l.target())),
                l.in_features,
                l.name
            )));
        }
        let leader = Leader::new(&catalog, params, !cfg.no_early_stop, cfg.refine_converged);
        let n = catalog.inputs.len();
        let mine: Vec<usize> = (0..n).filter(|&g| owner[g] == topo.stage).collect();
        let mut engine = Engine {
            cfg: Arc::clone(&cfg),
            acct,
            owner,
            mine,
            split: staged.split.clone(),
            source_desc: staged.desc.clone(),
            units,
            tracker: Tracker::new(n, params.tau),
            leader,
            stats: Stats {
                local: Vec::new(),
                shared: Vec::new(),
                warm: vec![None; n],
                workspace: Workspace::default(),
            },
            decision: Decision::first(n),
            finals: Vec::new(),
            step: 0,
            times: Times::default(),
            step_bytes: Vec::new(),
            step_hidden: Vec::new(),
            marks: (0, 0),
            started,
            last_checkpoint: started,
            resumed_from: None,
            resumed_tokens: 0,
            references: Vec::new(),
            checkpointed: None,
            device: source.device(),
            catalog,
            topo,
        };
        let refs = engine.reference_vectors(source)?;
        engine.references = refs.clone();
        // Statistics on a GPU can fail to fit on one rank only: agree before the first step.
        let init = engine.init_stats(refs);
        engine.world().agree(engine.in_stage(init))?;
        engine.resumed_from = engine.resume()?;
        engine.checkpointed = engine.resumed_from;
        engine.resumed_tokens = engine.tokens();
        engine.marks = (engine.acct.bytes(), engine.acct.hidden());
        Ok(engine)
    }

    /// Names this rank's stage in a local error, when there are several.
    fn in_stage<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| match self.topo.stages {
            1 => e,
            _ => Error::Stage {
                stage: self.topo.stage,
                slice: self.split[self.topo.stage].clone(),
                source: Box::new(e),
            },
        })
    }

    /// `local`, and the verdict of the finiteness checks this rank's GPU queued since the last
    /// one: the read phases end here, before the agreement that precedes every all-reduce and
    /// checkpoint, so rows that fail their check never reach either.
    fn settled(&self, local: Result<()>) -> Result<()> {
        let queued = self.device.as_ref().map_or(Ok(()), |g| g.settle_finite());
        local.and(queued)
    }

    fn world(&self) -> Wire<'_> {
        Wire::new(&*self.topo.world, &self.acct)
    }

    fn stage(&self) -> Wire<'_> {
        Wire::new(&*self.topo.stage_comm, &self.acct)
    }

    /// Candidate components of an input.
    fn kmax(&self, g: usize) -> usize {
        self.leader.kmax(g)
    }

    /// Column means of unit 0 for this stage's inputs, read by the stage leader (through the
    /// pipeline of replica 0) and broadcast in the stage: the shift that keeps the Gram free of
    /// cancellation (identical on every rank of the stage and on every grid, so sums stay
    /// additive and adapters grid-independent).
    fn reference_vectors(&self, source: &mut dyn Source) -> Result<Vec<Vec<f32>>> {
        let dims: Vec<usize> = self.catalog.inputs.iter().map(|i| i.dim).collect();
        let mut sums: Vec<Vec<f64>> = dims.iter().map(|&d| vec![0.0; d]).collect();
        let mut counts = vec![0usize; dims.len()];
        let passes = if self.topo.is_stage_leader() && self.units > 0 {
            vec![vec![0]]
        } else {
            Vec::new()
        };
        let all = vec![true; dims.len()];
        let world = self.world();
        let local = read::pipeline(
            &world,
            &self.topo,
            &self.owner,
            source,
            &passes,
            &all,
            &mut |g, x| {
                let x = x.to_host()?;
                counts[g] += x.nrows();
                for row in x.rows() {
                    for (s, &v) in sums[g].iter_mut().zip(row) {
                        *s += v as f64;
                    }
                }
                Ok(())
            },
        );
        world.agree(self.in_stage(self.settled(local)))?;
        let counts = &counts;
        let means: Vec<f32> = self
            .mine
            .iter()
            .flat_map(|&g| {
                sums[g].iter().map(move |v| {
                    if counts[g] > 0 {
                        (v / counts[g] as f64) as f32
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mut buf = Writer::default().f32s(&means).0.clone();
        self.stage().broadcast(&mut buf, 0)?;
        let values = Reader::new(&buf).f32s()?;
        let mut it = values.into_iter();
        Ok((0..dims.len())
            .map(|g| {
                if self.owner[g] == self.topo.stage {
                    it.by_ref().take(dims[g]).collect()
                } else {
                    Vec::new()
                }
            })
            .collect())
    }

    /// One exact or sketch statistic per input of this stage (per `stats::choose` over the
    /// stage's inputs), on the source's GPU if it has one, and its shared part.
    fn init_stats(&mut self, refs: Vec<Vec<f32>>) -> Result<()> {
        let cfg = Arc::clone(&self.cfg);
        let dims: Vec<usize> = self
            .mine
            .iter()
            .map(|&g| self.catalog.inputs[g].dim)
            .collect();
        let replicas = self.topo.replicas;
        let exact = stats::choose(cfg.estimator, &dims, cfg.stats_memory, replicas);
        let n = self.catalog.inputs.len();
        let mut local: Vec<Option<InputStats>> = (0..n).map(|_| None).collect();
        for ((&g, reference), &exact) in self
            .mine
            .iter()
            .zip(
                refs.into_iter()
                    .enumerate()
                    .filter(|(g, _)| self.owner[*g] == self.topo.stage)
                    .map(|(_, r)| r),
            )
            .zip(&exact)
        {
            let kmax = self.kmax(g);
            let name = &self.catalog.layers[self.catalog.representative(g)].name;
            let estimator = if exact {
                stats::Estimator::Exact
            } else {
                let k = cfg.sketch_size.unwrap_or_else(|| {
                    stats::default_sketch_size(kmax, self.catalog.inputs[g].dim)
                });
                if k < kmax {
                    return Err(Error::usage(format!("--sketch-size {k} is smaller than the {kmax} candidate components (round(rank x rho)) of layer {name}")));
                }
                stats::Estimator::Sketch {
                    k,
                    seed: cfg.seed,
                    stream: crate::rng::name_key(name),
                }
            };
            local[g] = Some(InputStats::new(reference, estimator, self.device.as_ref())?);
        }
        self.stats.shared = local
            .iter()
            .map(|s| s.as_ref().map(|s| s.empty_shared(replicas)))
            .collect();
        self.stats.local = local;
        Ok(())
    }

    /// Steps the data allows, or `--max-steps` if smaller.
    fn total_steps(&self) -> usize {
        let data_steps = self.units.div_ceil(self.cfg.batch_size);
        self.cfg.max_steps.map_or(data_steps, |m| m.min(data_steps))
    }

    /// Why the loop must stop before the next step, if it must (converged only after a resume
    /// from the checkpoint of the converging step: otherwise [`Engine::end_step`] says so).
    fn stop_before(&self) -> Option<StopReason> {
        if !self.cfg.no_early_stop && self.decision.all_done {
            return Some(StopReason::Converged);
        }
        if self.cfg.max_steps.is_some_and(|m| self.step >= m) {
            return Some(StopReason::MaxSteps);
        }
        if self.step >= self.units.div_ceil(self.cfg.batch_size) {
            return Some(if self.cfg.no_early_stop {
                StopReason::AllData
            } else {
                StopReason::DataExhausted
            });
        }
        None
    }

    /// Which inputs accumulate in the current step (all of the world's inputs; each rank only
    /// holds its stage's).
    pub fn accumulating(&self) -> &[bool] {
        &self.decision.accumulate
    }

    /// Adds rows of this stage's input `g` to this rank's statistics.
    pub fn accumulate(&mut self, g: usize, rows: Rows<'_>) -> Result<()> {
        match self.stats.local.get_mut(g) {
            Some(Some(s)) => s.accumulate(rows, &mut self.stats.workspace),
            _ => Err(Error::Comm(format!(
                "input {g} does not belong to stage {} of this rank",
                self.topo.stage
            ))),
        }
    }

    /// Runs one global step over `source`: read, then [`Engine::end_step`]. Returns why the run
    /// stops, if it does.
    pub fn step(
        &mut self,
        source: &mut dyn Source,
        on_step: &mut dyn FnMut(&StepInfo),
    ) -> Result<Option<StopReason>> {
        if let Some(stop) = self.stop_before() {
            return Ok(Some(stop));
        }
        let _label = comm::context(format!(
            "step {}: reading (stage {}, pipeline messages and the agreement after it)",
            self.step + 1,
            self.topo.stage
        ));
        let read = self.read(source);
        let read = self.in_stage(read);
        self.world().agree(read)?;
        self.end_step(on_step)
    }

    /// The rest of a step once every rank has accumulated its data: reduce within the stages,
    /// solve and test, decide, and (`--checkpoint`) write a checkpoint when one is due. Returns
    /// `Converged` when every input is done (early stopping), and [`Error::Interrupted`] after
    /// the checkpoint that a signal asked for.
    pub fn end_step(&mut self, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Option<StopReason>> {
        self.step += 1;
        let (step, stage) = (self.step, self.topo.stage);
        let label = |what: &str| comm::context(format!("step {step}: {what} (stage {stage})"));
        let reduce = label("fused all-reduce of the statistics");
        self.reduce()?;
        drop(reduce);
        let leader_start = Instant::now();
        let comm_before = self.acct.time();
        let solve = label("solves and products");
        let estimates = self.test();
        let estimates = self.in_stage(estimates);
        let estimates = self.world().agree(estimates)?;
        drop(solve);
        let _decide = label("estimates to the leader and its decision");
        self.decide(estimates)?;
        self.times.leader +=
            (leader_start.elapsed() - (self.acct.time() - comm_before)).as_secs_f64();
        drop(_decide);
        let marks = (self.acct.bytes(), self.acct.hidden());
        self.step_bytes.push(marks.0 - self.marks.0);
        self.step_hidden.push(marks.1 - self.marks.1);
        self.marks = marks;
        let stop =
            (!self.cfg.no_early_stop && self.decision.all_done).then_some(StopReason::Converged);
        let written = self.after_step(stop.is_some() || self.stop_before().is_some())?;
        if self.topo.world.is_leader() {
            on_step(&StepInfo {
                checkpoint: written,
                ..self.progress()
            });
        }
        Ok(stop)
    }

    /// Reduce: one fused all-reduce, within the stage, of the shared parts of its accumulating
    /// inputs.
    fn reduce(&mut self) -> Result<()> {
        let accumulated: Vec<usize> = self
            .mine
            .iter()
            .copied()
            .filter(|&g| self.decision.accumulate[g])
            .collect();
        let (local, shared) = (&mut self.stats.local, &self.stats.shared);
        let mut parts: Vec<(&mut InputStats, &Shared)> = local
            .iter_mut()
            .zip(shared)
            .enumerate()
            .filter(|(g, _)| accumulated.binary_search(g).is_ok())
            .map(|(_, (l, s))| {
                (
                    l.as_mut().expect("a stage input has statistics"),
                    s.as_ref().expect("and a shared part"),
                )
            })
            .collect();
        let packed = stats::Packed::of(&mut parts);
        let packed = self.in_stage(packed);
        let buf = Wire::new(&*self.topo.stage_comm, &self.acct).all_reduce_packed(packed)?;
        let mut rest = &buf[..];
        for &g in &accumulated {
            rest = self.stats.shared[g]
                .as_mut()
                .expect("a stage input has a shared part")
                .unpack(rest);
        }
        Ok(())
    }

    /// Solve and test: this stage's inputs under test that hold enough tokens (PEFT skips batches
    /// with fewer tokens than components) are solved at step precision; the stage leader returns
    /// their estimates (ratios, convergence flags), the others nothing.
    fn test(&mut self) -> Result<Vec<(usize, crate::leader::Estimate)>> {
        let ready: Vec<usize> = self
            .mine
            .iter()
            .copied()
            .filter(|&g| self.decision.test[g] && self.stats.tokens(g) as usize > self.kmax(g))
            .collect();
        let spectra = self.solve(&ready, Precision::Step)?;
        spectra
            .into_iter()
            .map(|(g, s)| self.tracker.observe(g, s).map(|e| (g, e)))
            .collect()
    }

    /// Decide: the stage leaders' estimates reach the global leader, which allocates, decides
    /// and broadcasts the decision to every rank.
    fn decide(&mut self, estimates: Vec<(usize, crate::leader::Estimate)>) -> Result<()> {
        let parts = self.gather_at_leader(&messages::encode_estimates(&estimates))?;
        let world = Wire::new(&*self.topo.world, &self.acct);
        let next = if let Some(parts) = parts {
            let step = self.step;
            let leader = &mut self.leader;
            let work = parts.iter().try_for_each(|p| {
                for (g, e) in messages::decode_estimates(p)? {
                    leader.observe(g, e);
                }
                Ok(())
            });
            messages::announce(&world, work.map(|()| leader.decide(step)), |d| {
                Verdict::Decide(d.clone())
            })?
        } else {
            match messages::receive_verdict(&world)? {
                Verdict::Decide(d) => d,
                _ => {
                    return Err(Error::Comm(
                        "rank 0 sent something else than the step's decision".into(),
                    ))
                }
            }
        };
        let n = self.catalog.inputs.len();
        if next.accumulate.len() != n || next.test.len() != n {
            return Err(Error::Comm(format!(
                "decision names {} inputs, this rank has {n}",
                next.accumulate.len()
            )));
        }
        self.decision = next;
        Ok(())
    }

    /// Stage leaders send `msg` to the global leader, which gets every stage's in stage order
    /// (`Some` there, `None` on every other rank).
    fn gather_at_leader(&self, msg: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        if !self.topo.is_stage_leader() {
            return Ok(None);
        }
        Wire::new(&*self.topo.leaders, &self.acct).gather(msg, 0)
    }

    /// Progress for the leader's display.
    fn progress(&self) -> StepInfo {
        let converged_layers = self
            .catalog
            .layers
            .iter()
            .filter(|l| self.leader.states[l.input].done)
            .count();
        let tokens = self.tokens();
        let since_start = tokens.saturating_sub(self.resumed_tokens);
        StepInfo {
            step: self.step,
            total_steps: self.total_steps(),
            converged_layers,
            layers: self.catalog.layers.len(),
            tokens,
            tokens_per_s: since_start as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            checkpoint: None,
        }
    }

    /// Tokens held by the input that has seen the most, by the leader's estimates.
    fn tokens(&self) -> u64 {
        self.leader
            .states
            .iter()
            .map(|s| s.tokens)
            .max()
            .unwrap_or(0)
    }
}

/// Runs EVA over `staged`'s source on the grid `topo` (see [`Engine::new`]); returns the same
/// adapter and report on every rank.
pub fn run(
    staged: &mut Staged,
    topo: Topology,
    cfg: Arc<RunConfig>,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Outcome> {
    let mut engine = Engine::new(staged, topo, cfg)?;
    let stop = loop {
        if let Some(stop) = engine.step(staged.source.as_mut(), on_step)? {
            break stop;
        }
    };
    engine.finish(stop)
}

//! `eva init`: validates the arguments into a plan (`config::validate`), opens the plan's source,
//! runs the engine and writes the adapter.

use super::progress::Progress;
use super::InitArgs;
use crate::adapter::write::{self, CARD_FILE, CONFIG_FILE, REPORT_FILE, SVG_FILE, WEIGHTS_FILE};
use crate::adapter::{card, svg};
use crate::catalog::Catalog;
use crate::comm::threads::ThreadWorld;
use crate::comm::topology::{self, Topology};
use crate::comm::{self, agree, launcher, Communicator};
use crate::config::validate::{parse_rank_pattern, Collectives, Device, Input, Options, Plan};
use crate::config::{self, EstimatorChoice, RunConfig};
use crate::device::gpu::Gpu;
use crate::engine::checkpoint;
use crate::leader::allocate;
use crate::log::say;
use crate::model::Model;
use crate::source::model::{ModelOptions, ModelSource};
use crate::source::shards::ShardSource;
use crate::source::stages::{self, Staged};
use crate::source::synthetic::SyntheticSource;
use crate::source::synthetic::SyntheticSpec;
use crate::source::{Source, Targeted};
use crate::{engine, linalg, stats, Error, Result};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// The command line as plain [`Options`] (`--rank-pattern`'s `NAME=R` entries parsed).
fn options(args: &InitArgs) -> Result<Options> {
    Ok(Options {
        model: args.model.clone(),
        data: args.data.clone(),
        text_field: args.text_field.clone(),
        max_seq_len: args.max_seq_len,
        activations: args.activations.clone(),
        synthetic: args.synthetic.as_ref().map(|s| s.to_string()),
        targets: args.targets.clone(),
        device: args.device.into(),
        dtype: args.dtype.map(Into::into),
        rank: args.rank,
        rank_pattern: parse_rank_pattern(&args.rank_pattern)?,
        rho: args.rho,
        tau: args.tau,
        alpha: args.alpha,
        whiten: args.whiten,
        adjust_alpha: !args.no_adjust_alpha,
        use_label_mask: !args.no_label_mask,
        label_mask_value: -100,
        lora_dropout: args.lora_dropout,
        batch_size: args.batch_size,
        max_steps: args.max_steps,
        no_early_stop: args.no_early_stop,
        refine_converged: args.refine_converged,
        estimator: args.estimator.into(),
        sketch_size: args.sketch_size,
        stats_memory_gib: args.stats_memory,
        seed: args.seed,
        out: args.out.clone(),
        force: args.force,
        base_model: args.base_model.clone(),
        task_type: args.task_type.clone(),
        quiet: args.quiet,
        pp: args.pp,
        pp_split: args.pp_split.clone(),
        local_ranks: args.local_ranks,
        threads: args.threads,
        comm: args.comm.into(),
        collective_timeout_s: args.collective_timeout,
        checkpoint: args.checkpoint.clone(),
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
    })
}

/// Validates the command line ([`config::validate`]) and completes what only the model can say:
/// `base_model_name_or_path` and `task_type` default to the model directory's path and its
/// checkpoint's class.
pub fn plan(args: &InitArgs) -> Result<Plan> {
    let mut plan = config::validate(&options(args)?)?;
    if let Input::Model(m) = &plan.source.input {
        let run = &mut plan.run;
        run.base_model = run
            .base_model
            .take()
            .or_else(|| Some(super::inspect::model_name(&m.dir)));
        if run.task_type.is_none() {
            run.task_type = super::inspect::task_type(&m.dir);
        }
    }
    Ok(plan)
}

/// The GPU a rank computes on with `--device cuda`: its rank on this node modulo the GPUs the
/// node has, as `--comm nccl` picks it; `None` on the CPU.
fn device_options(
    device: Device,
    node_rank: usize,
) -> Result<Option<crate::device::gpu::CudaOptions>> {
    let Device::Cuda { dtype } = device else {
        return Ok(None);
    };
    Ok(Some(crate::device::gpu::CudaOptions {
        ordinal: node_rank % crate::device::cuda::device_count()?,
        dtype,
        slice: String::new(),
    }))
}

/// Opens the plan's source for `stage` of the grid's stages, restricted to its targets: a model
/// loads only that stage's blocks (on GPU `node_rank mod devices` with `--device cuda`); other
/// sources read only that stage's inputs.
pub fn open_source(plan: &Plan, stage: usize, replicas: usize, node_rank: usize) -> Result<Staged> {
    let (cfg, stages) = (&plan.run, plan.grid.pp);
    let targets = plan.source.targets.as_deref();
    let targeted = |source: Box<dyn Source>| -> Result<Box<dyn Source>> {
        match targets {
            Some(t) => Ok(Box::new(Targeted::new(source, t)?)),
            None => Ok(source),
        }
    };
    let (source, desc): (Box<dyn Source>, String) = match &plan.source.input {
        Input::Model(m) => {
            let model = Model::open(&m.dir)?;
            let memory = stages::block_memory(&model, targets, |d| statistics_bytes(cfg, d));
            let blocks =
                stages::model_blocks(&model, stages, plan.grid.pp_split.as_deref(), memory)?;
            let block: std::collections::HashMap<String, usize> = model
                .modules()
                .iter()
                .map(|m| (m.name.clone(), m.layer))
                .collect();
            let block_of = move |name: &str| block.get(name).copied();
            let opts = ModelOptions {
                text_field: m.text_field.clone(),
                max_seq_len: m.max_seq_len,
                use_label_mask: cfg.eva.use_label_mask,
            };
            let source = targeted(Box::new(ModelSource::open_on(
                model,
                &m.data,
                &opts,
                blocks[stage].clone(),
                device_options(plan.device, node_rank)?,
            )?))?;
            let owner = stages::owners_by_block(source.catalog(), block_of, &blocks)?;
            let split = blocks
                .iter()
                .map(|r| format!("blocks {}..{}", r.start, r.end))
                .collect();
            return Ok(Staged {
                source,
                desc: format!("model:{} data:{}", m.dir.display(), m.data.display()),
                owner,
                split,
            });
        }
        Input::Activations(dir) => (
            Box::new(ShardSource::open(dir)?),
            format!("activations:{}", dir.display()),
        ),
        Input::Synthetic(spec) => {
            let spec: SyntheticSpec = spec.parse().map_err(Error::usage)?;
            let desc = format!("synthetic:{spec}");
            (Box::new(SyntheticSource::new(spec)?), desc)
        }
        Input::Caller => {
            return Err(Error::usage(
                "one of --model with --data, --activations or --synthetic is required",
            ))
        }
    };
    let source = targeted(source)?;
    let catalog = source.catalog();
    let caps = allocate::caps(catalog, &cfg.eva);
    let memory = |g: usize| {
        let d = catalog.inputs[g].dim;
        let sketch = cfg.sketch_size.unwrap_or_else(|| {
            stats::default_sketch_size(allocate::input_cap(catalog, &caps, g), d)
        });
        stats::memory_bytes(
            cfg.estimator != EstimatorChoice::Sketch,
            d,
            sketch,
            replicas,
        )
    };
    let owner = stages::owners_by_memory(catalog, memory, stages)?;
    let split = (0..stages)
        .map(|s| {
            let inputs: Vec<usize> = (0..owner.len()).filter(|&g| owner[g] == s).collect();
            format!(
                "inputs {}..{}",
                inputs.first().copied().unwrap_or(0),
                inputs.last().map_or(0, |g| g + 1)
            )
        })
        .collect();
    Ok(Staged {
        source,
        desc,
        owner,
        split,
    })
}

/// Statistics bytes of one input of dimension `d`, as the stages are balanced: exact unless
/// `--estimator sketch`, on one replica (so that the split does not depend on `dp`).
fn statistics_bytes(cfg: &RunConfig, d: usize) -> u64 {
    let kmax = cfg.eva.most_components().min(d);
    let sketch = cfg
        .sketch_size
        .unwrap_or_else(|| stats::default_sketch_size(kmax, d));
    stats::memory_bytes(cfg.estimator != EstimatorChoice::Sketch, d, sketch, 1)
}

/// Runs `eva init`: in a world of one, as N thread ranks (`--local-ranks`), or as one rank of the
/// world a launcher started.
pub fn run(args: &InitArgs) -> Result<()> {
    let plan = plan(args)?;
    // `--device cuda` is checked before any work: a build without the `cuda` feature, or a
    // machine without the driver, a GPU, NVRTC or cuBLAS, is an exit code 2 naming what is
    // missing and where it was looked for.
    if let Device::Cuda { .. } = plan.device {
        crate::device::cuda::available()?;
    }
    // Operations (docs/operations.md): signals, and what a timed-out collective does.
    if plan.run.checkpoint.is_some() {
        checkpoint::arm();
    }
    super::signals::install();
    comm::watchdog::set_abort_hook(|| {
        drop(write::remove_staged());
        checkpoint::owner::release_claimed();
    });
    comm::set_collective_timeout(plan.ops.collective_timeout);
    let launch = launcher::detect();
    let threads = |ranks: usize| {
        plan.grid
            .threads
            .unwrap_or_else(|| launcher::cores_per_rank(ranks))
    };
    let local_ranks = plan.grid.local_ranks;
    if local_ranks > 1 {
        if launch.is_some() {
            return Err(config::validate::thread_world_conflict());
        }
        linalg::set_threads(threads(local_ranks));
        let worlds = ThreadWorld::create(local_ranks);
        let plan = &plan;
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| s.spawn(move || run_rank(thread_rank(w, plan)?, plan, args)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Comm("a rank thread panicked".into())))
                })
                .collect()
        });
        // Ranks agree on failures: rank 0's result speaks for the job.
        return results.into_iter().next().unwrap_or(Ok(()));
    }
    let comm: Rc<dyn Communicator> = comm::connect(plan.grid.comm)?.into();
    linalg::set_threads(threads(launch.map_or(1, |l| l.local_size)));
    run_rank(comm.clone(), &plan, args).map_err(|e| {
        if comm.size() > 1 {
            Error::Rank {
                rank: comm.rank(),
                source: Box::new(e),
            }
        } else {
            e
        }
    })
}

/// A thread rank's world: the thread world itself, or NCCL between the thread ranks
/// (`--comm nccl`, each on its own GPU).
fn thread_rank(w: ThreadWorld, plan: &Plan) -> Result<Rc<dyn Communicator>> {
    Ok(match plan.grid.comm {
        Collectives::Nccl => Rc::new(comm::NcclWorld::over_threads(w)?),
        _ => Rc::new(w),
    })
}

/// One rank's share of `eva init`; only the leader writes, and every rank returns its verdict.
/// `args` serves the checkpoint fingerprint only (`fingerprint::of`, which still reads the
/// command line); everything else comes from the validated `plan`.
fn run_rank(world: Rc<dyn Communicator>, plan: &Plan, args: &InitArgs) -> Result<()> {
    let comm = &*world;
    let cfg = &plan.run;
    let leader = comm.is_leader();
    // Fail fast: the leader makes --out's temporary directory before any work.
    let staging = agree(
        comm,
        if leader {
            write::prepare(&cfg.out, cfg.force).map(Some)
        } else {
            Ok(None)
        },
    )?;
    if let Some(s) = staging.as_ref().filter(|_| !cfg.quiet) {
        for d in &s.removed_stale {
            say(&format!(
                "[eva] removed {}, the temporary output of an eva process that no longer runs",
                d.display()
            ));
        }
    }
    // The checkpoint directory, the ranks' agreement on the run's fingerprint, and rank 0's
    // hold on the directory for this run (`startup`), before the source is opened.
    let mut cfg = cfg.clone();
    let startup = super::startup::run(comm, args, &mut cfg)?;
    let cfg = Arc::new(cfg);
    let pp = plan.grid.pp;
    agree(comm, topology::check_grid(comm.size(), pp))?;
    let topo = Topology::new(world.clone(), pp)?;
    let (stage, replicas) = (topo.stage, topo.replicas);
    // The rank's place on its node: thread ranks (`--local-ranks`) are one node's ranks; a
    // launcher's say theirs. Each takes its own GPU with `--device cuda`.
    let node_rank = if plan.grid.local_ranks > 1 {
        comm.rank()
    } else {
        launcher::detect().map_or(0, |l| l.local_rank)
    };
    let mut staged = agree(comm, open_source(plan, stage, replicas, node_rank))?;
    let source = &staged.source;
    if let (Some(gpu), false) = (source.device(), cfg.quiet) {
        // Which GPU each rank computes on (thread ranks too: GPU `rank mod devices`).
        say(&format!("[eva] rank {}: {}", comm.rank(), gpu.describe()));
    }
    agree(comm, super::tokens::check_reachable(source.as_ref(), &cfg))?;
    let passes = engine::passes_per_step(cfg.batch_size, source.pass_units());
    if leader && replicas > passes {
        say(&format!(
            "eva: warning: a step of --batch-size {} has {passes} passes of {} units, so {} of {replicas} data-parallel replicas have nothing to read; use --batch-size {} or more to keep every rank busy",
            cfg.batch_size,
            source.pass_units(),
            replicas - passes,
            replicas * source.pass_units()
        ));
    }
    if leader {
        warn_partly_sketched(&cfg, source.catalog(), &staged.owner, replicas);
    }
    let mut progress = Progress::new(cfg.quiet || !leader);
    let result = engine::run(&mut staged, topo, cfg.clone(), &mut |info| {
        progress.step(info)
    });
    progress.finish();
    let outcome = result?;
    let written = match staging {
        Some(staging) => write_outcome(&cfg, outcome, staging),
        None => Ok(()),
    };
    let done = agree(comm, written);
    if done.is_ok() {
        startup.succeeded();
    }
    done
}

/// Under `--estimator auto`, says which inputs do not fit `--stats-memory` and will be sketched
/// (their components are much less accurate), and what budget would make them all exact.
fn warn_partly_sketched(cfg: &RunConfig, catalog: &Catalog, owner: &[usize], world: usize) {
    if cfg.estimator != EstimatorChoice::Auto {
        return;
    }
    let stages = owner.iter().max().map_or(1, |s| s + 1);
    let dims: Vec<usize> = catalog.inputs.iter().map(|i| i.dim).collect();
    // Each stage chooses for its own inputs, within its ranks' budget.
    let mut exact = vec![false; dims.len()];
    for s in 0..stages {
        let ours: Vec<usize> = (0..dims.len()).filter(|&g| owner[g] == s).collect();
        let choice = stats::choose(
            cfg.estimator,
            &ours.iter().map(|&g| dims[g]).collect::<Vec<_>>(),
            cfg.stats_memory,
            world,
        );
        for (&g, e) in ours.iter().zip(choice) {
            exact[g] = e;
        }
    }
    let sketched = exact.iter().filter(|&&e| !e).count();
    if sketched == 0 {
        return;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let need: u64 = (0..stages)
        .map(|s| {
            (0..dims.len())
                .filter(|&g| owner[g] == s)
                .map(|g| stats::memory_bytes(true, dims[g], 0, world))
                .sum()
        })
        .max()
        .unwrap_or(0);
    say(&format!(
        "eva: warning: --stats-memory {:.3} GiB holds exact statistics for {} of {} inputs; the other {sketched} (d up to {}) use the Nystrom sketch, whose components are much less accurate; --stats-memory {:.3} (or --estimator exact) makes every input exact",
        gib(cfg.stats_memory),
        dims.len() - sketched,
        dims.len(),
        dims.iter().zip(&exact).filter(|(_, &e)| !e).map(|(&d, _)| d).max().unwrap_or(0),
        (gib(need) * 1000.0).ceil() / 1000.0
    ));
}

/// Writes the output directory and tells the user what happened.
fn write_outcome(
    cfg: &RunConfig,
    mut outcome: engine::Outcome,
    staging: write::Staging,
) -> Result<()> {
    let started = Instant::now();
    let weights = write::safetensors_bytes(&outcome.adapter)?;
    let config = serde_json::to_vec_pretty(&outcome.adapter.config).expect("JSON values serialize");
    let picture = svg::render(&outcome.report).into_bytes();
    let model_card = card::render(&outcome.report, &outcome.adapter.config).into_bytes();
    outcome.report.time_s.writing = started.elapsed().as_secs_f64();
    let report = serde_json::to_vec_pretty(&outcome.report).expect("report serializes");
    let files = [
        (WEIGHTS_FILE, weights),
        (CONFIG_FILE, config),
        (REPORT_FILE, report),
        (SVG_FILE, picture),
        (CARD_FILE, model_card),
    ];
    staging.commit(&files)?;

    let r = &outcome.report;
    if let Some(warning) = r.degenerate_warning() {
        say(&warning);
    }
    if !r.converged {
        say(&format!(
            "eva: warning: stopped ({}) after {} steps with {} of {} layers not converged; their components are the last estimates, marked converged_step = null in {}",
            r.stop_reason.replace('_', " "),
            r.steps,
            r.unconverged_layers.len(),
            r.layers.len(),
            REPORT_FILE
        ));
    }
    if !cfg.quiet {
        let kept = outcome.adapter.layers.len();
        let ranks: Vec<usize> = outcome.adapter.layers.iter().map(|l| l.rank).collect();
        say(&format!(
            "[eva] wrote {}: {kept} of {} layers (ranks {}..{}), {} steps, stop: {}, {} rank(s), {:.2} s",
            cfg.out.display(),
            r.layers.len(),
            ranks.iter().min().unwrap_or(&0),
            ranks.iter().max().unwrap_or(&0),
            r.steps,
            r.stop_reason,
            r.world_size,
            r.time_s.total + r.time_s.writing
        ));
    }
    Ok(())
}

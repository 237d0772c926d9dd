//! `eva init`: validates arguments, opens the source, runs the engine and writes the adapter.

use super::progress::{say, Progress};
use super::InitArgs;
use crate::adapter::write::{self, CARD_FILE, CONFIG_FILE, REPORT_FILE, SVG_FILE, WEIGHTS_FILE};
use crate::adapter::{card, svg};
use crate::comm::threads::ThreadWorld;
use crate::comm::{self, agree, launcher, Communicator};
use crate::config::{EstimatorChoice, EvaParams, RunConfig};
use crate::engine::checkpoint::{self, Checkpointing};
use crate::engine::topology::{self, Topology};
use crate::leader::allocate;
use crate::model::Model;
use crate::source::model::{ModelOptions, ModelSource};
use crate::source::shards::ShardSource;
use crate::source::synthetic::SyntheticSource;
use crate::source::{stages, Catalog, Source, Targeted};
use crate::{engine, linalg, stats, Error, Result};
use std::time::Instant;

/// `--rank-pattern`'s NAME=R entries, in order.
fn rank_pattern(entries: &[String]) -> Result<Vec<(String, usize)>> {
    entries
        .iter()
        .map(|e| {
            let parsed = e.split_once('=').and_then(|(name, r)| {
                let (name, r) = (name.trim(), r.trim().parse::<usize>().ok()?);
                (!name.is_empty() && r >= 1).then(|| (name.to_string(), r))
            });
            parsed.ok_or_else(|| {
                Error::usage(format!(
                    "--rank-pattern entries must be NAME=R with a module name and a rank of at least 1, found `{e}`"
                ))
            })
        })
        .collect()
}

/// Checks value ranges that clap's types cannot express.
pub fn validate(args: &InitArgs) -> Result<RunConfig> {
    let bad = |flag: &str, want: &str, found: String| {
        Err(Error::usage(format!(
            "{flag} must be {want}, found {found}"
        )))
    };
    if args.rank == 0 {
        return bad("--rank", "at least 1", args.rank.to_string());
    }
    if !(args.rho >= 1.0 && args.rho.is_finite()) {
        return bad("--rho", ">= 1", args.rho.to_string());
    }
    if !(0.0..=1.0).contains(&args.tau) {
        return bad("--tau", "in [0, 1]", args.tau.to_string());
    }
    if !(args.alpha > 0.0 && args.alpha.is_finite()) {
        return bad("--alpha", "a positive number", args.alpha.to_string());
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        return bad("--lora-dropout", "in [0, 1)", args.lora_dropout.to_string());
    }
    if args.batch_size == 0 {
        return bad("--batch-size", "at least 1", "0".into());
    }
    if args.max_steps == Some(0) {
        return bad("--max-steps", "at least 1", "0".into());
    }
    if args.sketch_size == Some(0) {
        return bad("--sketch-size", "at least 1", "0".into());
    }
    if !(args.stats_memory >= 0.0 && args.stats_memory.is_finite()) {
        return bad(
            "--stats-memory",
            "a non-negative number of GiB",
            args.stats_memory.to_string(),
        );
    }
    if !(args.collective_timeout >= 0.0 && args.collective_timeout.is_finite()) {
        return bad(
            "--collective-timeout",
            "a non-negative number of seconds (0 = off)",
            args.collective_timeout.to_string(),
        );
    }
    if let Some(t) = args
        .targets
        .as_ref()
        .and_then(|t| t.iter().find(|t| t.trim().is_empty()))
    {
        return bad(
            "--targets",
            "a comma-separated list of non-empty names",
            format!("`{t}`"),
        );
    }
    validate_device(args)?;
    Ok(RunConfig {
        eva: EvaParams {
            rank: args.rank,
            rank_pattern: rank_pattern(&args.rank_pattern)?,
            rho: args.rho,
            tau: args.tau,
            alpha: args.alpha,
            whiten: args.whiten,
            adjust_alpha: !args.no_adjust_alpha,
            use_label_mask: !args.no_label_mask,
            label_mask_value: -100,
            lora_dropout: args.lora_dropout,
        },
        batch_size: args.batch_size,
        max_steps: args.max_steps,
        no_early_stop: args.no_early_stop,
        refine_converged: args.refine_converged,
        estimator: args.estimator.into(),
        sketch_size: args.sketch_size,
        stats_memory: (args.stats_memory * (1u64 << 30) as f64) as u64,
        seed: args.seed,
        out: args.out.clone(),
        force: args.force,
        base_model: args
            .base_model
            .clone()
            .or_else(|| args.model.as_deref().map(super::inspect::model_name)),
        task_type: match (&args.task_type, &args.model) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(dir)) => super::inspect::task_type(dir),
            (None, None) => None,
        },
        quiet: args.quiet,
        checkpoint: args.checkpoint.as_ref().map(|dir| Checkpointing {
            dir: dir.clone(),
            every: args.checkpoint_every,
            resume: args.resume,
            // Filled in by `run_rank` once the directories are known to be writable.
            fingerprint: Vec::new(),
        }),
    })
}

/// `--device` and `--dtype`: a GPU runs the model's forward pass, so it needs `--model`; the
/// CPU has no `--dtype`. `--device cuda` is checked here, before any work: a build without the
/// `cuda` feature, or a machine without the driver, a GPU, NVRTC or cuBLAS, is an exit code 2
/// naming what is missing and where it was looked for.
fn validate_device(args: &InitArgs) -> Result<()> {
    match args.device {
        super::DeviceArg::Cpu => {
            if let Some(d) = args.dtype {
                let name = match d {
                    super::DTypeArg::Bf16 => "bf16",
                    super::DTypeArg::F32 => "f32",
                };
                return Err(Error::usage(format!(
                    "--dtype {name} applies to --device cuda; the CPU computes in f32"
                )));
            }
            Ok(())
        }
        super::DeviceArg::Cuda => {
            if args.model.is_none() {
                return Err(Error::usage("--device cuda runs the forward pass of --model; --activations and --synthetic are read on the CPU"));
            }
            crate::model::cuda::available()
        }
    }
}

/// The GPU a rank computes on with `--device cuda`: the node-local rank (from the launcher's
/// environment) modulo the GPUs it sees, as `--comm nccl` picks it; `None` on the CPU.
fn device_options(args: &InitArgs) -> Result<Option<crate::model::cuda::CudaOptions>> {
    if args.device != super::DeviceArg::Cuda {
        return Ok(None);
    }
    let local_rank = launcher::detect().map_or(0, |l| l.local_rank);
    Ok(Some(crate::model::cuda::CudaOptions {
        ordinal: local_rank % crate::model::cuda::device_count()?,
        dtype: args.dtype.unwrap_or(super::DTypeArg::Bf16).into(),
        slice: String::new(),
    }))
}

/// A source opened for one stage of the grid, with the stage of every unique input and a
/// description of the cut (for the report).
pub struct Opened {
    pub source: Box<dyn Source>,
    pub desc: String,
    pub owner: Vec<usize>,
    pub split: Vec<String>,
}

/// Opens the source named on the command line for `stage` of `stages`, restricted to
/// `--targets`: a model loads only that stage's blocks; other sources read only that stage's
/// inputs.
pub fn open_source(
    args: &InitArgs,
    cfg: &RunConfig,
    stage: usize,
    stages: usize,
    replicas: usize,
) -> Result<Opened> {
    let targeted = |source: Box<dyn Source>| -> Result<Box<dyn Source>> {
        match &args.targets {
            Some(t) => Ok(Box::new(Targeted::new(source, t)?)),
            None => Ok(source),
        }
    };
    if let (Some(dir), Some(data)) = (&args.model, &args.data) {
        let model = Model::open(dir)?;
        let memory = stages::block_memory(&model, args.targets.as_deref(), |d| {
            statistics_bytes(cfg, d)
        });
        let blocks = stages::model_blocks(&model, stages, args.pp_split.as_deref(), memory)?;
        let block: std::collections::HashMap<String, usize> = model
            .modules()
            .iter()
            .map(|m| (m.name.clone(), m.layer))
            .collect();
        let block_of = move |name: &str| block.get(name).copied();
        let opts = ModelOptions {
            text_field: args.text_field.clone(),
            max_seq_len: args.max_seq_len,
            use_label_mask: !args.no_label_mask,
        };
        let source = targeted(Box::new(ModelSource::open_on(
            model,
            data,
            &opts,
            blocks[stage].clone(),
            device_options(args)?,
        )?))?;
        let owner = stages::owners_by_block(source.catalog(), block_of, &blocks)?;
        let split = blocks
            .iter()
            .map(|r| format!("blocks {}..{}", r.start, r.end))
            .collect();
        return Ok(Opened {
            source,
            desc: format!("model:{} data:{}", dir.display(), data.display()),
            owner,
            split,
        });
    }
    let (source, desc): (Box<dyn Source>, String) = if let Some(dir) = &args.activations {
        (
            Box::new(ShardSource::open(dir)?),
            format!("activations:{}", dir.display()),
        )
    } else if let Some(spec) = &args.synthetic {
        (
            Box::new(SyntheticSource::new(spec.clone())?),
            format!("synthetic:{spec}"),
        )
    } else {
        return Err(Error::usage(
            "one of --model with --data, --activations or --synthetic is required",
        ));
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
    Ok(Opened {
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
    let cfg = validate(args)?;
    // Operations (docs/operations.md): signals, and what a timed-out collective does.
    if cfg.checkpoint.is_some() {
        checkpoint::arm();
    }
    super::signals::install();
    comm::watchdog::set_abort_hook(|| {
        drop(write::remove_staged());
        checkpoint::owner::release_claimed();
    });
    comm::set_collective_timeout(
        (args.collective_timeout > 0.0)
            .then(|| std::time::Duration::from_secs_f64(args.collective_timeout)),
    );
    let launch = launcher::detect();
    let threads = |ranks: usize| {
        if args.threads > 0 {
            args.threads
        } else {
            launcher::cores_per_rank(ranks)
        }
    };
    if args.local_ranks == 0 {
        return Err(Error::usage("--local-ranks must be at least 1, found 0"));
    }
    if args.local_ranks > 1 {
        if launch.is_some() || args.comm != super::CommArg::Auto {
            return Err(Error::usage("--local-ranks starts an in-process thread world; do not combine it with mpirun/srun or --comm"));
        }
        linalg::set_threads(threads(args.local_ranks));
        let worlds = ThreadWorld::create(args.local_ranks);
        let cfg = &cfg;
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| s.spawn(move || run_rank(&w, args, cfg)))
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
    let comm = comm::connect(args.comm.into())?;
    linalg::set_threads(threads(launch.map_or(1, |l| l.local_size)));
    run_rank(comm.as_ref(), args, &cfg).map_err(|e| {
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

/// One rank's share of `eva init`; only the leader writes, and every rank returns its verdict.
fn run_rank(comm: &dyn Communicator, args: &InitArgs, cfg: &RunConfig) -> Result<()> {
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
    let cfg = &cfg;
    agree(comm, topology::check_grid(comm.size(), args.pp))?;
    let topo = Topology::new(comm, args.pp)?;
    let (stage, replicas) = (topo.stage, topo.replicas);
    let opened = agree(comm, open_source(args, cfg, stage, args.pp, replicas))?;
    let Opened {
        mut source,
        desc,
        owner,
        split,
    } = opened;
    agree(comm, super::tokens::check_reachable(source.as_ref(), cfg))?;
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
        warn_partly_sketched(cfg, source.catalog(), &owner, replicas);
    }
    let mut progress = Progress::new(cfg.quiet || !leader);
    let result = engine::run(
        source.as_mut(),
        &desc,
        topo,
        owner,
        split,
        cfg,
        &mut |info| progress.step(info),
    );
    progress.finish();
    let outcome = result?;
    let written = match staging {
        Some(staging) => write_outcome(cfg, outcome, staging),
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

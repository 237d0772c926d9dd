//! The one validation of every front end: `eva init`'s flags, `eva inspect`'s and the Python
//! package's keyword options are put into [`Options`] (plain values as given, no clap) and
//! [`validate`] turns them into a [`Plan`]; nothing after it sees the raw values.
//!
//! | item | what |
//! |---|---|
//! | [`Options`] | every knob as given, with the library's defaults ([`Options::default`]) |
//! | [`validate`] | the ranges and combinations, one message per bad value (below) |
//! | [`Plan`] | the run settings ([`RunConfig`]), the source to open ([`SourcePlan`]), the grid ([`Grid`]), the operations ([`Operations`]), the device ([`Device`]) |
//! | [`parse_rank_pattern`] | `NAME=R` entries (the command line's spelling of `rank_pattern`) |
//!
//! Accepted ranges are PEFT's where PEFT checks the knob (`LoraConfig.r` >= 1 in
//! `peft/tuners/lora/layer.py`'s `update_layer`; `EvaConfig.rho` >= 1 and `EvaConfig.tau` in
//! [0, 1] in `peft/tuners/lora/config.py`'s `EvaConfig.__post_init__`, PEFT 0.21) and eva's own
//! elsewhere; NaN and infinities are refused everywhere. A message reads
//! `{flag} must be {range}, found {value} (Python: {name})`: one text for both front ends,
//! naming the `eva init` flag first (as it always has) and then where the Python package takes
//! the knob from; knobs that only the command line has name only the flag.

use super::{Checkpointing, EstimatorChoice, EvaParams, Every, RunConfig};
use crate::{Error, Result};
use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

/// Default statistics memory (`--stats-memory`, in GiB): exact statistics for every input of
/// models up to ~1B parameters (Qwen2.5-0.5B needs 5.0 GB, TinyLlama-1.1B 7.8 GB in a world of
/// one), where the sketch's components would be far less accurate.
pub const DEFAULT_STATS_MEMORY_GIB: f64 = 8.0;

/// [`DEFAULT_STATS_MEMORY_GIB`] in bytes (the Python package's `stats_memory` default).
pub const DEFAULT_STATS_MEMORY: u64 = (DEFAULT_STATS_MEMORY_GIB * GIB) as u64;

/// Bytes per GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// Where `--model` runs its forward pass, as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU (f32, the reference).
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
}

/// Storage of the weight matrices on a GPU (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DType {
    /// bfloat16 weight matrices, f32 accumulation and activations.
    #[default]
    Bf16,
    /// f32 weights: the CPU's numbers to rounding.
    F32,
}

impl DType {
    /// The `--dtype` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

/// Which collectives backend the world uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collectives {
    /// MPI when a launcher started the process, one process otherwise.
    Auto,
    /// MPI.
    Mpi,
    /// NCCL for the all-reduce, MPI for the rest.
    Nccl,
}

/// Every knob of a run as a front end was given it, before validation. [`Options::default`]
/// holds the library's defaults: [`EvaParams::default`]'s EVA knobs, eight units per step, the
/// automatic estimator within [`DEFAULT_STATS_MEMORY_GIB`], no source (the caller hands over
/// the layer inputs), the CPU, one rank, no collective timeout, no checkpoints.
#[derive(Clone, Debug)]
pub struct Options {
    /// A model directory (`--model`); read with `data`.
    pub model: Option<PathBuf>,
    /// The model's training examples (`--data`).
    pub data: Option<PathBuf>,
    /// The JSON key of the text in `.jsonl` data.
    pub text_field: Option<String>,
    /// Tokens per example.
    pub max_seq_len: usize,
    /// An activation-shard directory (`--activations`).
    pub activations: Option<PathBuf>,
    /// A synthetic source's spec (`--synthetic`), as text.
    pub synthetic: Option<String>,
    /// Target modules (`--targets`); `None` = every layer of the source.
    pub targets: Option<Vec<String>>,
    /// Where `model` runs its forward pass.
    pub device: DeviceKind,
    /// Weight storage on a GPU (`None` = bf16 there).
    pub dtype: Option<DType>,
    /// `LoraConfig.r`.
    pub rank: usize,
    /// `rank_pattern`: (module path or dotted suffix, rank) in order.
    pub rank_pattern: Vec<(String, usize)>,
    /// `EvaConfig.rho`.
    pub rho: f64,
    /// `EvaConfig.tau`.
    pub tau: f64,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `EvaConfig.whiten`.
    pub whiten: bool,
    /// `EvaConfig.adjust_scaling_factors`.
    pub adjust_alpha: bool,
    /// `EvaConfig.use_label_mask`.
    pub use_label_mask: bool,
    /// `EvaConfig.label_mask_value`.
    pub label_mask_value: i64,
    /// `lora_dropout`.
    pub lora_dropout: f64,
    /// Units per global step.
    pub batch_size: usize,
    /// A cap on the steps.
    pub max_steps: Option<usize>,
    /// Use all data once and ignore convergence.
    pub no_early_stop: bool,
    /// Done inputs keep accumulating until the run stops.
    pub refine_converged: bool,
    /// The statistic of each input.
    pub estimator: EstimatorChoice,
    /// Sketch columns per input (`None` = automatic).
    pub sketch_size: Option<usize>,
    /// Memory for exact Grams under the automatic estimator, in GiB (the Python package's bytes
    /// divided by 2³⁰: exact for any byte count below 2⁵³).
    pub stats_memory_gib: f64,
    /// Seed of the sketch's test matrices.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// Replace an existing output directory.
    pub force: bool,
    /// `base_model_name_or_path` (`None` = the model directory's path, where there is one).
    pub base_model: Option<String>,
    /// `task_type` (`None` = the checkpoint's, where there is one).
    pub task_type: Option<String>,
    /// Print only warnings and errors.
    pub quiet: bool,
    /// Pipeline stages.
    pub pp: usize,
    /// Blocks per pipeline stage.
    pub pp_split: Option<Vec<usize>>,
    /// Ranks run as threads of one process.
    pub local_ranks: usize,
    /// Threads per rank (0 = the node's cores divided among its ranks).
    pub threads: usize,
    /// The collectives backend.
    pub comm: Collectives,
    /// Seconds before a collective that does not complete aborts the job (0 = wait forever).
    pub collective_timeout_s: f64,
    /// Checkpoint directory.
    pub checkpoint: Option<PathBuf>,
    /// How often to checkpoint (with `checkpoint`).
    pub checkpoint_every: Every,
    /// Continue from the latest checkpoint (with `checkpoint`).
    pub resume: bool,
}

impl Default for Options {
    fn default() -> Self {
        let eva = EvaParams::default();
        Options {
            model: None,
            data: None,
            text_field: None,
            max_seq_len: 512,
            activations: None,
            synthetic: None,
            targets: None,
            device: DeviceKind::Cpu,
            dtype: None,
            rank: eva.rank,
            rank_pattern: eva.rank_pattern,
            rho: eva.rho,
            tau: eva.tau,
            alpha: eva.alpha,
            whiten: eva.whiten,
            adjust_alpha: eva.adjust_alpha,
            use_label_mask: eva.use_label_mask,
            label_mask_value: eva.label_mask_value,
            lora_dropout: eva.lora_dropout,
            batch_size: 8,
            max_steps: None,
            no_early_stop: false,
            refine_converged: false,
            estimator: EstimatorChoice::Auto,
            sketch_size: None,
            stats_memory_gib: DEFAULT_STATS_MEMORY_GIB,
            seed: 0,
            out: PathBuf::new(),
            force: false,
            base_model: None,
            task_type: None,
            quiet: false,
            pp: 1,
            pp_split: None,
            local_ranks: 1,
            threads: 0,
            comm: Collectives::Auto,
            collective_timeout_s: 0.0,
            checkpoint: None,
            checkpoint_every: Every::Time(Duration::from_secs(600)),
            resume: false,
        }
    }
}

/// A model run on text (`--model` with `--data`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInput {
    /// The model directory.
    pub dir: PathBuf,
    /// The training examples.
    pub data: PathBuf,
    /// The JSON key of the text in `.jsonl` data.
    pub text_field: Option<String>,
    /// Tokens per example.
    pub max_seq_len: usize,
}

/// Where the layer inputs come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A model's forward passes over text.
    Model(ModelInput),
    /// Activation shards in a directory.
    Activations(PathBuf),
    /// Generated activations; the spec as text (parsed by the synthetic source).
    Synthetic(String),
    /// None named: the caller hands over the layer inputs itself (the Python package's hooks).
    Caller,
}

/// The source to open.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcePlan {
    /// What to read.
    pub input: Input,
    /// Target modules (`None` = every layer of the source), each a non-empty name.
    pub targets: Option<Vec<String>>,
}

/// The grid of ranks and the threads of each.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Pipeline stages (checked against the world's size once it is known:
    /// `comm::topology::check_grid`).
    pub pp: usize,
    /// Blocks per pipeline stage (`None` = balanced by memory).
    pub pp_split: Option<Vec<usize>>,
    /// Ranks run as threads of this process (at least 1; more than 1 = an in-process world).
    pub local_ranks: usize,
    /// Threads per rank for the BLAS kernels (`None` = the node's cores divided among its ranks).
    pub threads: Option<usize>,
    /// The collectives backend.
    pub comm: Collectives,
}

/// How the job behaves when things go wrong. Checkpoints are in [`RunConfig::checkpoint`],
/// where the engine reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct Operations {
    /// A collective that does not complete within this aborts the job (`None` = wait forever).
    pub collective_timeout: Option<Duration>,
}

/// Where the model's forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// On the CPU.
    Cpu,
    /// On a GPU, weights stored as `dtype` (the machine is probed by the caller:
    /// `model::cuda::available`).
    Cuda { dtype: DType },
}

/// A validated run: what [`validate`] returns.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The run settings (engine, leader, adapter writer).
    pub run: RunConfig,
    /// The source to open.
    pub source: SourcePlan,
    /// The grid.
    pub grid: Grid,
    /// The operations.
    pub ops: Operations,
    /// The device.
    pub device: Device,
}

/// A knob as messages name it: its `eva init` flag, and where the Python package takes it from
/// (`None` for knobs only the command line has).
#[derive(Clone, Copy)]
struct Knob {
    flag: &'static str,
    python: Option<&'static str>,
}

const RANK: Knob = Knob {
    flag: "--rank",
    python: Some("LoraConfig.r"),
};
const RHO: Knob = Knob {
    flag: "--rho",
    python: Some("EvaConfig.rho"),
};
const TAU: Knob = Knob {
    flag: "--tau",
    python: Some("EvaConfig.tau"),
};
const ALPHA: Knob = Knob {
    flag: "--alpha",
    python: Some("LoraConfig.lora_alpha"),
};
const DROPOUT: Knob = Knob {
    flag: "--lora-dropout",
    python: Some("LoraConfig.lora_dropout"),
};
const BATCH_SIZE: Knob = Knob {
    flag: "--batch-size",
    python: Some("the data loader's batch size, summed over the ranks"),
};
const MAX_STEPS: Knob = Knob {
    flag: "--max-steps",
    python: Some("max_steps"),
};
const SKETCH_SIZE: Knob = Knob {
    flag: "--sketch-size",
    python: Some("sketch_size"),
};
const STATS_MEMORY: Knob = Knob {
    flag: "--stats-memory",
    python: Some("stats_memory, in bytes"),
};
const RANK_PATTERN: Knob = Knob {
    flag: "--rank-pattern",
    python: Some("LoraConfig.rank_pattern"),
};
const COLLECTIVE_TIMEOUT: Knob = Knob {
    flag: "--collective-timeout",
    python: None,
};
const TARGETS: Knob = Knob {
    flag: "--targets",
    python: None,
};
const LOCAL_RANKS: Knob = Knob {
    flag: "--local-ranks",
    python: None,
};

impl Knob {
    /// `message` followed by where Python takes the knob from.
    fn says(self, message: String) -> Error {
        Error::usage(match self.python {
            Some(name) => format!("{message} (Python: {name})"),
            None => message,
        })
    }

    /// `{flag} must be {want}, found {found} (Python: {name})`.
    fn out_of_range(self, want: &str, found: impl Display) -> Error {
        self.says(format!("{} must be {want}, found {found}", self.flag))
    }
}

/// The message of a bad `rank_pattern` entry, as the command line spells it (`NAME=R`).
fn bad_rank_pattern(entry: &str) -> Error {
    RANK_PATTERN.says(format!(
        "--rank-pattern entries must be NAME=R with a module name and a rank of at least 1, found `{entry}`"
    ))
}

/// `--rank-pattern`'s `NAME=R` entries as (name, rank) pairs, in order; [`validate`] checks the
/// names and ranks.
pub fn parse_rank_pattern(entries: &[String]) -> Result<Vec<(String, usize)>> {
    entries
        .iter()
        .map(|e| {
            e.split_once('=')
                .and_then(|(name, r)| Some((name.trim().to_string(), r.trim().parse().ok()?)))
                .ok_or_else(|| bad_rank_pattern(e))
        })
        .collect()
}

/// The message of an in-process thread world combined with another world.
pub fn thread_world_conflict() -> Error {
    Error::usage(
        "--local-ranks starts an in-process thread world; do not combine it with mpirun/srun or --comm mpi (--comm nccl runs NCCL between the thread ranks, one GPU each)",
    )
}

impl std::str::FromStr for EstimatorChoice {
    type Err = Error;

    /// `auto`, `exact` or `sketch` (the Python package's `estimator`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(EstimatorChoice::Auto),
            "exact" => Ok(EstimatorChoice::Exact),
            "sketch" => Ok(EstimatorChoice::Sketch),
            other => Err(Error::usage(format!(
                "estimator must be auto, exact or sketch, found {other}"
            ))),
        }
    }
}

/// Checks every knob's range and the combinations that cannot work, and returns the plan.
/// What needs the machine or the world is checked later, by whoever has them: the GPU probe
/// (`model::cuda::available`), `--pp` against the world's size, `--local-ranks` under a launcher.
pub fn validate(o: &Options) -> Result<Plan> {
    check_knobs(o)?;
    let device = device(o)?;
    check_world(o)?;
    Ok(Plan {
        run: run_config(o),
        source: SourcePlan {
            input: input(o),
            targets: o.targets.clone(),
        },
        grid: Grid {
            pp: o.pp,
            pp_split: o.pp_split.clone(),
            local_ranks: o.local_ranks,
            threads: (o.threads > 0).then_some(o.threads),
            comm: o.comm,
        },
        ops: Operations {
            collective_timeout: (o.collective_timeout_s > 0.0)
                .then(|| Duration::from_secs_f64(o.collective_timeout_s)),
        },
        device,
    })
}

/// The ranges of the EVA knobs, the run's sizes and budgets, and `--targets`.
fn check_knobs(o: &Options) -> Result<()> {
    if o.rank == 0 {
        return Err(RANK.out_of_range("at least 1", 0));
    }
    if !(o.rho >= 1.0 && o.rho.is_finite()) {
        return Err(RHO.out_of_range(">= 1", o.rho));
    }
    if !(0.0..=1.0).contains(&o.tau) {
        return Err(TAU.out_of_range("in [0, 1]", o.tau));
    }
    if !(o.alpha > 0.0 && o.alpha.is_finite()) {
        return Err(ALPHA.out_of_range("a positive number", o.alpha));
    }
    if !(0.0..1.0).contains(&o.lora_dropout) {
        return Err(DROPOUT.out_of_range("in [0, 1)", o.lora_dropout));
    }
    if o.batch_size == 0 {
        return Err(BATCH_SIZE.out_of_range("at least 1", 0));
    }
    if o.max_steps == Some(0) {
        return Err(MAX_STEPS.out_of_range("at least 1", 0));
    }
    if o.sketch_size == Some(0) {
        return Err(SKETCH_SIZE.out_of_range("at least 1", 0));
    }
    if !(o.stats_memory_gib >= 0.0 && o.stats_memory_gib.is_finite()) {
        return Err(STATS_MEMORY.out_of_range("a non-negative number of GiB", o.stats_memory_gib));
    }
    if !(o.collective_timeout_s >= 0.0 && o.collective_timeout_s.is_finite()) {
        return Err(COLLECTIVE_TIMEOUT.out_of_range(
            "a non-negative number of seconds (0 = off)",
            o.collective_timeout_s,
        ));
    }
    if let Some(t) = o
        .targets
        .as_ref()
        .and_then(|t| t.iter().find(|t| t.trim().is_empty()))
    {
        return Err(TARGETS.out_of_range(
            "a comma-separated list of non-empty names",
            format!("`{t}`"),
        ));
    }
    Ok(())
}

/// `--rank-pattern` entries and the thread world's combinations.
fn check_world(o: &Options) -> Result<()> {
    if let Some((name, r)) = o
        .rank_pattern
        .iter()
        .find(|(name, r)| name.trim().is_empty() || *r == 0)
    {
        return Err(bad_rank_pattern(&format!("{name}={r}")));
    }
    if o.local_ranks == 0 {
        return Err(LOCAL_RANKS.out_of_range("at least 1", 0));
    }
    if o.local_ranks > 1 && o.comm == Collectives::Mpi {
        return Err(thread_world_conflict());
    }
    Ok(())
}

/// Where the layer inputs come from.
fn input(o: &Options) -> Input {
    match (&o.model, &o.data, &o.activations, &o.synthetic) {
        (Some(dir), Some(data), _, _) => Input::Model(ModelInput {
            dir: dir.clone(),
            data: data.clone(),
            text_field: o.text_field.clone(),
            max_seq_len: o.max_seq_len,
        }),
        (_, _, Some(dir), _) => Input::Activations(dir.clone()),
        (_, _, _, Some(spec)) => Input::Synthetic(spec.clone()),
        _ => Input::Caller,
    }
}

/// The validated run settings (checkpoint fingerprint filled in later by the caller).
fn run_config(o: &Options) -> RunConfig {
    RunConfig {
        eva: EvaParams {
            rank: o.rank,
            rank_pattern: o
                .rank_pattern
                .iter()
                .map(|(name, r)| (name.trim().to_string(), *r))
                .collect(),
            rho: o.rho,
            tau: o.tau,
            alpha: o.alpha,
            whiten: o.whiten,
            adjust_alpha: o.adjust_alpha,
            use_label_mask: o.use_label_mask,
            label_mask_value: o.label_mask_value,
            lora_dropout: o.lora_dropout,
        },
        batch_size: o.batch_size,
        max_steps: o.max_steps,
        no_early_stop: o.no_early_stop,
        refine_converged: o.refine_converged,
        estimator: o.estimator,
        sketch_size: o.sketch_size,
        stats_memory: (o.stats_memory_gib * GIB) as u64,
        seed: o.seed,
        out: o.out.clone(),
        force: o.force,
        base_model: o.base_model.clone(),
        task_type: o.task_type.clone(),
        quiet: o.quiet,
        checkpoint: o.checkpoint.as_ref().map(|dir| Checkpointing {
            dir: dir.clone(),
            every: o.checkpoint_every,
            resume: o.resume,
            // Filled in by the caller once the directories are known to be writable.
            fingerprint: Vec::new(),
        }),
    }
}

/// `--device` and `--dtype`: a GPU runs the model's forward pass, so it needs `--model`; the
/// CPU has no `--dtype`.
fn device(o: &Options) -> Result<Device> {
    match o.device {
        DeviceKind::Cpu => match o.dtype {
            Some(d) => Err(Error::usage(format!(
                "--dtype {} applies to --device cuda; the CPU computes in f32",
                d.as_str()
            ))),
            None => Ok(Device::Cpu),
        },
        DeviceKind::Cuda => {
            if o.model.is_none() {
                return Err(Error::usage("--device cuda runs the forward pass of --model; --activations and --synthetic are read on the CPU"));
            }
            Ok(Device::Cuda {
                dtype: o.dtype.unwrap_or(DType::Bf16),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message `validate` gives for `options`.
    fn refused(options: Options) -> String {
        match validate(&options) {
            Ok(_) => panic!("accepted {options:?}"),
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        let plan = validate(&Options::default()).unwrap();
        assert_eq!(plan.run.eva, EvaParams::default());
        assert_eq!(plan.run.stats_memory, DEFAULT_STATS_MEMORY);
        assert_eq!(DEFAULT_STATS_MEMORY, 8 << 30);
        assert_eq!(plan.source.input, Input::Caller);
        assert_eq!(plan.device, Device::Cpu);
        assert_eq!(plan.grid.threads, None);
        assert_eq!(plan.ops.collective_timeout, None);
    }

    /// Every out-of-range value of every knob, with the whole message it gets.
    #[test]
    fn every_out_of_range_value_is_refused_with_its_message() {
        type Set = fn(&mut Options);
        let cases: &[(&str, Set, &str)] = &[
            ("rank 0", |o| o.rank = 0, "--rank must be at least 1, found 0 (Python: LoraConfig.r)"),
            ("rho < 1", |o| o.rho = 0.5, "--rho must be >= 1, found 0.5 (Python: EvaConfig.rho)"),
            ("rho < 0", |o| o.rho = -2.0, "--rho must be >= 1, found -2 (Python: EvaConfig.rho)"),
            ("rho NaN", |o| o.rho = f64::NAN, "--rho must be >= 1, found NaN (Python: EvaConfig.rho)"),
            ("rho inf", |o| o.rho = f64::INFINITY, "--rho must be >= 1, found inf (Python: EvaConfig.rho)"),
            ("tau > 1", |o| o.tau = 1.5, "--tau must be in [0, 1], found 1.5 (Python: EvaConfig.tau)"),
            ("tau < 0", |o| o.tau = -0.1, "--tau must be in [0, 1], found -0.1 (Python: EvaConfig.tau)"),
            ("tau NaN", |o| o.tau = f64::NAN, "--tau must be in [0, 1], found NaN (Python: EvaConfig.tau)"),
            ("alpha 0", |o| o.alpha = 0.0, "--alpha must be a positive number, found 0 (Python: LoraConfig.lora_alpha)"),
            ("alpha < 0", |o| o.alpha = -8.0, "--alpha must be a positive number, found -8 (Python: LoraConfig.lora_alpha)"),
            ("alpha inf", |o| o.alpha = f64::INFINITY, "--alpha must be a positive number, found inf (Python: LoraConfig.lora_alpha)"),
            ("alpha NaN", |o| o.alpha = f64::NAN, "--alpha must be a positive number, found NaN (Python: LoraConfig.lora_alpha)"),
            ("dropout 1", |o| o.lora_dropout = 1.0, "--lora-dropout must be in [0, 1), found 1 (Python: LoraConfig.lora_dropout)"),
            ("dropout < 0", |o| o.lora_dropout = -0.1, "--lora-dropout must be in [0, 1), found -0.1 (Python: LoraConfig.lora_dropout)"),
            ("dropout NaN", |o| o.lora_dropout = f64::NAN, "--lora-dropout must be in [0, 1), found NaN (Python: LoraConfig.lora_dropout)"),
            ("batch 0", |o| o.batch_size = 0, "--batch-size must be at least 1, found 0 (Python: the data loader's batch size, summed over the ranks)"),
            ("max steps 0", |o| o.max_steps = Some(0), "--max-steps must be at least 1, found 0 (Python: max_steps)"),
            ("sketch 0", |o| o.sketch_size = Some(0), "--sketch-size must be at least 1, found 0 (Python: sketch_size)"),
            ("memory < 0", |o| o.stats_memory_gib = -1.0, "--stats-memory must be a non-negative number of GiB, found -1 (Python: stats_memory, in bytes)"),
            ("memory NaN", |o| o.stats_memory_gib = f64::NAN, "--stats-memory must be a non-negative number of GiB, found NaN (Python: stats_memory, in bytes)"),
            ("rank pattern 0", |o| o.rank_pattern = vec![("a.fc".into(), 0)], "--rank-pattern entries must be NAME=R with a module name and a rank of at least 1, found `a.fc=0` (Python: LoraConfig.rank_pattern)"),
            ("rank pattern name", |o| o.rank_pattern = vec![(" ".into(), 2)], "--rank-pattern entries must be NAME=R with a module name and a rank of at least 1, found ` =2` (Python: LoraConfig.rank_pattern)"),
            ("timeout < 0", |o| o.collective_timeout_s = -5.0, "--collective-timeout must be a non-negative number of seconds (0 = off), found -5"),
            ("timeout inf", |o| o.collective_timeout_s = f64::INFINITY, "--collective-timeout must be a non-negative number of seconds (0 = off), found inf"),
            ("empty target", |o| o.targets = Some(vec!["q".into(), " ".into()]), "--targets must be a comma-separated list of non-empty names, found ` `"),
            ("local ranks 0", |o| o.local_ranks = 0, "--local-ranks must be at least 1, found 0"),
            ("threads and --comm", |o| (o.local_ranks, o.comm) = (2, Collectives::Mpi), "--local-ranks starts an in-process thread world; do not combine it with mpirun/srun or --comm mpi (--comm nccl runs NCCL between the thread ranks, one GPU each)"),
            ("dtype on the CPU", |o| o.dtype = Some(DType::F32), "--dtype f32 applies to --device cuda; the CPU computes in f32"),
            ("cuda without a model", |o| o.device = DeviceKind::Cuda, "--device cuda runs the forward pass of --model; --activations and --synthetic are read on the CPU"),
        ];
        for (what, set, want) in cases {
            let mut o = Options::default();
            set(&mut o);
            assert_eq!(refused(o), *want, "{what}");
        }
    }

    /// The ends of every range are accepted: PEFT's `rho = 1` and `tau` of 0 and 1, no dropout,
    /// no statistics memory, no timeout.
    #[test]
    fn the_ends_of_the_ranges_are_accepted() {
        let ok: &[fn(&mut Options)] = &[
            |o| o.rho = 1.0,
            |o| o.tau = 0.0,
            |o| o.tau = 1.0,
            |o| o.lora_dropout = 0.0,
            |o| o.lora_dropout = 0.999,
            |o| o.alpha = 1e-9,
            |o| o.stats_memory_gib = 0.0,
            |o| o.collective_timeout_s = 0.0,
            |o| (o.rank, o.batch_size, o.max_steps, o.sketch_size) = (1, 1, Some(1), Some(1)),
            |o| o.rank_pattern = vec![("a.fc".into(), 1)],
        ];
        for set in ok {
            let mut o = Options::default();
            set(&mut o);
            validate(&o).unwrap_or_else(|e| panic!("{o:?}: {e}"));
        }
    }

    #[test]
    fn rank_pattern_entries_parse_as_name_and_rank() {
        let entries =
            |e: &[&str]| parse_rank_pattern(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            entries(&["a.fc = 4", "q_proj=0"]).unwrap(),
            vec![("a.fc".to_string(), 4), ("q_proj".to_string(), 0)]
        );
        for bad in ["a.fc", "a.fc=two", "a.fc=-1"] {
            assert_eq!(
                entries(&[bad]).unwrap_err().to_string(),
                format!("--rank-pattern entries must be NAME=R with a module name and a rank of at least 1, found `{bad}` (Python: LoraConfig.rank_pattern)")
            );
        }
    }

    #[test]
    fn the_plan_carries_what_was_asked() {
        let o = Options {
            model: Some("m".into()),
            data: Some("d.txt".into()),
            device: DeviceKind::Cuda,
            stats_memory_gib: 0.5,
            threads: 3,
            collective_timeout_s: 2.5,
            checkpoint: Some("ck".into()),
            checkpoint_every: Every::Steps(5),
            resume: true,
            rank_pattern: vec![(" q_proj ".into(), 2)],
            ..Options::default()
        };
        let plan = validate(&o).unwrap();
        assert!(
            matches!(&plan.source.input, Input::Model(m) if m.dir == std::path::Path::new("m") && m.max_seq_len == 512)
        );
        assert_eq!(plan.device, Device::Cuda { dtype: DType::Bf16 });
        assert_eq!(plan.run.stats_memory, 1 << 29);
        assert_eq!(plan.run.eva.rank_pattern, vec![("q_proj".to_string(), 2)]);
        assert_eq!(plan.grid.threads, Some(3));
        assert_eq!(
            plan.ops.collective_timeout,
            Some(Duration::from_millis(2500))
        );
        let c = plan.run.checkpoint.unwrap();
        assert_eq!(
            (c.dir, c.every, c.resume),
            ("ck".into(), Every::Steps(5), true)
        );
        // Any byte count the Python package gives comes back exactly.
        let bytes = 123_456_789_012u64;
        let o = Options {
            stats_memory_gib: bytes as f64 / GIB,
            ..Options::default()
        };
        assert_eq!(validate(&o).unwrap().run.stats_memory, bytes);
    }

    #[test]
    fn estimators_parse_by_name() {
        assert_eq!(
            "sketch".parse::<EstimatorChoice>().unwrap(),
            EstimatorChoice::Sketch
        );
        assert_eq!(
            "magic".parse::<EstimatorChoice>().unwrap_err().to_string(),
            "estimator must be auto, exact or sketch, found magic"
        );
    }
}

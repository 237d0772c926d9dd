//! The `eva` command line: raw clap arguments ([`Cli`]) become the library's plain
//! [`Options`](crate::config::Options), which `config::validate` turns into a plan (run
//! settings, source, grid, operations, device) in [`init`]; nothing past it sees the arguments.

pub mod fingerprint;
pub mod init;
pub mod inspect;
pub mod progress;
pub mod report;
pub mod signals;
mod startup;
mod tokens;

use crate::config::validate::{Collectives, DType, DeviceKind};
use crate::config::{EstimatorChoice, DEFAULT_STATS_MEMORY_GIB};
use crate::source::synthetic::SyntheticSpec;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Parses a whole number; a negative one is refused with what was expected (clap would
/// otherwise take `-1` for a flag).
fn whole<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| match s.trim().parse::<f64>() {
        Ok(v) if v < 0.0 => format!("expected a whole number >= 0, found {s}"),
        _ => format!("expected a whole number, found `{s}`"),
    })
}

/// eva: EVA initialization of LoRA adapters from explained variance, written for PEFT.
#[derive(Debug, Parser)]
#[command(name = "eva", version = crate::device::VERSION, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Compute an EVA-initialized LoRA adapter and write it as a PEFT adapter directory.
    Init(InitArgs),
    /// Describe a model: architecture, target modules and shapes, equal-input groups, memory.
    Inspect(inspect::InspectArgs),
    /// Summarize an output directory: ranks per module type and block, unconverged and
    /// uncertified layers, the time split (--json: the report as it is).
    Report(report::ReportArgs),
}

/// `--estimator` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EstimatorArg {
    /// Exact Gram for as many inputs as fit --stats-memory (smallest first), sketch for the rest.
    Auto,
    /// Exact Gram: 8·d² bytes per unique input (f64).
    Exact,
    /// Nyström sketch: about 20·d·(k+10) bytes per unique input, with an error certificate.
    Sketch,
}

impl From<EstimatorArg> for EstimatorChoice {
    fn from(e: EstimatorArg) -> Self {
        match e {
            EstimatorArg::Auto => EstimatorChoice::Auto,
            EstimatorArg::Exact => EstimatorChoice::Exact,
            EstimatorArg::Sketch => EstimatorChoice::Sketch,
        }
    }
}

/// `--comm` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CommArg {
    /// MPI when a launcher (mpirun, srun) started this process; one process otherwise.
    Auto,
    /// MPI (needs a build with `--features mpi`).
    Mpi,
    /// NCCL on the GPUs for sums and hidden states, MPI (or the thread ranks) for the rest (needs
    /// `--features nccl`).
    Nccl,
}

impl From<CommArg> for Collectives {
    fn from(c: CommArg) -> Self {
        match c {
            CommArg::Auto => Collectives::Auto,
            CommArg::Mpi => Collectives::Mpi,
            CommArg::Nccl => Collectives::Nccl,
        }
    }
}

/// `--device` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The forward pass on the CPU (f32, the reference).
    Cpu,
    /// The forward pass on an NVIDIA GPU (needs `--features cuda`; one process per GPU, docs/gpu.md).
    Cuda,
}

impl From<DeviceArg> for DeviceKind {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => DeviceKind::Cpu,
            DeviceArg::Cuda => DeviceKind::Cuda,
        }
    }
}

/// `--dtype` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// bfloat16 weight matrices, f32 accumulation and activations.
    Bf16,
    /// f32 weights: the CPU's numbers to rounding.
    F32,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::Bf16 => DType::Bf16,
            DTypeArg::F32 => DType::F32,
        }
    }
}

/// Arguments of `eva init`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["model", "activations", "synthetic"]))]
pub struct InitArgs {
    /// A HuggingFace model directory (config.json, model.safetensors or shards, tokenizer.json);
    /// needs --data. Supported: llama, mistral, qwen2, bert, roberta (see docs/model.md).
    #[arg(long, value_name = "DIR", requires = "data")]
    pub model: Option<PathBuf>,

    /// Training examples for --model: .txt (one per line) or .jsonl (`text`, or `prompt` +
    /// `completion` with prompt tokens label-masked). One example is one unit.
    #[arg(long, value_name = "FILE", requires = "model")]
    pub data: Option<PathBuf>,

    /// JSON key holding the text in .jsonl data [default: `text`, else `prompt` + `completion`].
    #[arg(long, value_name = "KEY", requires = "data")]
    pub text_field: Option<String>,

    /// Tokens per example, special tokens included (truncated beyond; capped by the model's positions).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>, default_value_t = 512, value_name = "N")]
    pub max_seq_len: usize,

    /// Where --model runs its forward pass.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,

    /// Storage of the weight matrices with --device cuda [default: bf16]; the CPU computes in f32.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,

    /// Activation shards: every *.safetensors file in DIR (file-name order) is one unit; see docs/formats.md.
    #[arg(long, value_name = "DIR")]
    pub activations: Option<PathBuf>,

    /// Generated activations with a known spectrum, e.g. "layers=4,dim=256,tokens=256,units=64"
    /// (keys: layers, group, dim, out, decay, mean, tokens, units, seed; see docs/formats.md).
    #[arg(long, value_name = "SPEC")]
    pub synthetic: Option<SyntheticSpec>,

    /// Output adapter directory (written atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,

    /// Target modules, comma-separated, PEFT semantics: a layer is targeted when its name equals an
    /// entry or ends with "." + entry [default: every layer of the source].
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub targets: Option<Vec<String>>,

    /// LoRA rank r per layer before redistribution; the budget is the sum of the layers' ranks.
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>, default_value_t = 8)]
    pub rank: usize,

    /// Layers whose rank before redistribution is not r (PEFT's rank_pattern), comma-separated
    /// NAME=R: NAME is a module path or a dotted suffix of one (no regular expressions); the
    /// first matching entry wins.
    #[arg(long, value_delimiter = ',', value_name = "NAME=R")]
    pub rank_pattern: Vec<String>,

    /// Each layer may take up to round(r × rho) components; 1 = no redistribution.
    #[arg(long, allow_negative_numbers = true, default_value_t = 2.0)]
    pub rho: f64,

    /// Convergence threshold on the similarity of consecutive estimates, in [0, 1].
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.99)]
    pub tau: f64,

    /// lora_alpha.
    #[arg(long, allow_negative_numbers = true, default_value_t = 8.0)]
    pub alpha: f64,

    /// Divide each component by the square root of its singular value.
    #[arg(long)]
    pub whiten: bool,

    /// Keep lora_alpha for every layer instead of alpha × rank_l / r.
    #[arg(long)]
    pub no_adjust_alpha: bool,

    /// Record use_label_mask = false (tokens labelled -100 are not left out).
    #[arg(long)]
    pub no_label_mask: bool,

    /// lora_dropout written to adapter_config.json.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub lora_dropout: f64,

    /// Units (activation files, or sequences) per global step, whatever the number of processes.
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>, default_value_t = 8)]
    pub batch_size: usize,

    /// Stop after this many steps even if not converged [default: no limit].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub max_steps: Option<usize>,

    /// Use all data once and ignore convergence.
    #[arg(long)]
    pub no_early_stop: bool,

    /// Keep accumulating a converged layer's statistics until the run stops (by default it
    /// stops at convergence, as in PEFT): its components become the PCA of all the data the run
    /// read, for the cost of its statistics and of the forward pass through it.
    #[arg(long, conflicts_with = "no_early_stop")]
    pub refine_converged: bool,

    /// Statistic per unique layer input.
    #[arg(long, value_enum, default_value_t = EstimatorArg::Auto)]
    pub estimator: EstimatorArg,

    /// Sketch columns per input [default: max(4k, k+16) for k = round(r × rho), at most in_features].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub sketch_size: Option<usize>,

    /// Memory for exact Grams under --estimator auto, in GiB.
    #[arg(long, allow_negative_numbers = true, default_value_t = DEFAULT_STATS_MEMORY_GIB, value_name = "GIB")]
    pub stats_memory: f64,

    /// Seed of the sketch's random test matrices.
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64>, default_value_t = 0)]
    pub seed: u64,

    /// Threads per rank for the tiled BLAS kernels and decompositions (0 = the node's cores divided among its ranks).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>, default_value_t = 0)]
    pub threads: usize,

    /// Collectives backend; launch with mpirun/srun and the same command line for several processes.
    #[arg(long, value_enum, default_value_t = CommArg::Auto)]
    pub comm: CommArg,

    /// Run this many ranks as threads of one process (an in-process world, no launcher needed);
    /// with --device cuda, thread rank r computes on GPU r mod the GPUs.
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>, default_value_t = 1, value_name = "N")]
    pub local_ranks: usize,

    /// Pipeline stages: the world's ranks form dp = ranks / S data-parallel replicas of S stages,
    /// each stage holding a contiguous slice of the model's blocks (or of the shards' inputs).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>, default_value_t = 1, value_name = "S")]
    pub pp: usize,

    /// Blocks per pipeline stage, comma-separated (e.g. 10,10,10) [default: balanced by each stage's memory: f32 weights plus exact statistics].
    #[arg(long, value_delimiter = ',', value_name = "BLOCKS", requires = "model")]
    pub pp_split: Option<Vec<usize>>,

    /// Abort the whole job when a collective does not complete within this many seconds
    /// (a hung or stopped rank); 0 = wait forever.
    #[arg(long, allow_negative_numbers = true, default_value_t = crate::comm::DEFAULT_TIMEOUT_S, value_name = "SECONDS")]
    pub collective_timeout: f64,

    /// Write the run's state to DIR after steps (each rank its own file), so that a preempted
    /// or killed run continues with --resume; SIGTERM/SIGINT then write one before exiting.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,

    /// How often to checkpoint: every N steps, or after the first step that ends at least a
    /// duration (90s, 10m, 1h) after the last checkpoint.
    #[arg(
        long,
        value_name = "N|DURATION",
        default_value = "10m",
        requires = "checkpoint"
    )]
    pub checkpoint_every: crate::config::Every,

    /// Continue from the latest complete checkpoint in --checkpoint DIR (start afresh if there
    /// is none); a checkpoint of other flags, data, model or grid is refused.
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,

    /// Take --checkpoint DIR over from the eva run that holds it (DIR/.eva-owner) although this
    /// host cannot tell that it has ended: a run on another host, or an unreadable marker. Only
    /// when that run is certainly gone (its node failed); a run that no longer runs on this
    /// host, or an earlier attempt of the same Slurm job, is taken over without it.
    #[arg(long, requires = "checkpoint")]
    pub checkpoint_takeover: bool,

    /// base_model_name_or_path written to adapter_config.json.
    #[arg(long, value_name = "NAME")]
    pub base_model: Option<String>,

    /// task_type written to adapter_config.json (e.g. CAUSAL_LM).
    #[arg(long, value_name = "TYPE")]
    pub task_type: Option<String>,

    /// Print only warnings and errors.
    #[arg(short, long)]
    pub quiet: bool,
}

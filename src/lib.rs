//! eva: EVA (Explained Variance Adaptation) initialization of LoRA adapters, computed from
//! additive statistics that are summed across processes, and written as PEFT adapters.
//!
//! The modules follow the data flow (see `docs/architecture.md`):
//!
//! | module | role |
//! |---|---|
//! | [`source`] | where layer inputs come from: a model run on text, activation shards, synthetic spectra |
//! | [`model`] | HuggingFace checkpoints, tokenizer, the forward passes that capture layer inputs |
//! | [`stats`] | additive per-input statistics: exact Gram, Nyström sketch |
//! | [`comm`] | the `Communicator` seam: all-reduce, broadcast, barrier |
//! | [`leader`] | eigenpairs, convergence, global rank redistribution |
//! | [`adapter`] | PEFT tensors, `adapter_config.json`, report, atomic writing |
//! | [`engine`] | the step loop that ties them together |
//! | [`owner`] | which eva process holds a directory (temporary output, checkpoints) |
//! | [`cli`] | `eva` command-line arguments and their validation |

pub mod adapter;
pub mod catalog;
pub mod cli;
pub mod comm;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod leader;
pub mod linalg;
pub mod log;
pub mod model;
pub mod owner;
pub mod rng;
pub mod source;
pub mod stats;

pub use error::{Error, Result};

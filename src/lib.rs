//! eva: EVA (Explained Variance Adaptation) initialization of LoRA adapters, computed from
//! additive statistics that are summed across processes, and written as PEFT adapters.
//!
//! The modules follow the data flow (see `docs/architecture.md`):
//!
//! | module | role |
//! |---|---|
//! | [`source`] | where layer inputs come from: activation shards, synthetic spectra |
//! | [`stats`] | additive per-input statistics: exact Gram, Nyström sketch |
//! | [`comm`] | the `Communicator` seam: all-reduce, broadcast, barrier |
//! | [`leader`] | eigenpairs, convergence, global rank redistribution |
//! | [`adapter`] | PEFT tensors, `adapter_config.json`, report, atomic writing |
//! | [`engine`] | the step loop that ties them together |
//! | [`cli`] | `eva` command-line arguments and their validation |




pub mod adapter;
pub mod cli;
pub mod comm;
pub mod config;
pub mod engine;
pub mod error;
pub mod leader;
pub mod linalg;
pub mod rng;
pub mod source;
pub mod stats;

pub use error::{Error, Result};

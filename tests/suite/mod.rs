//! Integration tests: exact numerics against a float64 dense PCA, the sketch's certificate,
//! the output format PEFT reads, steps and stopping, and one test per bad input.

mod checkpoint;
mod common;
pub mod distributed;
mod errors;
mod exact;
mod fuzz;
#[cfg(eva_gpu)]
mod gpu;
// Whole distributed runs on emulated GPUs (several devices, NCCL between them).
#[cfg(feature = "cuda-emu")]
mod gpu_world;
mod layers;
mod model;
#[cfg(feature = "mpi")]
mod netns;
mod ops;
mod output;
mod pipeline;
mod reliability;
mod report;
mod sketch;
mod steps;

//! The compute layer: where tensors live and how the forward pass and the device statistics
//! run on them. Everything above names a backend only through this layer; only this layer names
//! cudarc (NCCL too: `comm/nccl.rs` reaches it through the seam `cuda::nccl`).
//!
//! | module | role |
//! |---|---|
//! | [`backend`] | the [`backend::Backend`] trait the forward passes are written against, and its op types |
//! | [`cpu`] | [`cpu::Cpu`]: the trait on host memory (OpenBLAS products, plain loops) |
//! | [`cuda`] | [`cuda::Cuda`]: the trait on an NVIDIA GPU, and the device accumulators of the statistics (feature `cuda`; else a twin that cannot be built) |
//! | `emu` | the emulated CUDA device's kernel executor: `kernels.cu` run on the host with CUDA's execution model (feature `cuda-emu`, a test device) |
//! | [`gpu`] | what the layers above ask of a GPU, as traits both the backend and its twin implement; [`gpu::CudaOptions`] (the weights' `DType` is the validated `config::validate::DType`) |
//! | [`error`] | [`error::DeviceError`]: what failed on a GPU, by name |
//! | [`host`] | [`host::HostTensor`], a checkpoint tensor as the backends receive it |
//! | [`blocks`] | the accumulation blocks by which CPU and GPU round their sums alike |
//! | [`rows`] | captured activations wherever they are: [`rows::Rows`], [`rows::Hidden`], [`rows::Capture`] |

pub mod backend;
pub mod blocks;
pub mod cpu;
pub mod error;
pub mod gpu;
pub mod host;
pub mod rows;

// `eva_gpu` (build.rs): feature `cuda` (cudarc) or `cuda-emu` (the emulated device).
#[cfg(eva_gpu)]
pub mod cuda;
#[cfg(not(eva_gpu))]
#[path = "no_cuda.rs"]
pub mod cuda;

/// eva's version as `eva --version` and `eva_report.json` give it; a build on the emulated device
/// (feature `cuda-emu`, for tests) says so.
#[cfg(not(feature = "cuda-emu"))]
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// eva's version as `eva --version` and `eva_report.json` give it; a build on the emulated device
/// (feature `cuda-emu`, for tests) says so.
#[cfg(feature = "cuda-emu")]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (emulated CUDA device: a test build, not for real runs)"
);

// The emulated device's kernel executor (feature `cuda-emu`): the runtime in `cuda` launches
// kernels.cu's host build through it.
#[cfg(feature = "cuda-emu")]
pub mod emu;

//! What the layers above ask of a GPU, as traits: the CUDA backend (`cuda/`, feature `cuda`)
//! and its not-compiled twin (`no_cuda.rs`) implement the same ones, so the compiler keeps the
//! twin complete (candle's `dummy_cuda_backend.rs` habit) and every dispatch path type-checks in
//! a CPU-only build.
//!
//! | trait | implemented by | role |
//! |---|---|---|
//! | [`Gpu`] | `cuda::Cuda` | open a device, move activations to and from the host, queue and settle finiteness checks, report failures |
//! | [`DeviceBuffer`] | `cuda::DeviceSums` | f64 sums in device memory, which a device all-reduce sums in place |
//! | [`GramAccumulator`] | `cuda::gram::DeviceGram` | an exact Gram `Σ x̃ x̃ᵀ` (f32 products flushed into f64) and the moments |
//! | [`SketchAccumulator`] | `cuda::gram::DeviceSketch` | a Nyström sketch `Σ x̃ᵀ(x̃ [Ω Θ])` and the moments |
//!
//! The accumulators know no statistics types: sums cross as plain vectors ([`MomentSums`],
//! row-major products), and `stats::device` builds the host statistics from them.

use super::backend::Backend;
use crate::config::validate::DType;
use crate::{Error, Result};
use ndarray::Array2;
use std::sync::Arc;

/// How to open the GPU.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Device ordinal (one process per GPU: the node-local rank modulo the devices).
    pub ordinal: usize,
    /// Weight storage.
    pub dtype: DType,
    /// The layer slice this rank holds, for out-of-memory messages (`blocks 0..30 of 30`).
    pub slice: String,
}

/// Count, feature sums and feature sums of squares of the shifted rows, in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct MomentSums {
    /// Rows added.
    pub n: u64,
    /// `Σ x̃`.
    pub sum: Vec<f64>,
    /// `Σ x̃²` per feature.
    pub sum_sq: Vec<f64>,
}

/// The first non-finite value of a finiteness check: the host's, or the earliest failing one of
/// the checks a GPU queued ([`Gpu::settle_finite`]). One message for both.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFinite {
    /// Where the checked rows came from.
    pub what: String,
    /// NaN, +inf or -inf.
    pub value: f32,
    /// Its token (row) and feature (column).
    pub token: usize,
    pub feature: usize,
}

impl NonFinite {
    /// The data error naming where the value came from and where it is.
    pub fn into_error(self) -> Error {
        Error::data(format!(
            "{}: non-finite activation {} at token {}, feature {}",
            self.what, self.value, self.token, self.feature
        ))
    }
}

/// One GPU: the forward pass's [`Backend`] plus what the statistics, the collectives and the
/// Python binding need of it. Ops that return tensors record a device failure instead of
/// returning it; [`Gpu::check`] returns the first one.
pub trait Gpu: Backend + Sized {
    /// An activation over device memory another library of this process owns (a PyTorch tensor
    /// handed over by DLPack): read in place, never freed.
    type Borrowed: std::ops::Deref<Target = Self::Tensor>;

    /// Opens GPU `opts.ordinal` (probing the libraries first); a missing library, driver or
    /// device is a usage error naming it.
    fn open(opts: CudaOptions) -> Result<Self>;
    /// The device's name, ordinal, compute capability and weight type, for reports.
    fn describe(&self) -> String;
    /// The first device failure of a tensor-returning op, if any.
    fn check(&self) -> Result<()>;
    /// Waits for the queued work and reports any failure.
    fn synchronize(&self) -> Result<()>;
    /// Uploads a host matrix as an activation.
    fn to_device(&self, x: &Array2<f32>) -> Result<Self::Tensor>;
    /// Copies a whole activation to host memory.
    fn to_host(&self, x: &Self::Tensor) -> Result<Array2<f32>>;
    /// A `rows × cols` activation of zeros, to receive into; out of memory names `what`.
    fn alloc_tensor(&self, rows: usize, cols: usize, what: &str) -> Result<Self::Tensor>;
    /// Queues a check that every value of `x` is finite, named `what` in the verdict: a kernel
    /// launch, nothing comes back (every so many checks, the queue settles itself first).
    fn queue_finite(&self, x: &Self::Tensor, what: String) -> Result<()>;
    /// The verdict of the checks queued since the last call (one 8-byte download, so one
    /// synchronize, and none when nothing is queued): the earliest failing check's first
    /// non-finite value as a [`NonFinite`] error. The layers above settle before every
    /// agreement that precedes an all-reduce or a checkpoint.
    fn settle_finite(&self) -> Result<()>;
    /// A `rows × cols` activation over memory this process already holds on this GPU.
    ///
    /// # Safety
    ///
    /// `ptr` must address `rows × cols` f32 values, row-major, on this GPU in the primary
    /// context, which stay allocated and unchanged until this GPU's stream ([`Gpu::raw_stream`])
    /// has finished what is queued on it while the returned tensor lives.
    unsafe fn borrow(&self, ptr: u64, rows: usize, cols: usize) -> Self::Borrowed;
    /// This GPU's stream as a raw `CUstream` (0: the legacy default stream), for a caller that
    /// orders its own work against eva's (PyTorch's `torch.cuda.ExternalStream`).
    fn raw_stream(&self) -> usize;
    /// Registers what releases the memory another library of this process caches on this GPU
    /// (PyTorch's `torch.cuda.empty_cache`): free for that library, used for the driver, so eva
    /// calls `release` before it decides that it is out of memory.
    fn on_low_memory(&self, release: Box<dyn Fn() + Send + Sync>);
}

/// f64 values in device memory: the packed shared parts of a stage's inputs, or `G·Q` products,
/// which a device all-reduce (NCCL) sums in place.
pub trait DeviceBuffer: Sized {
    /// The GPU the values live on.
    type Gpu: Gpu;
    /// `len` zeros on `gpu`; out of memory names `what`.
    fn zeros(gpu: &Arc<Self::Gpu>, len: usize, what: &str) -> Result<Self>;
    /// Values.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The GPU they live on.
    fn gpu(&self) -> &Arc<Self::Gpu>;
    /// A copy in host memory.
    fn to_host(&self) -> Result<Vec<f64>>;
    /// Overwrites the values with `host` (of the same length).
    fn copy_from_host(&mut self, host: &[f64]) -> Result<()>;
}

/// Exact statistics of one unique input on the device: `G = Σ x̃ x̃ᵀ` (f64) and the moments of
/// the rows shifted by the reference `c` (`x̃ = x - c`).
pub trait GramAccumulator: Sized {
    /// The device.
    type Gpu: Gpu;
    /// Its f64 buffers.
    type Sums: DeviceBuffer<Gpu = Self::Gpu>;
    /// Empty statistics around `reference`; the Gram's inputs are the shifted rows in `input`;
    /// f32 products are flushed into f64 at least every `flush_every` rows.
    fn new(gpu: &Self::Gpu, reference: &[f32], input: DType, flush_every: usize) -> Result<Self>;
    /// Dimension.
    fn dim(&self) -> usize;
    /// Adds the rows of `x` (`tokens × d`, on this device).
    fn accumulate(&mut self, gpu: &Self::Gpu, x: &<Self::Gpu as Backend>::Tensor) -> Result<()>;
    /// Replaces the sums with host ones (`gram` row-major `d × d`, at least its upper triangle).
    fn load(&mut self, gpu: &Self::Gpu, moments: &MomentSums, gram: &[f64]) -> Result<()>;
    /// Writes `[n, Σx̃, Σx̃²]` and with `with_gram` the Gram's upper triangle row by row at `at`
    /// of `out`, after flushing; returns the position after them.
    fn pack(
        &mut self,
        gpu: &Self::Gpu,
        out: &mut Self::Sums,
        at: usize,
        with_gram: bool,
    ) -> Result<usize>;
    /// `G·Q` for `q` row-major `d × m` on the host, left on the device.
    fn apply(&self, gpu: &Arc<Self::Gpu>, q: &[f64], m: usize) -> Result<Self::Sums>;
    /// The Gram's upper triangle packed row by row (`d(d+1)/2` values), left on the device.
    fn packed(&self, gpu: &Arc<Self::Gpu>) -> Result<Self::Sums>;
    /// A host copy of the moments and the full Gram, a pending f32 part added into the copy.
    fn snapshot(&self, gpu: &Self::Gpu) -> Result<(MomentSums, Vec<f64>)>;
}

/// The sketch's products on the device: `Y = Σ x̃ᵀ(x̃ [Ω Θ])` (`d × m`, f64) and the moments.
pub trait SketchAccumulator: Sized {
    /// The device.
    type Gpu: Gpu;
    /// Its f64 buffers.
    type Sums: DeviceBuffer<Gpu = Self::Gpu>;
    /// Empty sketch around `reference` with the test matrix `test` (row-major `d × m`).
    fn new(gpu: &Self::Gpu, reference: &[f32], test: &[f32], flush_every: usize) -> Result<Self>;
    /// Dimension.
    fn dim(&self) -> usize;
    /// Test columns `m`.
    fn columns(&self) -> usize;
    /// Adds the rows of `x` (`tokens × d`, on this device).
    fn accumulate(&mut self, gpu: &Self::Gpu, x: &<Self::Gpu as Backend>::Tensor) -> Result<()>;
    /// Replaces the sums with host ones (`y` row-major `d × m`).
    fn load(&mut self, gpu: &Self::Gpu, moments: &MomentSums, y: &[f64]) -> Result<()>;
    /// Writes `[n, Σx̃, Σx̃², Y]` at `at` of `out`, after flushing; returns the position after.
    fn pack(&mut self, gpu: &Self::Gpu, out: &mut Self::Sums, at: usize) -> Result<usize>;
    /// A host copy of the moments and `Y`, a pending f32 part added into the copy.
    fn snapshot(&self, gpu: &Self::Gpu) -> Result<(MomentSums, Vec<f64>)>;
}

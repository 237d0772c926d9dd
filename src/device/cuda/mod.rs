//! The CUDA backend (feature `cuda`): the forward pass on one NVIDIA GPU through cudarc, and the
//! device-side statistics it feeds.
//!
//! | item | role |
//! |---|---|
//! | [`Cuda`] | [`Backend`] on a GPU: weights resident once, cuBLAS `GemmEx` for linear layers, NVRTC kernels for the rest |
//! | [`runtime`] | the GPU runtime seam: memory, copies, kernel launches, the two cuBLAS calls, the stream; with [`probe`] and the NVRTC call in [`kernels`], the only code here that names cudarc |
//! | [`probe`] | which CUDA libraries load, before cudarc is asked to (a missing library panics inside it) |
//! | [`kernels`] | the CUDA C source, its NVRTC compilation, launch shapes |
//! | [`gram`] | the statistics' accumulators on the device: exact Grams (f32 products flushed into f64), moments, sketch products, sums to all-reduce |
//!
//! Activations are f32 `[tokens, features]` device buffers ([`CudaTensor`]). With `DType::Bf16`
//! the matrices are stored in bf16 and each linear layer rounds its input to bf16 for a bf16 ×
//! bf16 product accumulated in f32 (`CUBLAS_COMPUTE_32F`); norms, attention, activations and
//! residuals stay f32 (more accurate than PyTorch's bf16 eager, which rounds every activation).
//! With `DType::F32` every op follows the CPU reference ([`crate::device::cpu::Cpu`]) step by step.
//!
//! Errors: the [`Backend`] methods that return tensors cannot return `Result`, so a device
//! failure there is recorded (the first one wins, as CUDA's own sticky errors) and every later op
//! becomes a no-op on an empty tensor; [`Cuda::check`] returns it. The ops that return `Result`
//! (`weight`, `embed`) return it directly.

/// The arguments of a kernel launch, in the order of its parameters in kernels.cu.
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$($crate::device::cuda::kernels::Arg::from($a)),*] };
}

pub mod gram;
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod probe;
#[cfg(feature = "cuda")]
pub mod runtime;

// The emulated device (tests without a GPU): the same seam served on the host.
#[cfg(feature = "cuda-emu")]
#[path = "emu_probe.rs"]
pub mod probe;
#[cfg(feature = "cuda-emu")]
#[path = "emu_runtime.rs"]
pub mod runtime;
// The NCCL seam (`comm/nccl.rs` talks to NCCL only through it): cudarc, or the emulated NCCL.
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(feature = "cuda-emu")]
#[path = "emu_nccl.rs"]
pub mod nccl;

pub use gram::{DeviceGram, DeviceSketch, DeviceSums};
pub use runtime::CallerContext;

use super::backend::{
    check_embed, norm_mismatch, Activation, AttentionMask, Backend, Heads, Segments,
};
use super::error::{Bytes, DeviceError};
use super::gpu::{CudaOptions, Gpu, NonFinite};
use super::host::HostTensor;
use crate::config::validate::DType;
use ndarray::{Array2, ArrayView2};
use runtime::{AllocError, Buffer, Elem, Runtime};
use std::sync::Mutex;

/// `Ok` when `--device cuda` can work on this machine: the libraries load and the driver sees a
/// GPU (no context is created). Otherwise the usage error (exit code 2) naming what is missing.
pub fn available() -> crate::Result<()> {
    probe::devices()?;
    Ok(())
}

/// The GPUs the driver sees (at least one), or the usage error naming what is missing.
pub fn device_count() -> crate::Result<usize> {
    Ok(probe::devices()?)
}

/// An activation on the device: f32, row-major `[rows, cols]`. Empty (`None`) after a device
/// failure (see the module docs).
pub struct CudaTensor {
    data: Option<Buffer<f32>>,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    /// Rows (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn buf(&self) -> Result<&Buffer<f32>, DeviceError> {
        self.data.as_ref().ok_or_else(poisoned)
    }

    /// Its `rows × cols` values, for a communicator to send (NCCL, GPU to GPU); the error of the
    /// failed op that left it empty.
    pub fn values(&self) -> crate::Result<&Buffer<f32>> {
        Ok(self.buf()?)
    }

    /// Its `rows × cols` values, for a communicator to receive into.
    pub fn values_mut(&mut self) -> crate::Result<&mut Buffer<f32>> {
        Ok(self.data.as_mut().ok_or_else(poisoned)?)
    }
}

/// A [`CudaTensor`] over device memory that another library of this process owns in the same
/// (primary) context, e.g. a PyTorch tensor handed over by DLPack: read in place and never freed.
pub struct BorrowedTensor(CudaTensor);

impl std::ops::Deref for BorrowedTensor {
    type Target = CudaTensor;

    fn deref(&self) -> &CudaTensor {
        &self.0
    }
}

impl Drop for BorrowedTensor {
    fn drop(&mut self) {
        if let Some(data) = self.0.data.take() {
            // The owner frees it; this only forgets the pointer.
            data.forget();
        }
    }
}

/// Stand-in error for an op on a tensor that a failed op left empty (the first error is kept).
fn poisoned() -> DeviceError {
    DeviceError::Unsupported {
        op: "CUDA backend",
        detail: "an earlier device operation failed".into(),
    }
}

/// A forward pass's rotary tables on the device (cos and sin, `[tokens, head_dim/2]` each),
/// uploaded once for every layer; empty after a failed upload (the error is recorded).
pub struct CudaRope {
    cos: Option<Buffer<f32>>,
    sin: Option<Buffer<f32>>,
    rows: usize,
    /// Rotated pairs per head (the tables' width; below `head_dim / 2` for partial rotary).
    half: usize,
}

/// A weight on the device: matrices in the chosen [`DType`], vectors (norms, biases) in f32.
pub struct CudaWeight {
    data: WeightData,
    shape: Vec<usize>,
}

enum WeightData {
    F32(Buffer<f32>),
    Bf16(Buffer<half::bf16>),
}

impl CudaWeight {
    fn f32(&self, what: &'static str) -> Result<&Buffer<f32>, DeviceError> {
        match &self.data {
            WeightData::F32(s) => Ok(s),
            WeightData::Bf16(_) => Err(DeviceError::Unsupported {
                op: what,
                detail: "expected an f32 vector, found a bf16 matrix".into(),
            }),
        }
    }

    fn ptr(&self, rt: &Runtime) -> u64 {
        match &self.data {
            WeightData::F32(s) => rt.ptr(s),
            WeightData::Bf16(s) => rt.ptr(s),
        }
    }
}

/// The CUDA backend: one GPU, one stream, cuBLAS on that stream, the kernels compiled for the
/// device.
pub struct Cuda {
    /// The runtime seam: every call to the driver and cuBLAS goes through it.
    rt: Runtime,
    opts: CudaOptions,
    error: Mutex<Option<DeviceError>>,
    /// What releases memory another library of this process caches on this GPU (PyTorch's
    /// allocator: `torch.cuda.empty_cache`), called before eva decides it is out of memory.
    release: Mutex<Option<Release>>,
    /// The finiteness checks queued since the last [`Gpu::settle_finite`].
    checks: Mutex<Checks>,
}

/// Finiteness checks in flight: the device word the `first_nonfinite` launches keep their
/// earliest failure in (`seq << 40 | index << 2 | class`, `u64::MAX` while none failed) and,
/// per check `seq`, what it names and its features.
#[derive(Default)]
struct Checks {
    word: Option<Buffer<u64>>,
    pending: Vec<(String, usize)>,
}

/// Checks queued before [`Gpu::queue_finite`] settles them itself (the word holds 24 bits of
/// `seq`; this bounds the names kept).
const MAX_PENDING_CHECKS: usize = 1 << 16;

/// Values one check may cover (the word holds 38 bits of index).
const MAX_CHECKED_VALUES: usize = 1 << 38;

/// A callback that releases memory cached by another library on the same GPU.
type Release = Box<dyn Fn() + Send + Sync>;

impl Cuda {
    /// [`Gpu::open`] with the backend's own error.
    fn open_device(opts: CudaOptions) -> Result<Self, DeviceError> {
        let count = probe::devices()?;
        if opts.ordinal >= count {
            return Err(DeviceError::NoDevice(format!(
                "GPU {} was asked for, the driver sees {count} (CUDA_VISIBLE_DEVICES={})",
                opts.ordinal,
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            )));
        }
        Ok(Cuda {
            rt: Runtime::open(opts.ordinal)?,
            opts,
            error: Mutex::new(None),
            release: Mutex::new(None),
            checks: Mutex::new(Checks::default()),
        })
    }

    /// Gives eva's pooled memory back to the driver and calls the registered release, if any;
    /// whether there was something to try (the pool always is, on a real GPU).
    fn release_cached(&self) -> bool {
        let trimmed = self.rt.trim().is_ok();
        match &*self.release.lock().expect("not poisoned") {
            Some(release) => {
                release();
                true
            }
            None => trimmed,
        }
    }

    /// `alloc()`, retried once after [`Gpu::on_low_memory`]'s release when out of memory.
    fn retrying<B>(&self, alloc: impl Fn() -> Result<B, AllocError>) -> Result<B, AllocError> {
        match alloc() {
            Err(AllocError::OutOfMemory { .. }) if self.release_cached() => alloc(),
            r => r,
        }
    }

    /// Fails with the out-of-memory error, before anything is allocated, unless `needed` bytes
    /// are free (e.g. the weights of this rank's slice before uploading them).
    pub fn ensure_free(&self, needed: usize, what: &str) -> crate::Result<()> {
        let (mut free, mut total) = self.rt.memory()?;
        if needed > free && self.release_cached() {
            (free, total) = self.rt.memory()?;
        }
        if needed > free {
            return Err(self.oom(what, needed, free, total).into());
        }
        Ok(())
    }

    fn oom(&self, what: &str, needed: usize, free: usize, total: usize) -> DeviceError {
        DeviceError::OutOfMemory {
            device: self.opts.ordinal,
            what: what.to_string(),
            slice: if self.opts.slice.is_empty() {
                "this rank's layer slice".into()
            } else {
                self.opts.slice.clone()
            },
            needed: Bytes(needed),
            free: Bytes(free),
            total: Bytes(total),
        }
    }

    /// The storage type of the weights.
    pub fn dtype(&self) -> DType {
        self.opts.dtype
    }

    /// A device allocation of `len` values, out-of-memory named.
    fn alloc<T: Elem>(&self, len: usize, what: &str) -> Result<Buffer<T>, DeviceError> {
        self.retrying(|| {
            // SAFETY: every caller writes the buffer (kernel, cuBLAS with beta = 0, or copy)
            // before it is read.
            unsafe { self.rt.alloc::<T>(len) }
        })
        .map_err(|e| self.alloc_error(e, len * size_of::<T>(), what))
    }

    /// `len` zeros, out-of-memory named.
    fn zeros_of<T: Elem>(&self, len: usize, what: &str) -> Result<Buffer<T>, DeviceError> {
        self.retrying(|| self.rt.zeros::<T>(len))
            .map_err(|e| self.alloc_error(e, len * size_of::<T>(), what))
    }

    /// A copy of `host` on the device, out-of-memory named.
    fn upload<T: Elem>(&self, host: &[T], what: &str) -> Result<Buffer<T>, DeviceError> {
        self.retrying(|| self.rt.upload(host))
            .map_err(|e| self.alloc_error(e, size_of_val(host), what))
    }

    /// An allocation of `bytes` that failed, as the error naming `what`.
    fn alloc_error(&self, e: AllocError, bytes: usize, what: &str) -> DeviceError {
        match e {
            AllocError::OutOfMemory { free, total } => self.oom(what, bytes, free, total),
            AllocError::Driver(e) => e,
        }
    }

    /// Records the first failure.
    fn fail(&self, e: DeviceError) {
        let mut slot = self.error.lock().expect("not poisoned");
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.error.lock().expect("not poisoned").is_some()
    }

    /// Runs a tensor-producing op unless an earlier one failed; a failure is recorded and gives
    /// an empty tensor of the same shape.
    fn produce(
        &self,
        rows: usize,
        cols: usize,
        op: impl FnOnce() -> Result<Buffer<f32>, DeviceError>,
    ) -> CudaTensor {
        if self.failed() {
            return CudaTensor {
                data: None,
                rows,
                cols,
            };
        }
        match op() {
            Ok(data) => CudaTensor {
                data: Some(data),
                rows,
                cols,
            },
            Err(e) => {
                self.fail(e);
                CudaTensor {
                    data: None,
                    rows,
                    cols,
                }
            }
        }
    }

    /// Runs an in-place op unless an earlier one failed; records its failure.
    fn mutate(&self, op: impl FnOnce() -> Result<(), DeviceError>) {
        if self.failed() {
            return;
        }
        if let Err(e) = op() {
            self.fail(e);
        }
    }

    /// `x` rounded to bf16 (the input of a bf16 product).
    fn to_bf16(&self, x: &Buffer<f32>, n: usize) -> Result<Buffer<half::bf16>, DeviceError> {
        let y = self.alloc::<half::bf16>(n, "rounding activations to bf16")?;
        let (px, py, n64) = (self.rt.ptr(x), self.rt.ptr(&y), n as u64);
        self.rt.launch(
            "cast_bf16",
            kernels::Shape::Elements(n),
            &args![px, py, n64],
        )?;
        Ok(y)
    }

    fn try_linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<Buffer<f32>, DeviceError> {
        let (m, k) = (x.rows, x.cols);
        let n = w.shape[0];
        let xb = x.buf()?;
        let y = self.alloc::<f32>(m * n, "a linear layer's output")?;
        let py = self.rt.ptr(&y);
        let beta = match bias {
            Some(b) => {
                let pb = self.rt.ptr(b.f32("linear bias")?);
                let cols = n as i32;
                self.rt
                    .launch("fill_rows", kernels::Shape::Rows(m), &args![py, pb, cols])?;
                1.0
            }
            None => 0.0,
        };
        // Row-major Y[m,n] = X[m,k] Wᵀ is column-major Yᶜ[n,m] = Wᶜᵀ Xᶜ with Wᶜ = W as [k,n].
        let pw = w.ptr(&self.rt);
        match &w.data {
            // SAFETY: W holds n·k values, X m·k and Y m·n, as allocated and checked above.
            WeightData::F32(_) => unsafe {
                self.rt.gemm(
                    true,
                    false,
                    n,
                    m,
                    k,
                    pw,
                    k,
                    self.rt.ptr(xb),
                    k,
                    beta,
                    py,
                    n,
                    DType::F32,
                )
            }?,
            WeightData::Bf16(_) => {
                let xh = self.to_bf16(xb, m * k)?;
                // SAFETY: W holds n·k values, X m·k and Y m·n, as allocated and checked above.
                unsafe {
                    self.rt.gemm(
                        true,
                        false,
                        n,
                        m,
                        k,
                        pw,
                        k,
                        self.rt.ptr(&xh),
                        k,
                        beta,
                        py,
                        n,
                        DType::Bf16,
                    )
                }?
            }
        }
        Ok(y)
    }

    /// `layer_norm` kernel over `rows × d` values: `(x + residual)` normalized with `(w, b, eps)`
    /// into `out` (which may be `x`).
    fn try_layer_norm(
        &self,
        x: &Buffer<f32>,
        residual: Option<&Buffer<f32>>,
        out: u64,
        (rows, d): (usize, usize),
        (w, b, eps): (&CudaWeight, &CudaWeight, f32),
    ) -> Result<(), DeviceError> {
        norm_shape("layer_norm", &[("weight", w), ("bias", b)], d)?;
        let (px, pr) = (self.rt.ptr(x), residual.map_or(0u64, |r| self.rt.ptr(r)));
        let (pw, pb) = (
            self.rt.ptr(w.f32("layer_norm weight")?),
            self.rt.ptr(b.f32("layer_norm bias")?),
        );
        let d32 = d as i32;
        self.rt.launch(
            "layer_norm",
            kernels::Shape::Rows(rows),
            &args![px, pr, pw, pb, out, d32, eps],
        )
    }
}

impl Gpu for Cuda {
    type Borrowed = BorrowedTensor;

    /// Opens GPU `opts.ordinal`: probes the libraries, creates the context and stream, compiles
    /// the kernels with NVRTC for the device's compute capability and loads them.
    fn open(opts: CudaOptions) -> crate::Result<Self> {
        Ok(Self::open_device(opts)?)
    }

    /// The device's name and compute capability (`NVIDIA H200, sm_90`).
    fn describe(&self) -> String {
        format!(
            "{} (GPU {}, sm_{}{}, weights {:?})",
            self.rt.name,
            self.opts.ordinal,
            self.rt.capability.0,
            self.rt.capability.1,
            self.opts.dtype
        )
    }

    /// The first device failure of a tensor-returning op, if any (see the module docs).
    fn check(&self) -> crate::Result<()> {
        match &*self.error.lock().expect("not poisoned") {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Waits for the stream (e.g. before stopping a clock) and reports any failure.
    fn synchronize(&self) -> crate::Result<()> {
        self.check()?;
        Ok(self.rt.synchronize()?)
    }

    /// Uploads a host matrix as an activation (tests, and rows produced on the host).
    fn to_device(&self, x: &Array2<f32>) -> crate::Result<CudaTensor> {
        self.check()?;
        let x = x.as_standard_layout();
        let data = self.upload(
            x.as_slice().expect("standard layout"),
            "uploading an activation",
        )?;
        Ok(CudaTensor {
            data: Some(data),
            rows: x.nrows(),
            cols: x.ncols(),
        })
    }

    /// Copies a whole activation to host memory.
    fn to_host(&self, x: &CudaTensor) -> crate::Result<Array2<f32>> {
        self.check()?;
        let host = self.rt.download(x.buf()?, 0..x.rows * x.cols)?;
        Ok(Array2::from_shape_vec((x.rows, x.cols), host).expect("rows x cols values"))
    }

    /// A `rows × cols` activation of zeros, to receive into; out of device memory names `what`.
    fn alloc_tensor(&self, rows: usize, cols: usize, what: &str) -> crate::Result<CudaTensor> {
        self.check()?;
        Ok(CudaTensor {
            data: Some(self.zeros_of(rows * cols, what)?),
            rows,
            cols,
        })
    }

    /// A `rows × cols` activation over memory this process already holds on this GPU.
    ///
    /// # Safety
    ///
    /// `ptr` must address `rows × cols` f32 values, row-major, on this GPU in the primary
    /// context, which stay allocated and unchanged until this GPU's stream ([`Cuda::raw_stream`])
    /// has finished what is queued on it while the returned tensor lives.
    unsafe fn borrow(&self, ptr: u64, rows: usize, cols: usize) -> BorrowedTensor {
        // SAFETY: the caller's contract; `BorrowedTensor` never frees it.
        let data = unsafe { self.rt.borrow(ptr, rows * cols) };
        BorrowedTensor(CudaTensor {
            data: Some(data),
            rows,
            cols,
        })
    }

    /// This GPU's stream as a raw `CUstream` (0: the legacy default stream), for a caller that
    /// orders its own work against eva's (PyTorch's `torch.cuda.ExternalStream`).
    fn raw_stream(&self) -> usize {
        self.rt.raw_stream()
    }

    /// Kept for [`Cuda::ensure_free`] and a retry of a failed allocation.
    fn on_low_memory(&self, release: Box<dyn Fn() + Send + Sync>) {
        *self.release.lock().expect("not poisoned") = Some(release);
    }

    fn queue_finite(&self, x: &CudaTensor, what: String) -> crate::Result<()> {
        self.check()?;
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        assert!(
            n < MAX_CHECKED_VALUES,
            "{what}: {n} values are more than one finiteness check covers"
        );
        if self.checks.lock().expect("not poisoned").pending.len() == MAX_PENDING_CHECKS {
            self.settle_finite()?;
        }
        let mut checks = self.checks.lock().expect("not poisoned");
        if checks.word.is_none() {
            let mut word = self.zeros_of::<u64>(1, "a finiteness word")?;
            self.rt.write(&[u64::MAX], &mut word, 0)?;
            checks.word = Some(word);
        }
        let seq = checks.pending.len() as u64;
        let (px, n64, pw) = (
            self.rt.ptr(x.buf()?),
            n as u64,
            self.rt.ptr(checks.word.as_ref().expect("made above")),
        );
        self.rt.launch(
            "first_nonfinite",
            kernels::Shape::Elements(n),
            &args![px, n64, seq, pw],
        )?;
        checks.pending.push((what, x.cols));
        Ok(())
    }

    fn settle_finite(&self) -> crate::Result<()> {
        let mut checks = self.checks.lock().expect("not poisoned");
        if checks.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut checks.pending);
        let word = checks.word.as_mut().expect("a check was queued");
        let first = self.rt.download(word, 0..1)?[0];
        if first == u64::MAX {
            return Ok(());
        }
        self.rt.write(&[u64::MAX], word, 0)?;
        let (seq, index) = (
            (first >> 40) as usize,
            ((first >> 2) & ((1 << 38) - 1)) as usize,
        );
        let value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(first & 3) as usize];
        let (what, cols) = pending.into_iter().nth(seq).expect("seq of a queued check");
        Err(NonFinite {
            what,
            value,
            token: index / cols,
            feature: index % cols,
        }
        .into_error())
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type RopeTables = CudaRope;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn weight(&self, t: &HostTensor) -> crate::Result<CudaWeight> {
        if !(1..=2).contains(&t.shape.len()) {
            return Err(crate::Error::data(format!(
                "checkpoint tensor {}: expected 1-D or 2-D, found shape {:?}",
                t.name, t.shape
            )));
        }
        self.check()?;
        let what = format!("uploading the weight {}", t.name);
        let data = if t.shape.len() == 2 && self.opts.dtype == DType::Bf16 {
            let host: Vec<half::bf16> = if t.dtype == safetensors::Dtype::BF16 {
                t.bytes()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect()
            } else {
                t.to_f32()?.into_iter().map(half::bf16::from_f32).collect()
            };
            WeightData::Bf16(self.upload(&host, &what)?)
        } else {
            WeightData::F32(self.upload(&t.to_f32()?, &what)?)
        };
        Ok(CudaWeight {
            data,
            shape: t.shape.clone(),
        })
    }

    fn zeros(&self, tokens: usize, dim: usize) -> CudaTensor {
        self.produce(tokens, dim, || {
            self.zeros_of::<f32>(tokens * dim, "an activation")
        })
    }

    fn embed(
        &self,
        x: &mut CudaTensor,
        table: &CudaWeight,
        ids: &[u32],
        what: &str,
    ) -> crate::Result<()> {
        check_embed(what, &table.shape, (x.rows, x.cols), ids.len())?;
        let rows = table.shape[0];
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(crate::Error::data(format!(
                "{what}: index {id} is outside the table of {rows} rows"
            )));
        }
        self.check()?;
        let n = ids.len();
        let run = || -> Result<(), DeviceError> {
            let dev_ids = self.upload(&ids[..n], "token ids")?;
            let (px, pt, pi, dim) = (
                self.rt.ptr(x.buf()?),
                table.ptr(&self.rt),
                self.rt.ptr(&dev_ids),
                x.cols as i32,
            );
            let kernel = match table.data {
                WeightData::F32(_) => "embed_f32",
                WeightData::Bf16(_) => "embed_bf16",
            };
            self.rt
                .launch(kernel, kernels::Shape::Rows(n), &args![px, pt, pi, dim])
        };
        run().map_err(|e| {
            self.fail(e.clone());
            e.into()
        })
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, b: Option<&CudaWeight>) -> CudaTensor {
        assert_eq!(
            w.shape.get(1),
            Some(&x.cols),
            "linear: input has {} features, the weight has shape {:?}",
            x.cols,
            w.shape
        );
        self.produce(x.rows, w.shape[0], || self.try_linear(x, w, b))
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
        self.mutate(|| {
            let (px, py, n) = (
                self.rt.ptr(x.buf()?),
                self.rt.ptr(y.buf()?),
                (x.rows * x.cols) as u64,
            );
            self.rt.launch(
                "add",
                kernels::Shape::Elements(n as usize),
                &args![px, py, n],
            )
        })
    }

    fn reshape(&self, mut x: CudaTensor, cols: usize) -> CudaTensor {
        let n = x.rows * x.cols;
        assert!(
            cols > 0 && n % cols == 0,
            "reshape: {n} values are not rows of {cols}"
        );
        x.rows = n / cols;
        x.cols = cols;
        x
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> CudaTensor {
        self.produce(x.rows, x.cols, || {
            norm_shape("rms_norm", &[("weight", w)], x.cols)?;
            let out = self.alloc::<f32>(x.rows * x.cols, "an activation")?;
            let (px, pw, po, d) = (
                self.rt.ptr(x.buf()?),
                self.rt.ptr(w.f32("rms_norm weight")?),
                self.rt.ptr(&out),
                x.cols as i32,
            );
            self.rt.launch(
                "rms_norm",
                kernels::Shape::Rows(x.rows),
                &args![px, pw, po, d, eps],
            )?;
            Ok(out)
        })
    }

    fn layer_norm(&self, x: &CudaTensor, w: &CudaWeight, b: &CudaWeight, eps: f32) -> CudaTensor {
        self.produce(x.rows, x.cols, || {
            let out = self.alloc::<f32>(x.rows * x.cols, "an activation")?;
            self.try_layer_norm(
                x.buf()?,
                None,
                self.rt.ptr(&out),
                (x.rows, x.cols),
                (w, b, eps),
            )?;
            Ok(out)
        })
    }

    fn add_layer_norm(
        &self,
        x: CudaTensor,
        y: &CudaTensor,
        w: &CudaWeight,
        b: &CudaWeight,
        eps: f32,
    ) -> CudaTensor {
        assert_eq!(
            (x.rows, x.cols),
            (y.rows, y.cols),
            "add_layer_norm: shapes differ"
        );
        let (rows, cols) = (x.rows, x.cols);
        self.produce(rows, cols, || {
            let data = x.data.ok_or_else(poisoned)?;
            // In place: the kernel writes x + y into x, then normalizes it there.
            self.try_layer_norm(
                &data,
                Some(y.buf()?),
                self.rt.ptr(&data),
                (rows, cols),
                (w, b, eps),
            )?;
            Ok(data)
        })
    }

    fn rope_tables(&self, cos: Array2<f32>, sin: Array2<f32>) -> CudaRope {
        let (rows, half) = cos.dim();
        let upload = |t: Array2<f32>| {
            let t = t.as_standard_layout();
            let mut out = None;
            self.mutate(|| {
                out = Some(self.upload(t.as_slice().expect("standard layout"), "rotary tables")?);
                Ok(())
            });
            out
        };
        CudaRope {
            cos: upload(cos),
            sin: upload(sin),
            rows,
            half,
        }
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, tables: &CudaRope) {
        assert!(
            2 * tables.half <= head_dim && x.cols % head_dim == 0,
            "rope: tables of {} pairs for heads of {head_dim} in {} features",
            tables.half,
            x.cols
        );
        assert_eq!(
            tables.rows, x.rows,
            "rope: tables for {} tokens, activation has {}",
            tables.rows, x.rows
        );
        self.mutate(|| {
            let (c, s) = (
                tables.cos.as_ref().ok_or_else(poisoned)?,
                tables.sin.as_ref().ok_or_else(poisoned)?,
            );
            let (px, pc, ps) = (self.rt.ptr(x.buf()?), self.rt.ptr(c), self.rt.ptr(s));
            let (t, d, hd, half) = (
                x.rows as i32,
                x.cols as i32,
                head_dim as i32,
                tables.half as i32,
            );
            self.rt.launch(
                "rope",
                kernels::Shape::Elements(x.rows * x.cols / head_dim * tables.half),
                &args![px, pc, ps, t, d, hd, half],
            )
        })
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        h: Heads,
        segments: &Segments,
        mask: AttentionMask,
    ) -> CudaTensor {
        let tokens = segments.tokens();
        self.produce(tokens, h.heads * h.head_dim, || {
            if !(1..=kernels::MAX_HEAD_DIM).contains(&h.head_dim) || h.kv_heads == 0 || h.heads % h.kv_heads != 0 {
                return Err(DeviceError::Unsupported {
                    op: "attention",
                    detail: format!("head_dim 1 to {} and heads a multiple of kv_heads, found head_dim {}, heads {}, kv_heads {}", kernels::MAX_HEAD_DIM, h.head_dim, h.heads, h.kv_heads),
                });
            }
            let (starts, ends) = segment_bounds(segments);
            let (ds, de) = (self.upload(&starts, "attention segments")?, self.upload(&ends, "attention segments")?);
            let out = self.alloc::<f32>(tokens * h.heads * h.head_dim, "an attention output")?;
            let (pq, pk, pv, po, pst, pen) = (self.rt.ptr(q.buf()?), self.rt.ptr(k.buf()?), self.rt.ptr(v.buf()?), self.rt.ptr(&out), self.rt.ptr(&ds), self.rt.ptr(&de));
            let (t, heads, kvh, hd) = (tokens as i32, h.heads as i32, h.kv_heads as i32, h.head_dim as i32);
            let (ldq, ldk, ldv) = (q.cols as i32, k.cols as i32, v.cols as i32);
            let (scale, softcap) = (h.scale, h.softcap.unwrap_or(0.0));
            let (causal, window) = mask_args(mask);
            let (q_tile, k_tile) = kernels::attention_tiles(h.head_dim);
            let shape = kernels::Shape::Attention { tokens, heads: h.heads, q_tile };
            let (qt, kt) = (q_tile as i32, k_tile as i32);
            self.rt.launch("attention", shape, &args![pq, pk, pv, po, pst, pen, t, heads, kvh, hd, ldq, ldk, ldv, scale, softcap, causal, window, qt, kt])?;
            Ok(out)
        })
    }

    fn activate(&self, x: &mut CudaTensor, act: Activation) {
        self.mutate(|| {
            let (px, n, a) = (
                self.rt.ptr(x.buf()?),
                (x.rows * x.cols) as u64,
                activation_code(act),
            );
            self.rt.launch(
                "activate_inplace",
                kernels::Shape::Elements(n as usize),
                &args![px, n, a],
            )
        })
    }

    fn gated(&self, gate: &CudaTensor, up: &CudaTensor, act: Activation) -> CudaTensor {
        assert_eq!(
            (gate.rows, gate.cols),
            (up.rows, up.cols),
            "gated: shapes differ"
        );
        self.produce(gate.rows, gate.cols, || {
            let n = gate.rows * gate.cols;
            let out = self.alloc::<f32>(n, "an activation")?;
            let (pg, pu, po, n64, a) = (
                self.rt.ptr(gate.buf()?),
                self.rt.ptr(up.buf()?),
                self.rt.ptr(&out),
                n as u64,
                activation_code(act),
            );
            self.rt.launch(
                "gated",
                kernels::Shape::Elements(n),
                &args![pg, pu, po, n64, a],
            )?;
            Ok(out)
        })
    }

    fn gather(&self, x: &CudaTensor, idx: &[usize]) -> CudaTensor {
        assert!(
            idx.iter().all(|&r| r < x.rows),
            "gather: a row is outside the {} rows",
            x.rows
        );
        self.produce(idx.len(), x.cols, || self.try_gather(x, idx))
    }

    fn scatter_add(&self, out: &mut CudaTensor, y: &CudaTensor, idx: &[usize], w: &[f32]) {
        assert_eq!(
            (y.rows, y.cols),
            (idx.len(), out.cols),
            "scatter_add: one index per row of y, as wide as out"
        );
        assert_eq!(w.len(), idx.len(), "scatter_add: one weight per row");
        assert!(
            idx.iter().all(|&r| r < out.rows),
            "scatter_add: an index is outside the {} rows",
            out.rows
        );
        if idx.is_empty() || out.cols == 0 {
            return;
        }
        self.mutate(|| {
            let rows: Vec<i32> = idx.iter().map(|&r| r as i32).collect();
            let di = self.upload(&rows, "row indices")?;
            let dw = self.upload(w, "routing weights")?;
            let (po, py, pi, pw, d) = (
                self.rt.ptr(out.buf()?),
                self.rt.ptr(y.buf()?),
                self.rt.ptr(&di),
                self.rt.ptr(&dw),
                out.cols as i32,
            );
            self.rt.launch(
                "scatter_add_rows",
                kernels::Shape::Rows(idx.len()),
                &args![po, py, pi, pw, d],
            )
        });
    }

    fn rows(&self, x: &CudaTensor, keep: &[usize]) -> Array2<f32> {
        let mut host = Array2::<f32>::zeros((keep.len(), x.cols));
        if keep.is_empty() || x.cols == 0 {
            return host;
        }
        assert!(
            keep.iter().all(|&r| r < x.rows),
            "rows: a kept row is outside the {} rows",
            x.rows
        );
        // Every row in order (an MoE router's logits): download in place, without the gather's
        // device copy.
        let every_row = keep.len() == x.rows && keep.iter().enumerate().all(|(i, &r)| i == r);
        self.mutate(|| {
            let values = if every_row {
                self.rt.download(x.buf()?, 0..keep.len() * x.cols)?
            } else {
                let picked = self.try_gather(x, keep)?;
                self.rt.download(&picked, 0..keep.len() * x.cols)?
            };
            host.as_slice_mut()
                .expect("standard layout")
                .copy_from_slice(&values);
            Ok(())
        });
        host
    }

    fn host_view<'a>(&self, _: &'a CudaTensor) -> Option<ArrayView2<'a, f32>> {
        None
    }

    fn dim(&self, x: &CudaTensor) -> usize {
        x.cols
    }

    fn tokens(&self, x: &CudaTensor) -> usize {
        x.rows
    }
}

impl Cuda {
    /// The rows `keep` of `x`, in order, as a new device buffer (the capture of a layer input
    /// without padding or label-masked tokens).
    fn try_gather(&self, x: &CudaTensor, keep: &[usize]) -> Result<Buffer<f32>, DeviceError> {
        let idx: Vec<i32> = keep.iter().map(|&r| r as i32).collect();
        let di = self.upload(&idx, "row indices")?;
        let out = self.alloc::<f32>(keep.len() * x.cols, "selected rows")?;
        let (px, pi, po, d) = (
            self.rt.ptr(x.buf()?),
            self.rt.ptr(&di),
            self.rt.ptr(&out),
            x.cols as i32,
        );
        self.rt.launch(
            "gather_rows",
            kernels::Shape::Rows(keep.len()),
            &args![px, pi, po, d],
        )?;
        Ok(out)
    }
}

/// A norm's weights and biases, one value per feature each, or the error (recorded by the op:
/// the kernel would read past a shorter one).
fn norm_shape(
    op: &'static str,
    vectors: &[(&str, &CudaWeight)],
    d: usize,
) -> Result<(), DeviceError> {
    for (what, v) in vectors {
        if let Some(detail) = norm_mismatch(what, &v.shape, d) {
            return Err(DeviceError::Unsupported { op, detail });
        }
    }
    Ok(())
}

/// The kernels' code of an activation function (`activate` in kernels.cu).
fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Relu => 3,
    }
}

/// The attention kernel's `causal` and `window` arguments: bidirectional `(0, -1)`, causal
/// without a window `(1, -1)`, with a window of `w` keys `(1, w)` (0 included: no key, as on the
/// CPU).
fn mask_args(mask: AttentionMask) -> (i32, i32) {
    match mask {
        AttentionMask::Bidirectional => (0, -1),
        AttentionMask::Causal { window } => {
            (1, window.map_or(-1, |w| w.min(i32::MAX as usize) as i32))
        }
    }
}

/// For every token, the first token and one past the last of its sequence (the attention
/// kernel's per-query key range before masking).
pub fn segment_bounds(segments: &Segments) -> (Vec<i32>, Vec<i32>) {
    let (mut starts, mut ends) = (
        Vec::with_capacity(segments.tokens()),
        Vec::with_capacity(segments.tokens()),
    );
    for r in &segments.ranges {
        starts.extend(std::iter::repeat_n(r.start as i32, r.len()));
        ends.extend(std::iter::repeat_n(r.end as i32, r.len()));
    }
    (starts, ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_bounds_give_each_token_its_sequence() {
        let s = Segments::from_lengths([2, 0, 3]);
        let (a, b) = segment_bounds(&s);
        assert_eq!(a, vec![0, 0, 2, 2, 2]);
        assert_eq!(b, vec![2, 2, 5, 5, 5]);
    }

    #[test]
    fn mask_args_keep_a_window_of_zero_apart_from_no_window() {
        assert_eq!(mask_args(AttentionMask::Bidirectional), (0, -1));
        assert_eq!(mask_args(AttentionMask::Causal { window: None }), (1, -1));
        assert_eq!(mask_args(AttentionMask::Causal { window: Some(0) }), (1, 0));
        assert_eq!(mask_args(AttentionMask::Causal { window: Some(7) }), (1, 7));
        assert_eq!(
            mask_args(AttentionMask::Causal {
                window: Some(usize::MAX)
            }),
            (1, i32::MAX)
        );
    }

    /// `rows` copies the kept rows in order: every row (downloaded in place), a subset, repeats
    /// and reordering (gathered first), as the CPU backend does.
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn rows_copies_every_row_or_the_kept_ones_in_order() {
        use crate::device::cpu::Cpu;
        let gpu = Cuda::open(CudaOptions::default()).unwrap();
        let x = Array2::from_shape_fn((5, 3), |(i, j)| (i * 10 + j) as f32);
        let dx = gpu.to_device(&x).unwrap();
        for keep in [
            vec![0, 1, 2, 3, 4],
            vec![1, 3],
            vec![4, 0, 4],
            vec![],
            vec![0, 1, 2, 3],
        ] {
            assert_eq!(gpu.rows(&dx, &keep), Cpu.rows(&x, &keep), "keep {keep:?}");
        }
    }

    /// Another library's context (PyTorch's, on its current device) is current before eva is
    /// called; eva's calls bind eva's, as cudarc does; a [`CallerContext`] held across them puts
    /// the caller's back (the Python extension holds one across every entry point).
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn a_saved_caller_context_is_current_again_after_eva_bound_its_own() {
        use runtime::{current_context, set_current_context};
        let theirs = Some(7);
        set_current_context(theirs);
        {
            let _keep = CallerContext::save();
            let gpu = Cuda::open(CudaOptions::default()).unwrap();
            let x = gpu.to_device(&Array2::ones((3, 4))).unwrap();
            assert_eq!(gpu.to_host(&x).unwrap().sum(), 12.0);
            assert_eq!(current_context(), Some(0), "eva's calls bind eva's context");
        }
        assert_eq!(
            current_context(),
            theirs,
            "the caller's context is current again"
        );
        set_current_context(None);
        let _keep = CallerContext::save();
        set_current_context(Some(0));
        drop(_keep);
        assert_eq!(current_context(), None, "no context before: none after");
    }

    /// The Python extension's CUDA path, its Rust side: rows in memory another library allocated
    /// on the device (PyTorch's tensor, whose `data_ptr` eva_lora hands over; here an allocation
    /// the emulator made, poisoned like any fresh one before it is written) are borrowed by their
    /// raw address, read in place by the exact Gram, and give bit for bit the sums of the same
    /// rows as eva's own tensor; dropping the borrowed tensor leaves the memory to its owner.
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn borrowed_device_pointers_feed_the_statistics_as_owned_tensors() {
        use crate::device::gpu::GramAccumulator;
        use gram::DeviceGram;
        let gpu = Cuda::open(CudaOptions {
            dtype: DType::F32,
            ..CudaOptions::default()
        })
        .unwrap();
        let (rows, d) = (300, 24);
        let x = Array2::from_shape_fn((rows, d), |(i, j)| ((i * 7 + j * 13) % 17) as f32 - 8.0);
        let theirs = gpu.to_device(&x).unwrap();
        let ptr = gpu.rt.ptr(theirs.values().unwrap());
        let reference = vec![0.5f32; d];
        let sums = |t: &CudaTensor| {
            let mut g = DeviceGram::new(&gpu, &reference, DType::F32, 128).unwrap();
            g.accumulate(&gpu, t).unwrap();
            g.snapshot(&gpu).unwrap()
        };
        let owned = sums(&theirs);
        // SAFETY: `ptr` addresses `theirs`' rows × d values, alive and unchanged below.
        let borrowed = unsafe { gpu.borrow(ptr, rows, d) };
        assert_eq!(gpu.to_host(&borrowed).unwrap(), x);
        let read = sums(&borrowed);
        assert_eq!(read.0, owned.0, "moments");
        assert!(
            read.1
                .iter()
                .zip(&owned.1)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "Gram"
        );
        drop(borrowed);
        gpu.synchronize().unwrap();
        assert_eq!(
            gpu.to_host(&theirs).unwrap(),
            x,
            "the owner's memory is untouched"
        );
    }

    /// Finiteness checks are queued without a download; the verdict names the earliest failing
    /// check and its first non-finite value in the host check's words, and clears the queue;
    /// a full queue settles itself before it takes the next check.
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn queued_finiteness_checks_name_the_earliest_failure_as_the_host_check_does() {
        use crate::device::rows::check_finite;
        let gpu = Cuda::open(CudaOptions::default()).unwrap();
        let fine = Array2::from_shape_fn((5, 4), |(i, j)| (i * 4 + j) as f32);
        let mut nan = fine.clone();
        nan[(4, 1)] = f32::INFINITY;
        nan[(3, 2)] = f32::NAN;
        let mut neg = fine.clone();
        neg[(0, 3)] = f32::NEG_INFINITY;
        let host_error = |x: &Array2<f32>, what: &str| {
            check_finite(x.view(), || what.into())
                .unwrap_err()
                .to_string()
        };
        let on = |x: &Array2<f32>| gpu.to_device(x).unwrap();
        let (f, n, g) = (on(&fine), on(&nan), on(&neg));
        let queue = |x: &CudaTensor, what: &str| gpu.queue_finite(x, what.into());

        gpu.settle_finite().unwrap();
        queue(&f, "fine").unwrap();
        gpu.settle_finite().unwrap();
        for (x, what) in [(&f, "fine"), (&n, "nan"), (&g, "neg"), (&f, "fine")] {
            queue(x, what).unwrap();
        }
        let e = gpu.settle_finite().unwrap_err().to_string();
        assert_eq!(e, host_error(&nan, "nan"));
        gpu.settle_finite().unwrap();
        queue(&f, "fine").unwrap();
        gpu.settle_finite().unwrap();
        queue(&g, "neg").unwrap();
        queue(&n, "nan").unwrap();
        let e = gpu.settle_finite().unwrap_err().to_string();
        assert_eq!(e, host_error(&neg, "neg"));

        queue(&n, "nan").unwrap();
        for _ in 1..MAX_PENDING_CHECKS {
            queue(&f, "fine").unwrap();
        }
        let e = queue(&f, "fine").unwrap_err().to_string();
        assert_eq!(e, host_error(&nan, "nan"), "a full queue settles first");
        gpu.settle_finite().unwrap();
    }

    /// Memory another library caches (here: a tensor the release callback drops) is used for
    /// the device; `ensure_free` calls the release before it reports out-of-memory, and only then.
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn ensure_free_releases_what_another_library_caches_before_giving_up() {
        use std::sync::Arc;
        let gpu = Cuda::open(CudaOptions::default()).unwrap();
        let cached = Arc::new(Mutex::new(Some(
            gpu.alloc_tensor(1 << 20, 4, "a cache").unwrap(),
        )));
        let (free, _) = gpu.rt.memory().unwrap();
        let need = free + (8 << 20);
        let e = gpu.ensure_free(need, "a test").unwrap_err().to_string();
        assert!(e.contains("a test"), "{e}");
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, n) = (cached.clone(), calls.clone());
        gpu.on_low_memory(Box::new(move || {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            c.lock().unwrap().take();
        }));
        gpu.ensure_free(need / 2, "a test").unwrap();
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "enough was free"
        );
        gpu.ensure_free(need, "a test").unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(cached.lock().unwrap().is_none(), "the cache was released");
    }

    #[test]
    fn activation_codes_match_the_kernel_switch() {
        // kernels.cu: 0 silu, 1 gelu (erf), 2 gelu tanh, 3 relu.
        let src = kernels::SOURCE;
        assert!(src
            .contains("// backend::Activation::apply. 0 silu, 1 gelu (erf), 2 gelu tanh, 3 relu."));
        let codes = [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Relu,
        ]
        .map(activation_code);
        assert_eq!(codes, [0, 1, 2, 3]);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn probe_names_the_files_it_tries() {
        let names = probe::candidates("cublas");
        assert!(names.iter().any(|n| n == "libcublas.so"), "{names:?}");
        let e = probe::missing("cuBLAS", "cublas", "");
        let msg = e.to_string();
        assert!(
            msg.contains("libcublas.so") && msg.contains("LD_LIBRARY_PATH"),
            "{msg}"
        );
    }

    /// Without a GPU, opening the device must fail with a sentence (never a panic), and the
    /// sentence must be a usage error naming what is missing.
    #[cfg(feature = "cuda")]
    #[test]
    fn opening_without_a_gpu_is_a_clear_usage_error() {
        // SAFETY: probing only loads libraries.
        if unsafe { cudarc::driver::sys::is_culib_present() }
            && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
        {
            eprintln!("a GPU is visible: this test is about machines without one");
            return;
        }
        let e = match Cuda::open(CudaOptions::default()) {
            Ok(_) => panic!("opened a GPU that the probe says is not there"),
            Err(e) => e,
        };
        assert_eq!(e.exit_code(), 2, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("--device cuda:"), "{msg}");
    }
}

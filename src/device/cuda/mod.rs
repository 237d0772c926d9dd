//! The CUDA backend (feature `cuda`): the forward pass on one NVIDIA GPU through cudarc, and the
//! device-side statistics it feeds.
//!
//! | item | role |
//! |---|---|
//! | [`Cuda`] | [`Backend`] on a GPU: weights resident once, cuBLAS `GemmEx` for linear layers, NVRTC kernels for the rest |
//! | [`CudaOptions`], [`DType`] | which GPU, and the weights' storage type (`--dtype bf16\|f32`) |
//! | [`probe`] | which CUDA libraries load, before cudarc is asked to (a missing library panics inside it) |
//! | [`kernels`] | the CUDA C source, its NVRTC compilation, launch shapes |
//! | [`gram`] | the statistics' accumulators on the device: exact Grams (f32 products flushed into f64), moments, sketch products, sums to all-reduce |
//! | [`DeviceError`] | what failed, by name; missing libraries and devices are usage errors (exit code 2) |
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
    ($($a:expr),* $(,)?) => { [$($crate::device::cuda::Arg::from($a)),*] };
}

pub mod gram;
pub mod kernels;

pub use gram::{DeviceGram, DeviceSketch, DeviceSums};

use super::backend::{Activation, AttentionMask, Backend, Heads, Segments};
use super::error::{Bytes, DeviceError};
use super::gpu::{CudaOptions, DType, Gpu};
use super::host::HostTensor;
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DriverError, LaunchConfig, PushKernelArg,
};
use ndarray::{Array2, ArrayView2};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Which CUDA libraries load, checked before any cudarc call (cudarc panics on a missing one).
pub mod probe {
    use super::DeviceError;

    /// A library cudarc loads dynamically: its cudarc name, what it is, and what provides it.
    struct Lib {
        name: &'static str,
        what: &'static str,
        hint: &'static str,
        present: unsafe fn() -> bool,
    }

    const LIBS: [Lib; 3] = [
        Lib { name: "cuda", what: "the CUDA driver library", hint: " (it comes with the NVIDIA driver; none is installed, or this machine has no GPU)", present: cudarc::driver::sys::is_culib_present },
        Lib { name: "nvrtc", what: "NVRTC (CUDA's runtime compiler)", hint: " (pip's nvidia-cuda-nvrtc or the CUDA toolkit; a `libnvrtc.so` symlink in a directory on LD_LIBRARY_PATH serves any version)", present: cudarc::nvrtc::sys::is_culib_present },
        Lib { name: "cublas", what: "cuBLAS", hint: " (pip's nvidia-cublas or the CUDA toolkit; this eva was built for the CUDA version in CUDARC_CUDA_VERSION at build time, see docs/gpu.md)", present: cudarc::cublas::sys::is_culib_present },
    ];

    /// The file names cudarc tries for a library, in order.
    pub fn candidates(name: &str) -> Vec<String> {
        cudarc::get_lib_name_candidates(name)
    }

    /// `Ok` when the driver, NVRTC and cuBLAS all load; otherwise the first missing one, named
    /// with the file names tried and `LD_LIBRARY_PATH`.
    pub fn libraries() -> Result<(), DeviceError> {
        for lib in &LIBS {
            // SAFETY: the probe only tries to load the shared library (libloading).
            if !unsafe { (lib.present)() } {
                return Err(missing(lib.what, lib.name, lib.hint));
            }
        }
        Ok(())
    }

    /// The number of GPUs the driver sees (at least one), after [`libraries`].
    pub fn devices() -> Result<usize, DeviceError> {
        libraries()?;
        let visible = || std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| match e.0 {
            cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => DeviceError::NoDevice(format!(
                "the CUDA driver loaded but found no GPU (CUDA_VISIBLE_DEVICES={})",
                visible()
            )),
            _ => super::driver("driver initialization")(e),
        })?;
        if count <= 0 {
            return Err(DeviceError::NoDevice(format!(
                "the CUDA driver loaded but found no GPU (CUDA_VISIBLE_DEVICES={})",
                visible()
            )));
        }
        Ok(count as usize)
    }

    /// The error for a missing library.
    pub fn missing(what: &'static str, name: &str, hint: &'static str) -> DeviceError {
        let mut seen = std::collections::HashSet::new();
        let names: Vec<String> = candidates(name)
            .into_iter()
            .filter(|n| seen.insert(n.clone()))
            .collect();
        DeviceError::Missing {
            what,
            names: names.join(", "),
            ld_library_path: std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "unset".into()),
            hint,
        }
    }
}

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

/// A CUDA driver error with its status name.
fn driver(op: &'static str) -> impl Fn(DriverError) -> DeviceError {
    move |e| DeviceError::Driver {
        op,
        name: format!("{:?}", e.0),
    }
}

/// An activation on the device: f32, row-major `[rows, cols]`. Empty (`None`) after a device
/// failure (see the module docs).
pub struct CudaTensor {
    data: Option<CudaSlice<f32>>,
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

    fn buf(&self) -> Result<&CudaSlice<f32>, DeviceError> {
        self.data.as_ref().ok_or_else(poisoned)
    }

    /// Its `rows × cols` values, for a communicator to send (NCCL, GPU to GPU); the error of the
    /// failed op that left it empty.
    pub fn values(&self) -> crate::Result<CudaView<'_, f32>> {
        Ok(self.buf()?.slice(0..self.rows * self.cols))
    }

    /// Its `rows × cols` values, for a communicator to receive into.
    pub fn values_mut(&mut self) -> crate::Result<CudaViewMut<'_, f32>> {
        let n = self.rows * self.cols;
        Ok(self.data.as_mut().ok_or_else(poisoned)?.slice_mut(0..n))
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
            data.leak();
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

/// A weight on the device: matrices in the chosen [`DType`], vectors (norms, biases) in f32.
pub struct CudaWeight {
    data: WeightData,
    shape: Vec<usize>,
}

enum WeightData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<half::bf16>),
}

impl CudaWeight {
    fn f32(&self, what: &'static str) -> Result<&CudaSlice<f32>, DeviceError> {
        match &self.data {
            WeightData::F32(s) => Ok(s),
            WeightData::Bf16(_) => Err(DeviceError::Unsupported {
                op: what,
                detail: "expected an f32 vector, found a bf16 matrix".into(),
            }),
        }
    }

    fn ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        match &self.data {
            WeightData::F32(s) => s.device_ptr(stream).0,
            WeightData::Bf16(s) => s.device_ptr(stream).0,
        }
    }
}

/// The CUDA backend: one GPU, one stream, cuBLAS on that stream, the kernels compiled for the
/// device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    opts: CudaOptions,
    name: String,
    capability: (i32, i32),
    error: Mutex<Option<DeviceError>>,
}

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
        let ctx = CudaContext::new(opts.ordinal).map_err(driver("context creation"))?;
        // One stream does everything, in order: the per-buffer events cudarc records to order
        // several streams are not needed.
        // SAFETY: no buffer of this context is used from another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let capability = ctx
            .compute_capability()
            .map_err(driver("compute capability query"))?;
        let name = ctx.name().map_err(driver("device name query"))?;
        let ptx = kernels::compile(&kernels::arch(capability.0, capability.1))?;
        let module = ctx.load_module(ptx).map_err(driver(
            "loading the kernels (PTX newer than the driver? use the NVRTC of this machine's CUDA)",
        ))?;
        let mut functions = HashMap::new();
        for name in kernels::NAMES {
            functions.insert(
                name,
                module
                    .load_function(name)
                    .map_err(driver("kernel lookup"))?,
            );
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| DeviceError::Blas {
            op: "handle creation",
            name: format!("{:?}", e.0),
        })?;
        Ok(Cuda {
            ctx,
            stream,
            blas,
            functions,
            opts,
            name,
            capability,
            error: Mutex::new(None),
        })
    }

    /// Fails with the out-of-memory error, before anything is allocated, unless `needed` bytes
    /// are free (e.g. the weights of this rank's slice before uploading them).
    pub fn ensure_free(&self, needed: usize, what: &str) -> crate::Result<()> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver("memory query"))?;
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

    /// The stream everything runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The storage type of the weights.
    pub fn dtype(&self) -> DType {
        self.opts.dtype
    }

    /// A device allocation of `len` values, out-of-memory named.
    fn alloc<T: cudarc::driver::DeviceRepr>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>, DeviceError> {
        // SAFETY: every caller writes the buffer (kernel, cuBLAS with beta = 0, or copy) before
        // it is read.
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| self.alloc_error(e, len * std::mem::size_of::<T>(), what))
    }

    fn zeros_of<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>, DeviceError> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| self.alloc_error(e, len * std::mem::size_of::<T>(), what))
    }

    fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>, DeviceError> {
        if host.is_empty() {
            return self.alloc(0, what);
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| self.alloc_error(e, std::mem::size_of_val(host), what))
    }

    fn alloc_error(&self, e: DriverError, bytes: usize, what: &str) -> DeviceError {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            self.oom(what, bytes, free, total)
        } else {
            driver("allocation")(e)
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
        op: impl FnOnce() -> Result<CudaSlice<f32>, DeviceError>,
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

    fn function(&self, name: &'static str) -> &CudaFunction {
        self.functions
            .get(name)
            .expect("every kernel in kernels::NAMES was loaded in Cuda::new")
    }

    /// Launches `name` with `shape` and `args` (device pointers and element counts as `u64`,
    /// sizes as `i32`, scalars as `f32`, in the order of the kernel's parameters).
    fn launch(
        &self,
        name: &'static str,
        shape: kernels::Shape,
        args: &[Arg],
    ) -> Result<(), DeviceError> {
        let Some(cfg): Option<LaunchConfig> = shape.config()? else {
            return Ok(());
        };
        let f = self.function(name);
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: each kernel's parameters in kernels.cu match what its caller pushes (pointers
        // to buffers of the sizes the shapes imply, which the callers allocate or check).
        unsafe { b.launch(cfg) }.map_err(driver(name))?;
        Ok(())
    }

    fn ptr(&self, s: &CudaSlice<impl cudarc::driver::DeviceRepr>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// `C = alpha · op(A) op(B) + beta · C` in cuBLAS's column-major terms, f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`, no TF32), inputs f32 or bf16, output f32.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
        input: DType,
    ) -> Result<(), DeviceError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dims = [m, n, k, lda, ldb, ldc];
        if dims.iter().any(|&v| v > i32::MAX as usize) {
            return Err(DeviceError::Unsupported {
                op: "cuBLAS GemmEx",
                detail: format!("dimensions {dims:?} exceed i32"),
            });
        }
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ty = match input {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
        };
        let (alpha, beta) = (1.0f32, beta);
        // SAFETY: a, b, c address buffers of at least lda·(cols of op A), ... values, as the
        // callers allocate; alpha/beta are host scalars (cuBLAS's default pointer mode).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ty,
                lda as i32,
                b as *const c_void,
                ty,
                ldb as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| DeviceError::Blas {
            op: "GemmEx",
            name: format!("{:?}", e.0),
        })
    }

    /// `x` rounded to bf16 (the input of a bf16 product).
    fn to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<half::bf16>, DeviceError> {
        let y = self.alloc::<half::bf16>(n, "rounding activations to bf16")?;
        let (px, py, n64) = (self.ptr(x), self.ptr(&y), n as u64);
        self.launch(
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
    ) -> Result<CudaSlice<f32>, DeviceError> {
        let (m, k) = (x.rows, x.cols);
        let n = w.shape[0];
        let xb = x.buf()?;
        let y = self.alloc::<f32>(m * n, "a linear layer's output")?;
        let py = self.ptr(&y);
        let beta = match bias {
            Some(b) => {
                let pb = self.ptr(b.f32("linear bias")?);
                let cols = n as i32;
                self.launch("fill_rows", kernels::Shape::Rows(m), &args![py, pb, cols])?;
                1.0
            }
            None => 0.0,
        };
        // Row-major Y[m,n] = X[m,k] Wᵀ is column-major Yᶜ[n,m] = Wᶜᵀ Xᶜ with Wᶜ = W as [k,n].
        let pw = w.ptr(&self.stream);
        match &w.data {
            WeightData::F32(_) => self.gemm(
                true,
                false,
                n,
                m,
                k,
                pw,
                k,
                self.ptr(xb),
                k,
                beta,
                py,
                n,
                DType::F32,
            )?,
            WeightData::Bf16(_) => {
                let xh = self.to_bf16(xb, m * k)?;
                self.gemm(
                    true,
                    false,
                    n,
                    m,
                    k,
                    pw,
                    k,
                    self.ptr(&xh),
                    k,
                    beta,
                    py,
                    n,
                    DType::Bf16,
                )?
            }
        }
        Ok(y)
    }

    /// `layer_norm` kernel over `rows × d` values: `(x + residual)` normalized with `(w, b, eps)`
    /// into `out` (which may be `x`).
    fn try_layer_norm(
        &self,
        x: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        out: u64,
        (rows, d): (usize, usize),
        (w, b, eps): (&CudaWeight, &CudaWeight, f32),
    ) -> Result<(), DeviceError> {
        let (px, pr) = (self.ptr(x), residual.map_or(0u64, |r| self.ptr(r)));
        let (pw, pb) = (
            self.ptr(w.f32("layer_norm weight")?),
            self.ptr(b.f32("layer_norm bias")?),
        );
        let d32 = d as i32;
        self.launch(
            "layer_norm",
            kernels::Shape::Rows(rows),
            &args![px, pr, pw, pb, out, d32, eps],
        )
    }
}

impl Cuda {
    /// A device-to-host copy of the first `len` values of `src`, after the queued work.
    fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
    ) -> crate::Result<Vec<T>> {
        let mut host = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&src.slice(0..len), &mut host[..])
                .map_err(driver("device-to-host copy"))?;
            self.stream.synchronize().map_err(driver("synchronize"))?;
        }
        Ok(host)
    }

    /// A host-to-device copy into `dst` (at least as long as `src`).
    fn copy_to_device<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut impl cudarc::driver::DevicePtrMut<T>,
    ) -> crate::Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        Ok(self
            .stream
            .memcpy_htod(src, dst)
            .map_err(driver("host-to-device copy"))?)
    }

    /// A device-to-device copy of `src` into `dst`.
    fn copy_on_device<T>(
        &self,
        src: &impl cudarc::driver::DevicePtr<T>,
        dst: &mut impl cudarc::driver::DevicePtrMut<T>,
    ) -> crate::Result<()> {
        if src.len() == 0 {
            return Ok(());
        }
        Ok(self
            .stream
            .memcpy_dtod(src, dst)
            .map_err(driver("device-to-device copy"))?)
    }

    /// Row-major `Z = G Q` for a symmetric `d x d` f64 `G` whose upper triangle (row-major) is
    /// valid and `Q`, `Z` row-major `d x m`: cuBLAS `dsymm`. In column-major terms `Zᶜ = Qᶜ G`
    /// (`G` from the right) and the row-major upper triangle is the column-major lower one.
    fn symm_f64(
        &self,
        g: &CudaSlice<f64>,
        d: usize,
        q: &CudaSlice<f64>,
        m: usize,
        z: &mut CudaSlice<f64>,
    ) -> Result<(), DeviceError> {
        if d == 0 || m == 0 {
            return Ok(());
        }
        if d > i32::MAX as usize || m > i32::MAX as usize {
            return Err(DeviceError::Unsupported {
                op: "cuBLAS dsymm",
                detail: format!("d = {d}, m = {m} exceed i32"),
            });
        }
        let (alpha, beta) = (1.0f64, 0.0f64);
        let (pg, pq, pz) = (self.ptr(g), self.ptr(q), self.ptr(z));
        // SAFETY: g holds d·d values, q and z m·d (callers allocate them so); alpha and beta are
        // host scalars (cuBLAS's default pointer mode).
        unsafe {
            blas_sys::cublasDsymm_v2(
                *self.blas.handle(),
                blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                m as i32,
                d as i32,
                &alpha,
                pg as *const f64,
                d as i32,
                pq as *const f64,
                m as i32,
                &beta,
                pz as *mut f64,
                m as i32,
            )
        }
        .result()
        .map_err(|e| DeviceError::Blas {
            op: "dsymm",
            name: format!("{:?}", e.0),
        })
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
            self.name, self.opts.ordinal, self.capability.0, self.capability.1, self.opts.dtype
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
        Ok(self.stream.synchronize().map_err(driver("synchronize"))?)
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
        let mut host = vec![0.0f32; x.rows * x.cols];
        if !host.is_empty() {
            self.stream
                .memcpy_dtoh(x.buf()?, &mut host[..])
                .map_err(driver("device-to-host copy"))?;
            self.stream.synchronize().map_err(driver("synchronize"))?;
        }
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
        let data = unsafe { self.stream.upgrade_device_ptr::<f32>(ptr, rows * cols) };
        BorrowedTensor(CudaTensor {
            data: Some(data),
            rows,
            cols,
        })
    }

    /// This GPU's stream as a raw `CUstream` (0: the legacy default stream), for a caller that
    /// orders its own work against eva's (PyTorch's `torch.cuda.ExternalStream`).
    fn raw_stream(&self) -> usize {
        self.stream.cu_stream() as usize
    }

    /// The rows `keep` of `x` on the device, for device statistics ([`gram`]).
    fn select(&self, x: &CudaTensor, keep: &[usize]) -> CudaTensor {
        assert!(
            keep.iter().all(|&r| r < x.rows),
            "select: a kept row is outside the {} rows",
            x.rows
        );
        self.produce(keep.len(), x.cols, || self.try_gather(x, keep))
    }

    /// Whether every value of `x` is finite (one flag comes back to the host).
    fn all_finite(&self, x: &CudaTensor) -> crate::Result<bool> {
        self.check()?;
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(true);
        }
        let flag = self.zeros_of::<u32>(1, "a finiteness flag")?;
        let (px, n64, pf) = (self.ptr(x.buf()?), n as u64, self.ptr(&flag));
        self.launch(
            "flag_nonfinite",
            kernels::Shape::Elements(n),
            &args![px, n64, pf],
        )?;
        Ok(self.download(&flag, 1)?[0] == 0)
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;

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
        let rows = table.shape[0];
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(crate::Error::data(format!(
                "{what}: index {id} is outside the table of {rows} rows"
            )));
        }
        self.check()?;
        let n = ids.len().min(x.rows);
        let run = || -> Result<(), DeviceError> {
            let dev_ids = self.upload(&ids[..n], "token ids")?;
            let (px, pt, pi, dim) = (
                self.ptr(x.buf()?),
                table.ptr(&self.stream),
                self.ptr(&dev_ids),
                x.cols as i32,
            );
            let kernel = match table.data {
                WeightData::F32(_) => "embed_f32",
                WeightData::Bf16(_) => "embed_bf16",
            };
            self.launch(kernel, kernels::Shape::Rows(n), &args![px, pt, pi, dim])
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
                self.ptr(x.buf()?),
                self.ptr(y.buf()?),
                (x.rows * x.cols) as u64,
            );
            self.launch(
                "add",
                kernels::Shape::Elements(n as usize),
                &args![px, py, n],
            )
        })
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> CudaTensor {
        self.produce(x.rows, x.cols, || {
            let out = self.alloc::<f32>(x.rows * x.cols, "an activation")?;
            let (px, pw, po, d) = (
                self.ptr(x.buf()?),
                self.ptr(w.f32("rms_norm weight")?),
                self.ptr(&out),
                x.cols as i32,
            );
            self.launch(
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
                self.ptr(&out),
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
                self.ptr(&data),
                (rows, cols),
                (w, b, eps),
            )?;
            Ok(data)
        })
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, cos: &Array2<f32>, sin: &Array2<f32>) {
        assert_eq!(
            cos.nrows(),
            x.rows,
            "rope: tables for {} tokens, activation has {}",
            cos.nrows(),
            x.rows
        );
        self.mutate(|| {
            let c = self.upload(cos.as_slice().expect("standard layout"), "rotary tables")?;
            let s = self.upload(sin.as_slice().expect("standard layout"), "rotary tables")?;
            let (px, pc, ps) = (self.ptr(x.buf()?), self.ptr(&c), self.ptr(&s));
            let (t, d, hd) = (x.rows as i32, x.cols as i32, head_dim as i32);
            self.launch(
                "rope",
                kernels::Shape::Elements(x.rows * x.cols / 2),
                &args![px, pc, ps, t, d, hd],
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
            if h.head_dim > kernels::MAX_HEAD_DIM || h.kv_heads == 0 || h.heads % h.kv_heads != 0 {
                return Err(DeviceError::Unsupported {
                    op: "attention",
                    detail: format!("head_dim at most {} and heads a multiple of kv_heads, found head_dim {}, heads {}, kv_heads {}", kernels::MAX_HEAD_DIM, h.head_dim, h.heads, h.kv_heads),
                });
            }
            let (starts, ends) = segment_bounds(segments);
            let (ds, de) = (self.upload(&starts, "attention segments")?, self.upload(&ends, "attention segments")?);
            let out = self.alloc::<f32>(tokens * h.heads * h.head_dim, "an attention output")?;
            let (pq, pk, pv, po, pst, pen) = (self.ptr(q.buf()?), self.ptr(k.buf()?), self.ptr(v.buf()?), self.ptr(&out), self.ptr(&ds), self.ptr(&de));
            let (heads, kvh, hd) = (h.heads as i32, h.kv_heads as i32, h.head_dim as i32);
            let (ldq, ldk, ldv) = (q.cols as i32, k.cols as i32, v.cols as i32);
            let scale = 1.0 / (h.head_dim as f32).sqrt();
            let (causal, window) = match mask {
                AttentionMask::Bidirectional => (0i32, 0i32),
                AttentionMask::Causal { window } => (1, window.map_or(0, |w| w.min(i32::MAX as usize) as i32)),
            };
            self.launch("attention", kernels::Shape::Attention { tokens, heads: h.heads }, &args![pq, pk, pv, po, pst, pen, heads, kvh, hd, ldq, ldk, ldv, scale, causal, window])?;
            Ok(out)
        })
    }

    fn activate(&self, x: &mut CudaTensor, act: Activation) {
        self.mutate(|| {
            let (px, n, a) = (
                self.ptr(x.buf()?),
                (x.rows * x.cols) as u64,
                activation_code(act),
            );
            self.launch(
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
                self.ptr(gate.buf()?),
                self.ptr(up.buf()?),
                self.ptr(&out),
                n as u64,
                activation_code(act),
            );
            self.launch(
                "gated",
                kernels::Shape::Elements(n),
                &args![pg, pu, po, n64, a],
            )?;
            Ok(out)
        })
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
        self.mutate(|| {
            let picked = self.try_gather(x, keep)?;
            self.stream
                .memcpy_dtoh(&picked, host.as_slice_mut().expect("standard layout"))
                .map_err(driver("device-to-host copy"))?;
            self.stream.synchronize().map_err(driver("synchronize"))
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
    fn try_gather(&self, x: &CudaTensor, keep: &[usize]) -> Result<CudaSlice<f32>, DeviceError> {
        let idx: Vec<i32> = keep.iter().map(|&r| r as i32).collect();
        let di = self.upload(&idx, "row indices")?;
        let out = self.alloc::<f32>(keep.len() * x.cols, "selected rows")?;
        let (px, pi, po, d) = (
            self.ptr(x.buf()?),
            self.ptr(&di),
            self.ptr(&out),
            x.cols as i32,
        );
        self.launch(
            "gather_rows",
            kernels::Shape::Rows(keep.len()),
            &args![px, pi, po, d],
        )?;
        Ok(out)
    }
}

/// One kernel parameter: a device pointer or count (`u64`, `unsigned long long` / `T*`), a size
/// (`int`) or a scalar (`float`).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::U64(v)
    }
}

impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}

impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
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
    #[test]
    fn opening_without_a_gpu_is_a_clear_usage_error() {
        // SAFETY: probing only loads libraries.
        if unsafe { cudarc::driver::sys::is_culib_present() }
            && CudaContext::device_count().is_ok_and(|n| n > 0)
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

//! The GPU runtime seam: everything the CUDA backend asks of the driver and cuBLAS, in one small
//! interface over one device and one stream. The backend's ops (`super`), the statistics'
//! accumulators (`super::gram`) and the Python binding's borrowed tensors talk to the GPU only
//! through it, so a second implementation (an emulated device for the test suite) can stand in
//! for cudarc without touching them.
//!
//! | call | what the driver does |
//! |---|---|
//! | [`Runtime::open`] | context, stream, cuBLAS handle; the kernels compiled (NVRTC, a CUBIN for the device: `kernels::target`) and loaded |
//! | [`Runtime::alloc`], [`Runtime::zeros`], [`Runtime::upload`] | device memory: uninitialized, zeroed, or a copy of host values |
//! | [`Runtime::download`], [`Runtime::write`], [`Runtime::copy`] | copies device → host (after the queued work), host → device, device → device |
//! | [`Runtime::launch`] | a kernel by name, with its shape and arguments |
//! | [`Runtime::gemm`], [`Runtime::symm_f64`] | the two cuBLAS calls eva makes (`cublasGemmEx`, `cublasDsymm`) |
//! | [`Runtime::synchronize`], [`Runtime::memory`], [`Runtime::trim`], [`Runtime::raw_stream`] | waits, free/total memory, the pool's kept memory back to the driver, the stream for callers that order their work against eva's |
//! | [`Runtime::borrow`] | device memory another library of this process owns, read in place |
//! | [`CallerContext`] | the calling thread's current context, put back when dropped (cudarc makes eva's current and leaves it) |
//!
//! Pointers cross the seam as `u64` device addresses ([`Runtime::ptr`]); every other file of the
//! backend names no cudarc type. The NCCL seam (`nccl.rs`) reaches a buffer's memory through
//! [`Buffer::slice`] and [`Buffer::slice_mut`].

use super::kernels::{self, Arg, Shape};
use crate::config::validate::DType;
use crate::device::error::DeviceError;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;

/// A value type device buffers hold (f32, bf16, f64, i32, u32).
pub trait Elem: DeviceRepr + ValidAsZeroBits + Default + Clone + Unpin {}
impl<T: DeviceRepr + ValidAsZeroBits + Default + Clone + Unpin> Elem for T {}

/// Device memory of `len` values of `T` (at least one value is allocated, so that an empty
/// buffer still has an address).
pub struct Buffer<T> {
    slice: CudaSlice<T>,
    len: usize,
}

impl<T> Buffer<T> {
    /// Values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// cudarc's view of the memory, for the NCCL seam (`nccl.rs`).
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    /// cudarc's view of the memory, for the NCCL seam (`nccl.rs`).
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }

    /// Forgets the memory without freeing it (a borrowed buffer's owner frees it).
    pub fn forget(self) {
        self.slice.leak();
    }
}

/// Why an allocation failed: out of memory (with the device's free and total bytes then), or
/// another driver error.
pub enum AllocError {
    /// `cudaErrorMemoryAllocation`.
    OutOfMemory { free: usize, total: usize },
    /// Anything else.
    Driver(DeviceError),
}

/// A CUDA driver error with its status name.
pub fn driver(op: &'static str) -> impl Fn(DriverError) -> DeviceError {
    move |e| DeviceError::Driver {
        op,
        name: format!("{:?}", e.0),
    }
}

/// The calling thread's current CUDA context when it was saved, made current again when this is
/// dropped. cudarc binds eva's context to the calling thread before each call and leaves it
/// bound, so that a host program on another GPU (PyTorch, whose current device is the current
/// context's) would find its current device changed after calling eva: the Python extension
/// holds one of these across each of its entry points. Without a loadable driver there is no
/// context to keep, and nothing is done.
pub struct CallerContext(Option<Option<cudarc::driver::sys::CUcontext>>);

impl CallerContext {
    /// Saves the calling thread's current context (none is a value too).
    pub fn save() -> Self {
        // SAFETY: only loads the driver library to see whether it is there.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return CallerContext(None);
        }
        CallerContext(cudarc::driver::result::ctx::get_current().ok())
    }
}

impl Drop for CallerContext {
    fn drop(&mut self) {
        if let Some(ctx) = self.0 {
            // SAFETY: the context was current on this thread when saved (or none was, and null
            // unbinds); a context PyTorch or eva made outlives the calls between. A failure
            // leaves eva's context current, which is what happened before this type existed.
            let _ = unsafe {
                cudarc::driver::result::ctx::set_current(ctx.unwrap_or(std::ptr::null_mut()))
            };
        }
    }
}

/// One GPU, one stream, cuBLAS on that stream, the kernels loaded.
///
/// Dropping it waits for the stream, then destroys the cuBLAS handle, then unloads the kernels'
/// module (the fields' drops): nothing queued still runs code being unloaded. Failures there
/// (a sticky error after a fault, the timeout path) are ignored: there is nothing left to report
/// them to, and a panic in a drop would abort the unwinding that led here.
pub struct Runtime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLAS's handle on `stream`, made and destroyed here rather than by cudarc's `CudaBlas`,
    /// whose `Drop` panics when the destroy fails (after a sticky error, on the timeout path).
    blas: blas_sys::cublasHandle_t,
    functions: HashMap<&'static str, CudaFunction>,
    /// The device's name (`NVIDIA H200`).
    pub name: String,
    /// Its compute capability (`(9, 0)`).
    pub capability: (i32, i32),
}

/// The stream-ordered pool cudarc allocates from (`cuMemAllocAsync`): the device's current one.
fn mem_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool, DeviceError> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: writes one handle.
    unsafe { cudarc::driver::sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(driver("memory pool query"))?;
    Ok(pool)
}

/// Sets the pool's release threshold to "keep everything": at the default (0) every
/// synchronize (each capture's download, each step) hands the freed memory back to the driver,
/// and the next batch's buffers come from the driver again. Kept memory is at most the peak of
/// eva's temporaries; [`Runtime::trim`] gives it back before an out-of-memory decision.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), DeviceError> {
    let pool = mem_pool(ctx)?;
    let mut keep = u64::MAX;
    // SAFETY: the pool handle just queried; the attribute takes a u64.
    unsafe {
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        )
    }
    .result()
    .map_err(driver("setting the memory pool's release threshold"))
}

// SAFETY: the cuBLAS handle is used only through `&self` calls on this runtime's stream, as
// cudarc's `CudaBlas` (which is Send and Sync) uses it.
unsafe impl Send for Runtime {}
// SAFETY: see `Send`.
unsafe impl Sync for Runtime {}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        let _ = self.ctx.bind_to_thread();
        // SAFETY: made in `open`, not used after this.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(self.blas) };
    }
}

impl Runtime {
    /// Opens GPU `ordinal` (which the caller checked the driver sees): creates the context and
    /// stream, compiles the kernels with NVRTC for the device's compute capability and loads
    /// them, and makes the cuBLAS handle.
    pub fn open(ordinal: usize) -> Result<Self, DeviceError> {
        let ctx = CudaContext::new(ordinal).map_err(driver("context creation"))?;
        // One stream does everything, in order: the per-buffer events cudarc records to order
        // several streams are not needed.
        // SAFETY: no buffer of this context is used from another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let capability = ctx
            .compute_capability()
            .map_err(driver("compute capability query"))?;
        let name = ctx.name().map_err(driver("device name query"))?;
        let image = match kernels::target(capability, &kernels::supported_archs()?)? {
            kernels::Target::Cubin(arch) => {
                cudarc::nvrtc::Ptx::from_binary(kernels::compile_cubin(&arch)?)
            }
            kernels::Target::Ptx(arch) => kernels::compile(&arch)?,
        };
        let module = ctx
            .load_module(image)
            .map_err(driver("loading the kernels"))?;
        keep_freed_memory(&ctx)?;
        let mut functions = HashMap::new();
        for name in kernels::NAMES {
            functions.insert(
                name,
                module
                    .load_function(name)
                    .map_err(driver("kernel lookup"))?,
            );
        }
        let blas_err = |e: cudarc::cublas::result::CublasError| DeviceError::Blas {
            op: "handle creation",
            name: format!("{:?}", e.0),
        };
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        let blas = cudarc::cublas::result::create_handle().map_err(blas_err)?;
        // SAFETY: a handle just made, and this context's stream.
        if let Err(e) = unsafe { cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _) }
        {
            // SAFETY: the handle is not used again.
            let _ = unsafe { cudarc::cublas::result::destroy_handle(blas) };
            return Err(blas_err(e));
        }
        Ok(Runtime {
            ctx,
            stream,
            blas,
            functions,
            name,
            capability,
        })
    }

    /// Gives the memory eva's pool keeps (freed by eva, not given back) back to the driver,
    /// before eva or another library decides it is out of memory.
    pub fn trim(&self) -> Result<(), DeviceError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let pool = mem_pool(&self.ctx)?;
        // SAFETY: the device's pool; keeping 0 bytes frees whatever it holds unused.
        unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .map_err(driver("trimming the memory pool"))
    }

    /// The device's free and total bytes.
    pub fn memory(&self) -> Result<(usize, usize), DeviceError> {
        self.ctx.mem_get_info().map_err(driver("memory query"))
    }

    fn alloc_error(&self, e: DriverError) -> AllocError {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.memory().unwrap_or((0, 0));
            AllocError::OutOfMemory { free, total }
        } else {
            AllocError::Driver(driver("allocation")(e))
        }
    }

    /// `len` values whose contents are undefined until written.
    ///
    /// # Safety
    ///
    /// The caller writes every value (a kernel, cuBLAS with `beta = 0`, or a copy) before any
    /// is read.
    pub unsafe fn alloc<T: Elem>(&self, len: usize) -> Result<Buffer<T>, AllocError> {
        // SAFETY: the caller's contract.
        let slice =
            unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| self.alloc_error(e))?;
        Ok(Buffer { slice, len })
    }

    /// `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buffer<T>, AllocError> {
        let slice = self
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| self.alloc_error(e))?;
        Ok(Buffer { slice, len })
    }

    /// A copy of `host` in device memory.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<Buffer<T>, AllocError> {
        if host.is_empty() {
            return self.zeros(0);
        }
        let slice = self
            .stream
            .clone_htod(host)
            .map_err(|e| self.alloc_error(e))?;
        Ok(Buffer {
            slice,
            len: host.len(),
        })
    }

    /// The values `range` of `src` in host memory, after the work queued so far.
    pub fn download<T: Elem>(
        &self,
        src: &Buffer<T>,
        range: Range<usize>,
    ) -> Result<Vec<T>, DeviceError> {
        assert!(
            range.end <= src.len,
            "download: {range:?} is outside {} values",
            src.len
        );
        let mut host = vec![T::default(); range.len()];
        if !host.is_empty() {
            self.stream
                .memcpy_dtoh(&src.slice.slice(range), &mut host[..])
                .map_err(driver("device-to-host copy"))?;
            self.stream.synchronize().map_err(driver("synchronize"))?;
        }
        Ok(host)
    }

    /// Copies `src` from host memory into `dst` at value `at`.
    pub fn write<T: Elem>(
        &self,
        src: &[T],
        dst: &mut Buffer<T>,
        at: usize,
    ) -> Result<(), DeviceError> {
        assert!(
            at + src.len() <= dst.len,
            "write: {} values at {at} do not fit {}",
            src.len(),
            dst.len
        );
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(src, &mut dst.slice.slice_mut(at..at + src.len()))
            .map_err(driver("host-to-device copy"))
    }

    /// Copies all of `src` into `dst` at value `at`, on the device.
    pub fn copy<T: Elem>(
        &self,
        src: &Buffer<T>,
        dst: &mut Buffer<T>,
        at: usize,
    ) -> Result<(), DeviceError> {
        assert!(
            at + src.len <= dst.len,
            "copy: {} values at {at} do not fit {}",
            src.len,
            dst.len
        );
        if src.len == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(
                &src.slice.slice(0..src.len),
                &mut dst.slice.slice_mut(at..at + src.len),
            )
            .map_err(driver("device-to-device copy"))
    }

    /// The device address of a buffer, for kernel arguments and cuBLAS.
    pub fn ptr<T: Elem>(&self, b: &Buffer<T>) -> u64 {
        b.slice.device_ptr(&self.stream).0
    }

    /// Launches kernel `name` with `shape` and `args` (device pointers and element counts as
    /// `u64`, sizes as `i32`, scalars as `f32`, in the order of the kernel's parameters).
    pub fn launch(
        &self,
        name: &'static str,
        shape: Shape,
        args: &[Arg],
    ) -> Result<(), DeviceError> {
        let Some(l) = shape.config()? else {
            return Ok(());
        };
        let cfg = LaunchConfig {
            grid_dim: l.grid_dim,
            block_dim: l.block_dim,
            shared_mem_bytes: l.shared_mem_bytes,
        };
        let f = self
            .functions
            .get(name)
            .expect("every kernel in kernels::NAMES was loaded in Runtime::open");
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

    /// `C = alpha · op(A) op(B) + beta · C` in cuBLAS's column-major terms, f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`, no TF32), inputs f32 or bf16, output f32, `alpha = 1`.
    ///
    /// # Safety
    ///
    /// `a`, `b` and `c` address device buffers of at least `lda·(columns of op(A))`,
    /// `ldb·(columns of op(B))` and `ldc·n` values of the input type (`c`: f32).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
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
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        // SAFETY: the caller's contract on a, b, c; alpha/beta are host scalars (cuBLAS's
        // default pointer mode).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                self.blas,
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

    /// Row-major `Z = G Q` for a symmetric `d x d` f64 `G` whose upper triangle (row-major) is
    /// valid and `Q`, `Z` row-major `d x m`: cuBLAS `dsymm`. In column-major terms `Zᶜ = Qᶜ G`
    /// (`G` from the right) and the row-major upper triangle is the column-major lower one.
    pub fn symm_f64(
        &self,
        g: &Buffer<f64>,
        d: usize,
        q: &Buffer<f64>,
        m: usize,
        z: &mut Buffer<f64>,
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
        assert!(
            g.len >= d * d && q.len >= d * m && z.len >= d * m,
            "symm_f64: buffers shorter than d = {d}, m = {m} imply"
        );
        let (alpha, beta) = (1.0f64, 0.0f64);
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let (pg, pq, pz) = (self.ptr(g), self.ptr(q), self.ptr(z));
        // SAFETY: g holds d·d values, q and z m·d (checked above); alpha and beta are host
        // scalars (cuBLAS's default pointer mode).
        unsafe {
            blas_sys::cublasDsymm_v2(
                self.blas,
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

    /// Waits for the work queued so far.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    /// The stream as a raw `CUstream` (0: the legacy default stream).
    pub fn raw_stream(&self) -> usize {
        self.stream.cu_stream() as usize
    }

    /// `len` f32 values at `ptr`, memory another library of this process owns on this device in
    /// the primary context; [`Buffer::forget`] it instead of dropping it.
    ///
    /// # Safety
    ///
    /// `ptr` addresses `len` f32 values on this device, which stay allocated while the buffer
    /// and the work queued on it live.
    pub unsafe fn borrow(&self, ptr: u64, len: usize) -> Buffer<f32> {
        // SAFETY: the caller's contract.
        let slice = unsafe { self.stream.upgrade_device_ptr::<f32>(ptr, len) };
        Buffer { slice, len }
    }
}

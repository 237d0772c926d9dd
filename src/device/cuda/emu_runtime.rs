//! The emulated GPU (feature `cuda-emu`): the runtime seam of `runtime.rs` served on the host, so
//! that the CUDA backend, the device statistics and `--device cuda` run unchanged on a machine
//! without a GPU (tests and CI; not a user feature). What it keeps of a device:
//!
//! | seam call | emulated as |
//! |---|---|
//! | memory | host memory the host code cannot read (a [`Buffer`] has no accessor: copies go through [`Runtime::download`]), filled with `0xFF` bytes (NaN) when allocated uninitialized, within a capacity (`EVA_EMU_MEMORY` bytes, default 16 GiB) so that out-of-memory paths run |
//! | [`Runtime::launch`] | the same `kernels.cu`, compiled for the host by build.rs with eva's shim header; a block's threads run as fibers switching at `__syncthreads()` (`device::emu`) |
//! | [`Runtime::gemm`] | `cublasGemmEx` by column-major CBLAS `sgemm` (bf16 inputs widened exactly; f32 accumulation), the same transposes and leading dimensions, `C` unread when `beta = 0` |
//! | [`Runtime::symm_f64`] | `cublasDsymm` (right side, lower triangle) by CBLAS `dsymm` on a copy whose other triangle is NaN, so that reading it shows |
//! | stream | launches and copies run when called: [`Runtime::synchronize`] waits for nothing |
//! | current context | per OS thread, as the driver's: every call binds its device's context ([`current_context`]), as cudarc's `bind_to_thread` does; [`CallerContext`] puts back the caller's |
//!
//! Devices: `EVA_EMU_DEVICES` (default 1) of them, each with its own capacity.

use super::kernels::{Arg, Shape, NAMES};
use crate::config::validate::DType;
use crate::device::emu;
use crate::device::error::DeviceError;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A value type device buffers hold (f32, bf16, f64, i32, u32, u64): plain bits, any pattern valid.
pub trait Elem: Copy + Default + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for i32 {}
impl Elem for u32 {}
impl Elem for u64 {}
impl Elem for half::bf16 {}

/// Emulated device memory of `len` values of `T` (at least one value is allocated, so that an
/// empty buffer still has an address). The host code cannot read it but through the runtime.
pub struct Buffer<T> {
    ptr: *mut T,
    len: usize,
    /// Values allocated (`len.max(1)`); `None` for borrowed memory.
    owned: Option<(usize, Arc<AtomicUsize>)>,
}

// SAFETY: a buffer is plain memory owned by (or borrowed for) one holder, as a cudarc slice is.
unsafe impl<T: Send> Send for Buffer<T> {}
// SAFETY: shared references only read the address; writes go through `&mut` or kernels.
unsafe impl<T: Sync> Sync for Buffer<T> {}

impl<T> Buffer<T> {
    /// Values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory's address, for the emulated NCCL (`emu_nccl.rs`), which reads and writes it
    /// as device-side code does.
    pub(super) fn device_ptr(&self) -> *mut T {
        self.ptr
    }

    /// Forgets the memory without freeing it (a borrowed buffer's owner frees it).
    pub fn forget(mut self) {
        self.owned = None;
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        if let Some((cap, used)) = self.owned.take() {
            used.fetch_sub(cap * std::mem::size_of::<T>(), Ordering::SeqCst);
            // SAFETY: allocated by `Runtime::raw` as a boxed slice of `cap` values.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, cap)) });
        }
    }
}

/// Why an allocation failed: out of the emulated capacity (with its free and total bytes).
pub enum AllocError {
    /// Beyond `EVA_EMU_MEMORY`.
    OutOfMemory { free: usize, total: usize },
    /// Never made by the emulator (the real runtime's other driver errors).
    Driver(DeviceError),
}

thread_local! {
    /// The calling thread's current context: an emulated device's ordinal, or another value a
    /// test sets for a context some other library made (`None`: no context bound).
    static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The calling thread's current context, as `cuCtxGetCurrent` (an emulated device's ordinal).
pub fn current_context() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

/// Makes `ctx` the calling thread's current context, as `cuCtxSetCurrent` (tests stand for
/// another library's context with a value no emulated device has).
pub fn set_current_context(ctx: Option<usize>) {
    CURRENT.with(|c| c.set(ctx));
}

/// The calling thread's current context when it was saved, made current again when dropped (as
/// the real runtime's).
pub struct CallerContext(Option<usize>);

impl CallerContext {
    /// Saves the calling thread's current context.
    pub fn save() -> Self {
        CallerContext(current_context())
    }
}

impl Drop for CallerContext {
    fn drop(&mut self) {
        set_current_context(self.0);
    }
}

/// The number of emulated devices (`EVA_EMU_DEVICES`, default 1).
pub fn device_count() -> usize {
    std::env::var("EVA_EMU_DEVICES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// One emulated GPU.
pub struct Runtime {
    /// Its context (the device's ordinal), bound to the calling thread by every call.
    ctx: usize,
    /// The device's name.
    pub name: String,
    /// Its compute capability (the emulator claims `sm_90`).
    pub capability: (i32, i32),
    total: usize,
    used: Arc<AtomicUsize>,
}

impl Runtime {
    /// Opens emulated GPU `ordinal`, checking that the host build of the kernels holds every
    /// kernel the backend launches.
    pub fn open(ordinal: usize) -> Result<Self, DeviceError> {
        let built = emu::kernel_names();
        for name in NAMES {
            if !built.contains(&name) {
                return Err(DeviceError::Unsupported {
                    op: "emulated device",
                    detail: format!("the host build of kernels.cu lacks the kernel {name}"),
                });
            }
        }
        let total = std::env::var("EVA_EMU_MEMORY")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(16usize << 30);
        set_current_context(Some(ordinal));
        Ok(Runtime {
            ctx: ordinal,
            name: format!("eva emulated CUDA device {ordinal}"),
            capability: (9, 0),
            total,
            used: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Binds this device's context to the calling thread (cudarc's `bind_to_thread`).
    fn bind(&self) {
        set_current_context(Some(self.ctx));
    }

    /// The emulated device frees at once (no pool keeps memory): nothing to give back.
    pub fn trim(&self) -> Result<(), DeviceError> {
        self.bind();
        Ok(())
    }

    /// The device's free and total bytes.
    pub fn memory(&self) -> Result<(usize, usize), DeviceError> {
        self.bind();
        let used = self.used.load(Ordering::SeqCst);
        Ok((self.total.saturating_sub(used), self.total))
    }

    /// `len` values, every byte `fill`, within the capacity.
    fn raw<T: Elem>(&self, len: usize, fill: u8) -> Result<Buffer<T>, AllocError> {
        self.bind();
        let cap = len.max(1);
        let bytes = cap * std::mem::size_of::<T>();
        let mut used = self.used.load(Ordering::SeqCst);
        loop {
            if used + bytes > self.total {
                return Err(AllocError::OutOfMemory {
                    free: self.total.saturating_sub(used),
                    total: self.total,
                });
            }
            match self
                .used
                .compare_exchange(used, used + bytes, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        let mut values: Box<[T]> = vec![T::default(); cap].into_boxed_slice();
        // SAFETY: `Elem` types are plain bits: every byte pattern is a value.
        unsafe { std::ptr::write_bytes(values.as_mut_ptr(), fill, cap) };
        Ok(Buffer {
            ptr: Box::into_raw(values) as *mut T,
            len,
            owned: Some((cap, self.used.clone())),
        })
    }

    /// `len` values whose contents are undefined until written: here NaN (`0xFF` bytes), so that
    /// reading what was never written shows in the results.
    ///
    /// # Safety
    ///
    /// The caller writes every value before any is read (as with the real device).
    pub unsafe fn alloc<T: Elem>(&self, len: usize) -> Result<Buffer<T>, AllocError> {
        self.raw(len, 0xFF)
    }

    /// `len` zeros.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<Buffer<T>, AllocError> {
        self.raw(len, 0)
    }

    /// A copy of `host` in device memory.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<Buffer<T>, AllocError> {
        let mut b = self.raw(host.len(), 0xFF)?;
        self.write(host, &mut b, 0).map_err(AllocError::Driver)?;
        Ok(b)
    }

    /// The values `range` of `src` in host memory.
    pub fn download<T: Elem>(
        &self,
        src: &Buffer<T>,
        range: Range<usize>,
    ) -> Result<Vec<T>, DeviceError> {
        self.bind();
        assert!(
            range.end <= src.len,
            "download: {range:?} is outside {} values",
            src.len
        );
        // SAFETY: the range lies inside the buffer's values (checked).
        Ok(unsafe { std::slice::from_raw_parts(src.ptr.add(range.start), range.len()) }.to_vec())
    }

    /// Copies `src` from host memory into `dst` at value `at`.
    pub fn write<T: Elem>(
        &self,
        src: &[T],
        dst: &mut Buffer<T>,
        at: usize,
    ) -> Result<(), DeviceError> {
        self.bind();
        assert!(
            at + src.len() <= dst.len,
            "write: {} values at {at} do not fit {}",
            src.len(),
            dst.len
        );
        // SAFETY: the destination range lies inside `dst` (checked); `&mut` excludes overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr.add(at), src.len()) };
        Ok(())
    }

    /// Copies all of `src` into `dst` at value `at`.
    pub fn copy<T: Elem>(
        &self,
        src: &Buffer<T>,
        dst: &mut Buffer<T>,
        at: usize,
    ) -> Result<(), DeviceError> {
        self.bind();
        assert!(
            at + src.len <= dst.len,
            "copy: {} values at {at} do not fit {}",
            src.len,
            dst.len
        );
        // SAFETY: both ranges lie inside their buffers (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(src.ptr, dst.ptr.add(at), src.len) };
        Ok(())
    }

    /// The address of a buffer, for kernel arguments and the BLAS calls.
    pub fn ptr<T: Elem>(&self, b: &Buffer<T>) -> u64 {
        b.ptr as u64
    }

    /// Runs kernel `name` with `shape` and `args` on the host build of kernels.cu.
    pub fn launch(
        &self,
        name: &'static str,
        shape: Shape,
        args: &[Arg],
    ) -> Result<(), DeviceError> {
        self.bind();
        let Some(l) = shape.config()? else {
            return Ok(());
        };
        // The kernels use static shared memory only (the executor has no dynamic shared memory).
        assert_eq!(
            l.shared_mem_bytes, 0,
            "{name}: dynamic shared memory is not emulated"
        );
        // SAFETY: each kernel's parameters in kernels.cu match what its caller pushes (pointers
        // to buffers of the sizes the shapes imply, which the callers allocate or check), as for
        // the real runtime; the executor checks the count and kind of every argument.
        unsafe { emu::launch(name, l.grid_dim, l.block_dim, args) }.map_err(|e| {
            DeviceError::Unsupported {
                op: "emulated kernel launch",
                detail: e.message,
            }
        })
    }

    /// `C = op(A) op(B) + beta · C` in cuBLAS's column-major terms (`cublasGemmEx`, f32
    /// accumulation), inputs f32 or bf16, output f32: column-major CBLAS `sgemm` on the same
    /// pointers and leading dimensions (bf16 inputs widened to f32 first, which is exact).
    ///
    /// # Safety
    ///
    /// As the real runtime's: `a`, `b`, `c` address buffers of at least the values their
    /// leading dimensions and shapes imply.
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
        self.bind();
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
        // Column-major op(A) is m x k: A is m x k (lda >= m) or, transposed, k x m (lda >= k).
        let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
        if lda < a_rows.max(1) || ldb < b_rows.max(1) || ldc < m.max(1) {
            // cuBLAS refuses these with CUBLAS_STATUS_INVALID_VALUE.
            return Err(DeviceError::Blas {
                op: "GemmEx",
                name: format!("CUBLAS_STATUS_INVALID_VALUE (lda {lda}, ldb {ldb}, ldc {ldc} for m {m}, n {n}, k {k})"),
            });
        }
        let extent = |ld: usize, rows: usize, cols: usize| {
            if cols == 0 {
                0
            } else {
                ld * (cols - 1) + rows
            }
        };
        let widen = |p: u64, len: usize| -> Vec<f32> {
            match input {
                // SAFETY: the caller's contract: `len` values at `p`.
                DType::F32 => unsafe { std::slice::from_raw_parts(p as *const f32, len) }.to_vec(),
                DType::Bf16 => unsafe { std::slice::from_raw_parts(p as *const half::bf16, len) }
                    .iter()
                    .map(|v| v.to_f32())
                    .collect(),
            }
        };
        let av = widen(a, extent(lda, a_rows, a_cols));
        let bv = widen(b, extent(ldb, b_rows, b_cols));
        let cp = c as *mut f32;
        if beta == 0.0 {
            // cuBLAS does not read C when beta is 0 (it may hold NaN).
            for j in 0..n {
                // SAFETY: the caller's contract: column j of C has m values at ldc·j.
                unsafe { std::ptr::write_bytes(cp.add(j * ldc), 0, m) };
            }
        }
        let op = |t: bool| {
            if t {
                cblas_sys::CBLAS_TRANSPOSE::CblasTrans
            } else {
                cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans
            }
        };
        // SAFETY: the widened copies hold the extents the shapes imply; C is the caller's.
        unsafe {
            cblas_sys::cblas_sgemm(
                cblas_sys::CBLAS_LAYOUT::CblasColMajor,
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                1.0,
                if av.is_empty() {
                    std::ptr::null()
                } else {
                    av.as_ptr()
                },
                lda as i32,
                if bv.is_empty() {
                    std::ptr::null()
                } else {
                    bv.as_ptr()
                },
                ldb as i32,
                beta,
                cp,
                ldc as i32,
            )
        };
        Ok(())
    }

    /// `cublasDsymm` as the real runtime calls it (right side, lower triangle in column-major
    /// terms): row-major `Z = G Q` reading only `G`'s row-major upper triangle; the other triangle
    /// of a copy is NaN, so that a wrong fill mode shows.
    pub fn symm_f64(
        &self,
        g: &Buffer<f64>,
        d: usize,
        q: &Buffer<f64>,
        m: usize,
        z: &mut Buffer<f64>,
    ) -> Result<(), DeviceError> {
        self.bind();
        if d == 0 || m == 0 {
            return Ok(());
        }
        assert!(
            g.len >= d * d && q.len >= d * m && z.len >= d * m,
            "symm_f64: buffers shorter than d = {d}, m = {m} imply"
        );
        let mut gc = self.download(g, 0..d * d)?;
        // Column-major lower (row >= col) is row-major upper: poison column-major upper.
        for col in 0..d {
            for row in 0..col {
                gc[col * d + row] = f64::NAN;
            }
        }
        let qv = self.download(q, 0..d * m)?;
        // SAFETY: gc holds d·d values, qv and z d·m (checked above).
        unsafe {
            cblas_sys::cblas_dsymm(
                cblas_sys::CBLAS_LAYOUT::CblasColMajor,
                cblas_sys::CBLAS_SIDE::CblasRight,
                cblas_sys::CBLAS_UPLO::CblasLower,
                m as i32,
                d as i32,
                1.0,
                gc.as_ptr(),
                d as i32,
                qv.as_ptr(),
                m as i32,
                0.0,
                z.ptr,
                m as i32,
            )
        };
        Ok(())
    }

    /// Nothing is queued: every call ran when it was made.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.bind();
        Ok(())
    }

    /// The emulator has no CUDA stream (0, the legacy default stream's value).
    pub fn raw_stream(&self) -> usize {
        0
    }

    /// `len` f32 values at `ptr`, memory another part of this process owns (an address an
    /// emulated buffer gave out); never freed here.
    ///
    /// # Safety
    ///
    /// `ptr` addresses `len` f32 values, which stay allocated while the buffer lives.
    pub unsafe fn borrow(&self, ptr: u64, len: usize) -> Buffer<f32> {
        Buffer {
            ptr: ptr as *mut f32,
            len,
            owned: None,
        }
    }
}

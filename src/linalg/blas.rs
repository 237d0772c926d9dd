//! CBLAS, row-major, on the calling thread: [`sgemm`] and the [`Gemm`] scalars (`sgemm`,
//! `dgemm`) that the tiled products and the CPU backend call.

use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE};

/// CBLAS's transpose flag.
pub(super) fn trans(t: bool) -> CBLAS_TRANSPOSE {
    if t {
        CBLAS_TRANSPOSE::CblasTrans
    } else {
        CBLAS_TRANSPOSE::CblasNoTrans
    }
}

/// Row-major `C = alpha · op(A) op(B) + beta · C` (`C: m x n`) through CBLAS, on the calling
/// thread.
///
/// # Safety
/// The pointers must address matrices of the given shapes and leading dimensions.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    let i = |v: usize| i32::try_from(v).expect("matrix dimension exceeds the BLAS 32-bit limit");
    cblas_sys::cblas_sgemm(
        CBLAS_LAYOUT::CblasRowMajor,
        trans(ta),
        trans(tb),
        i(m),
        i(n),
        i(k),
        alpha,
        a,
        i(lda),
        b,
        i(ldb),
        beta,
        c,
        i(ldc),
    );
}

/// Scalars with a BLAS `xgemm`.
pub trait Gemm: Copy + Default + Send + Sync + 'static {
    /// Rounds an f64 to this type.
    fn from_f64(v: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// `out = a·b` for row-major `a` (`rows x d`, leading dimension `d`) and `b` (`d x m`), `out`
    /// (`rows x m`).
    ///
    /// # Safety
    /// The pointers must address matrices of the sizes above.
    unsafe fn gemm(rows: i32, m: i32, d: i32, a: *const Self, b: *const Self, out: *mut Self);
}

macro_rules! gemm_impl {
    ($t:ty, $f:ident) => {
        impl Gemm for $t {
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            unsafe fn gemm(
                rows: i32,
                m: i32,
                d: i32,
                a: *const Self,
                b: *const Self,
                out: *mut Self,
            ) {
                cblas_sys::$f(
                    CBLAS_LAYOUT::CblasRowMajor,
                    CBLAS_TRANSPOSE::CblasNoTrans,
                    CBLAS_TRANSPOSE::CblasNoTrans,
                    rows,
                    m,
                    d,
                    1.0,
                    a,
                    d,
                    b,
                    m,
                    0.0,
                    out,
                    m,
                );
            }
        }
    };
}
gemm_impl!(f64, cblas_dgemm);
gemm_impl!(f32, cblas_sgemm);

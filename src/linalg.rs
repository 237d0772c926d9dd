//! Dense linear-algebra helpers: BLAS kernels the hot paths call directly (`ssyrk`, `sgemm`,
//! `dsymm`), LAPACK `xsyevr`, and the faer decompositions the leader needs, on row-major
//! `ndarray` matrices.
//!
//! **Threads.** OpenBLAS runs every call on the calling thread; eva's own kernels cut their work
//! into tiles whose shapes depend on the problem alone ([`tiles`]) and spread the tiles over
//! [`threads`] threads ([`par_tiles`]). OpenBLAS's multi-threaded calls cut a product by their
//! thread count, which changes f32 rounding (measured: 1 vs 2 threads differ in ~10 % of the
//! entries of a 640 x 1536 `sgemm`, ~3 % of an `ssyrk`'s); with fixed tiles the activations and
//! Gram products are bitwise the same whatever `--threads` and however many ranks share a node.

use crate::{Error, Result};
use cblas_sys::{CBLAS_LAYOUT, CBLAS_SIDE, CBLAS_TRANSPOSE, CBLAS_UPLO};
use ndarray::{Array2, ArrayView2};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

extern "C" {
    fn openblas_set_num_threads(n: std::os::raw::c_int);
}

/// Threads for eva's tiled kernels and faer (0: not set yet).
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set inside [`par_tiles`]' tiles: the tiled kernels they call stay on their thread.
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets the number of threads eva's tiled kernels and faer use (0 = all available cores), and
/// keeps OpenBLAS on the calling thread (see the module docs).
pub fn set_threads(n: usize) {
    let n = if n == 0 {
        std::thread::available_parallelism()
            .map(|v| v.get())
            .unwrap_or(1)
    } else {
        n
    };
    THREADS.store(n, Ordering::Relaxed);
    // SAFETY: OpenBLAS allows changing its thread count between calls.
    unsafe { openblas_set_num_threads(1) };
    faer::set_global_parallelism(match std::num::NonZeroUsize::new(n) {
        Some(v) if n > 1 => faer::Par::Rayon(v),
        _ => faer::Par::Seq,
    });
}

/// Threads of eva's tiled kernels; all cores unless [`set_threads`] said otherwise (the first
/// call also puts OpenBLAS on the calling thread).
pub fn threads() -> usize {
    if ALONE.with(|a| a.get()) {
        return 1;
    }
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            set_threads(0);
            THREADS.load(Ordering::Relaxed)
        }
        n => n,
    }
}

/// `0..n` cut into `ceil(n / target)` nearly equal consecutive ranges: tile shapes that depend on
/// `n` alone, never on the thread count.
pub fn tiles(n: usize, target: usize) -> Vec<Range<usize>> {
    let count = n.div_ceil(target.max(1)).max(1);
    (0..count)
        .map(|i| i * n / count..(i + 1) * n / count)
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `f(i)` for every tile `i < count` on up to [`threads`] threads, each tile taking the next
/// free one (tiles of unequal cost still end together). Inside a tile eva's tiled kernels run on
/// its thread alone ([`threads`] = 1); tile shapes never depend on the thread count, so every
/// result is the same as when computed by itself.
pub fn par_tiles(count: usize, f: impl Fn(usize) + Sync) {
    let t = threads().min(count);
    let next = AtomicUsize::new(0);
    let work = || {
        let was = ALONE.with(|a| a.replace(true));
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            f(i);
        }
        ALONE.with(|a| a.set(was));
    };
    if t <= 1 {
        work();
        return;
    }
    std::thread::scope(|s| {
        for _ in 1..t {
            s.spawn(work);
        }
        work();
    });
}

/// `[f(0), f(1), ..]` for `count` tiles computed as in [`par_tiles`], in tile order.
pub fn par_map<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<std::sync::Mutex<Option<T>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    par_tiles(count, |t| {
        *slots[t].lock().expect("no tile panicked") = Some(f(t))
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("no tile panicked")
                .expect("every tile ran")
        })
        .collect()
}

/// A raw pointer that tiles writing disjoint parts of one buffer may share across threads.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used by tiles that write disjoint elements, inside a scope that outlives them.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

fn trans(t: bool) -> CBLAS_TRANSPOSE {
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

/// Rows and columns of an output tile of the tiled products: large enough for BLAS to run near
/// its peak on one thread, small enough to give two threads several tiles on a 640-row pass.
/// Forward-only on 2 cores (MiniLM / llama-100m tokens/s): 128 x 256: 4,987 / 843; 256 x 256:
/// 5,330 / 869; 128 x 512: 4,853 / 847; 64 x 512: 4,614 / 766; 512 x 256: 5,123 / 889.
const TILE_ROWS: usize = 256;
const TILE_COLS: usize = 256;

/// `y += x·wᵀ` in f32 (PyTorch's `nn.Linear` with `y` holding the bias rows): `x` is `m x k`,
/// `w` is `n x k`, `y` is `m x n`, all row-major and contiguous; tiled over `y`.
pub fn linear_f32(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(
        x.len() == m * k && w.len() == n * k && y.len() == m * n,
        "linear: sizes do not match {m}x{k} · ({n}x{k})ᵀ"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (rows, cols) = (tiles(m, TILE_ROWS), tiles(n, TILE_COLS));
    let out = SendPtr(y.as_mut_ptr());
    par_tiles(rows.len() * cols.len(), |t| {
        let (r, c) = (&rows[t / cols.len()], &cols[t % cols.len()]);
        // SAFETY: the tile reads rows r of x and rows c of w, and writes the r x c block of y
        // (leading dimension n); tiles are disjoint.
        unsafe {
            sgemm(
                false,
                true,
                r.len(),
                c.len(),
                k,
                1.0,
                x.as_ptr().add(r.start * k),
                k,
                w.as_ptr().add(c.start * k),
                k,
                1.0,
                out.at(r.start * n + c.start),
                n,
            )
        };
    });
}

fn int(n: usize, what: &'static str) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Numeric {
        op: what,
        detail: format!("dimension {n} exceeds the BLAS 32-bit limit"),
    })
}

/// `out[i,j] += (xᵀx)[i,j]` for `j ≥ i` (upper triangle of a row-major `d x d` f64 matrix).
/// The product is formed in f32 in `scratch` (`d x d`), tile by tile (`ssyrk` on the diagonal
/// blocks, `sgemm` above them), and added in f64.
pub fn syrk_accumulate(x: ArrayView2<f32>, scratch: &mut Vec<f32>, out: &mut [f64]) -> Result<()> {
    let (n, d) = x.dim();
    assert_eq!(out.len(), d * d, "Gram buffer has the wrong size");
    if n == 0 {
        return Ok(());
    }
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout is contiguous");
    scratch.resize(d * d, 0.0);
    // 512-wide blocks keep each tile near OpenBLAS's one-thread peak (128-wide ones lost 25 %
    // to packing); below d = 1024, 256-wide ones still give the threads several tiles.
    let blocks = tiles(d, if d >= 1024 { 512 } else { 256 });
    let pairs: Vec<(usize, usize)> = (0..blocks.len())
        .flat_map(|i| (i..blocks.len()).map(move |j| (i, j)))
        .collect();
    let (ni, di) = (int(n, "ssyrk")?, int(d, "ssyrk")?);
    let prod = SendPtr(scratch.as_mut_ptr());
    par_tiles(pairs.len(), |t| {
        let (bi, bj) = (&blocks[pairs[t].0], &blocks[pairs[t].1]);
        // SAFETY: x is n*d row-major; the tile writes the bi x bj block of the d x d scratch
        // (leading dimension d), disjoint from every other tile's.
        unsafe {
            if bi == bj {
                cblas_sys::cblas_ssyrk(
                    CBLAS_LAYOUT::CblasRowMajor,
                    CBLAS_UPLO::CblasUpper,
                    trans(true),
                    bi.len() as i32,
                    ni,
                    1.0,
                    xs.as_ptr().add(bi.start),
                    di,
                    0.0,
                    prod.at(bi.start * d + bi.start),
                    di,
                );
            } else {
                sgemm(
                    true,
                    false,
                    bi.len(),
                    bj.len(),
                    n,
                    1.0,
                    xs.as_ptr().add(bi.start),
                    d,
                    xs.as_ptr().add(bj.start),
                    d,
                    0.0,
                    prod.at(bi.start * d + bj.start),
                    d,
                );
            }
        }
    });
    let (src, dst) = (&scratch[..], SendPtr(out.as_mut_ptr()));
    par_tiles(blocks.len(), |b| {
        for i in blocks[b].clone() {
            // SAFETY: row i of the upper triangle, written by this tile only.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.at(i * d + i), d - i) };
            for (o, s) in row.iter_mut().zip(&src[i * d + i..(i + 1) * d]) {
                *o += *s as f64;
            }
        }
    });
    Ok(())
}

/// `G·Q` for a symmetric `G` of which only the upper triangle (row-major `d x d`) is valid, by
/// `dsymm` on column tiles of `Q`.
pub fn symm_upper(g: &[f64], d: usize, q: ArrayView2<f64>) -> Result<Array2<f64>> {
    let (rows, m) = q.dim();
    assert_eq!(rows, d, "symm: Q has {rows} rows, G is {d} x {d}");
    let q = q.as_standard_layout();
    let mut out = Array2::<f64>::zeros((d, m));
    if d == 0 || m == 0 {
        return Ok(out);
    }
    let (di, mi) = (int(d, "dsymm")?, int(m, "dsymm")?);
    let cols = tiles(m, 16);
    let (qs, o) = (q.as_slice().expect("contiguous"), SendPtr(out.as_mut_ptr()));
    par_tiles(cols.len(), |t| {
        let c = &cols[t];
        // SAFETY: g is d*d, q and out are d*m, all row-major; the tile writes columns c of out.
        unsafe {
            cblas_sys::cblas_dsymm(
                CBLAS_LAYOUT::CblasRowMajor,
                CBLAS_SIDE::CblasLeft,
                CBLAS_UPLO::CblasUpper,
                di,
                c.len() as i32,
                1.0,
                g.as_ptr(),
                di,
                qs.as_ptr().add(c.start),
                mi,
                0.0,
                o.at(c.start),
                mi,
            )
        };
    });
    Ok(out)
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

/// `C·Q` for a full square row-major `C` (`d x d`, f64 or f32); `Q` is converted to `C`'s type and
/// the product returned in f64. In f32: about half the time of the f64 product (bound by reading
/// `C`), with a relative error of each product column about `1e-7·‖C‖_F` (f32 rounding of `C` and
/// `Q`, f32 sums): for callers that only need ~1e-4 (the leader's step tolerance).
pub fn gemm_square<T: Gemm>(c: &[T], d: usize, q: ArrayView2<f64>) -> Result<Array2<f64>> {
    let (rows, m) = q.dim();
    assert_eq!(rows, d, "gemm: Q has {rows} rows, C is {d} x {d}");
    assert_eq!(c.len(), d * d, "gemm: C has the wrong size");
    let qt: Vec<T> = q.iter().map(|&v| T::from_f64(v)).collect();
    let mut out = vec![T::default(); d * m];
    if d > 0 && m > 0 {
        let (mi, di) = (int(m, "gemm")?, int(d, "gemm")?);
        let blocks = tiles(d, TILE_COLS);
        let o = SendPtr(out.as_mut_ptr());
        par_tiles(blocks.len(), |t| {
            let r = &blocks[t];
            // SAFETY: c is d*d, qt and out d*m, row-major (q.iter() is logical order); the tile
            // multiplies rows r of c and writes rows r of out.
            unsafe {
                T::gemm(
                    r.len() as i32,
                    mi,
                    di,
                    c.as_ptr().add(r.start * d),
                    qt.as_ptr(),
                    o.at(r.start * m),
                )
            };
        });
    }
    Ok(
        Array2::from_shape_vec((d, m), out.into_iter().map(T::to_f64).collect())
            .expect("d*m values"),
    )
}

/// Orthonormal basis of the columns of a tall `a` (`d x m`, `d ≥ m`) by Cholesky QR, twice
/// (CholQR2: Yamamoto, Nakatsukasa, Yanagisawa & Fukaya, "Roundoff error analysis of the
/// CholeskyQR2 algorithm", ETNA 44, 2015): `R = chol(AᵀA)`, `Q = A R⁻¹`, repeated once on `Q`.
/// Two `d x m x m` BLAS-3 passes instead of a Householder QR; orthogonal to f64 rounding when
/// `cond(A) ≲ 1e7` (the first pass squares the condition number). Returns `None` when a Cholesky
/// factorization fails or the first pass is too far from orthogonal (`‖Q₁ᵀQ₁ − I‖_max > 0.5`):
/// the caller then falls back to Householder QR ([`orthonormalize`]).
///
/// Each pass is two GEMMs (`QᵀQ`, then `Q·L⁻ᵀ` with the explicit inverse of the small factor,
/// [`solve_right_lower_transpose`] of the identity): at 576 x 32 OpenBLAS's `dtrsm` and the
/// strided in-place normalization of the columns took most of the time (`benches/leader.rs`:
/// 0.4 → 0.1 ms).
pub fn cholqr2(a: ArrayView2<f64>) -> Option<Array2<f64>> {
    let (d, m) = a.dim();
    if m == 0 || d < m {
        return None;
    }
    // Unit columns first (the span is the same, and the condition number CholQR is sensitive to
    // no longer includes the columns' scales: a Chebyshev-filtered block's differ by up to 1e6),
    // folded into the first pass: with `D` the column norms, `chol(D⁻¹AᵀAD⁻¹) = LLᵀ` and
    // `Q₁ = A·D⁻¹L⁻ᵀ`.
    let g = a.t().dot(&a);
    let inv_norm: Vec<f64> = g.diag().iter().map(|&v| 1.0 / v.sqrt()).collect();
    if !inv_norm.iter().all(|v| v.is_finite()) {
        return None;
    }
    let g = Array2::from_shape_fn((m, m), |(i, j)| g[(i, j)] * inv_norm[i] * inv_norm[j]);
    let mut r_inv = inverse_transpose(cholesky_lower(g.view())?.view());
    for (mut row, s) in r_inv.rows_mut().into_iter().zip(&inv_norm) {
        row *= *s;
    }
    let q = a.dot(&r_inv);
    let g = q.t().dot(&q);
    let off = g
        .indexed_iter()
        .map(|((i, j), v)| (v - if i == j { 1.0 } else { 0.0 }).abs())
        .fold(0.0, f64::max);
    if off.is_nan() || off > 0.5 {
        return None;
    }
    let q = q.dot(&inverse_transpose(cholesky_lower(g.view())?.view()));
    q.iter().all(|v| v.is_finite()).then_some(q)
}

/// `L⁻ᵀ` for a lower-triangular `L`: the `X` with `X Lᵀ = I`.
fn inverse_transpose(l: ArrayView2<f64>) -> Array2<f64> {
    solve_right_lower_transpose(Array2::eye(l.nrows()).view(), l)
}

/// LAPACK `xsyevr` (OpenBLAS exports it; Fortran ABI: every argument by pointer, then the hidden
/// lengths of the three character arguments).
macro_rules! syevr_decl {
    ($name:ident, $t:ty) => {
        fn $name(
            jobz: *const std::os::raw::c_char,
            range: *const std::os::raw::c_char,
            uplo: *const std::os::raw::c_char,
            n: *const i32,
            a: *mut $t,
            lda: *const i32,
            vl: *const $t,
            vu: *const $t,
            il: *const i32,
            iu: *const i32,
            abstol: *const $t,
            m: *mut i32,
            w: *mut $t,
            z: *mut $t,
            ldz: *const i32,
            isuppz: *mut i32,
            work: *mut $t,
            lwork: *const i32,
            iwork: *mut i32,
            liwork: *const i32,
            info: *mut i32,
            jobz_len: usize,
            range_len: usize,
            uplo_len: usize,
        );
    };
}

extern "C" {
    syevr_decl!(dsyevr_, f64);
    syevr_decl!(ssyevr_, f32);
}

/// Scalar types with a LAPACK `xsyevr`.
pub trait Syevr: Copy + Default + Into<f64> {
    /// # Safety
    /// The pointers must satisfy LAPACK's `xsyevr` contract.
    #[allow(clippy::too_many_arguments)]
    unsafe fn syevr(
        n: i32,
        a: *mut Self,
        il: i32,
        iu: i32,
        m: *mut i32,
        w: *mut Self,
        z: *mut Self,
        isuppz: *mut i32,
        work: *mut Self,
        lwork: i32,
        iwork: *mut i32,
        liwork: i32,
        info: *mut i32,
    );
    /// Converts a LAPACK workspace size returned in `work[0]`.
    fn to_len(self) -> usize;
}

macro_rules! syevr_impl {
    ($t:ty, $f:ident) => {
        impl Syevr for $t {
            unsafe fn syevr(
                n: i32,
                a: *mut Self,
                il: i32,
                iu: i32,
                m: *mut i32,
                w: *mut Self,
                z: *mut Self,
                isuppz: *mut i32,
                work: *mut Self,
                lwork: i32,
                iwork: *mut i32,
                liwork: i32,
                info: *mut i32,
            ) {
                let (jobz, range, uplo) = (
                    b'V' as std::os::raw::c_char,
                    b'I' as std::os::raw::c_char,
                    b'L' as std::os::raw::c_char,
                );
                let (zero, abstol) = (0.0 as $t, 0.0 as $t);
                $f(
                    &jobz, &range, &uplo, &n, a, &n, &zero, &zero, &il, &iu, &abstol, m, w, z, &n,
                    isuppz, work, &lwork, iwork, &liwork, info, 1, 1, 1,
                );
            }
            fn to_len(self) -> usize {
                self as usize
            }
        }
    };
}
syevr_impl!(f64, dsyevr_);
syevr_impl!(f32, ssyevr_);

/// Top `k` eigenpairs of a symmetric `d x d` matrix of which the upper triangle (row-major; the
/// rest is not read) is given, by LAPACK `xsyevr` with `RANGE = 'I'`: Householder
/// tridiagonalization (`4/3·d³` flops, the bulk of the time), then only the wanted eigenpairs of
/// the tridiagonal matrix (bisection and inverse iteration), instead of all `d` eigenvectors.
/// Eigenvalues descending, eigenvectors as columns (`d x k`), in f64 whatever `T`. `a` is
/// overwritten. In f32 (`ssyevr`) the pairs carry f32 rounding: residuals ~1e-7·‖C‖.
///
/// Bisection may find fewer than `k` eigenvalues in a tight cluster (LAPACK's `xstebz`, INFO = 3:
/// "non-monotonic arithmetic"; `xsyevr` then returns fewer pairs with INFO = 0; seen with
/// `ssyevr` on Intel Xeon in OpenBLAS 0.3.21). LAPACK's cure is applied then: all eigenpairs
/// (`IL = 1, IU = d`, the MRRR path), of which the top `k` are kept. The matrix for that retry is
/// a copy kept in the triangle LAPACK does not read, so no second `d²` buffer is needed.
pub fn sym_eig_top<T: Syevr>(a: &mut [T], d: usize, k: usize) -> Result<(Vec<f64>, Array2<f64>)> {
    assert_eq!(a.len(), d * d, "syevr: matrix has the wrong size");
    let k = k.min(d);
    if k == 0 {
        return Ok((Vec::new(), Array2::zeros((d, 0))));
    }
    // LAPACK reads (and destroys) the column-major lower triangle, i.e. the row-major upper one
    // with the diagonal; the strict row-major lower triangle keeps a copy, the diagonal aside.
    let diag: Vec<T> = (0..d).map(|i| a[i * d + i]).collect();
    for i in 0..d {
        for j in i + 1..d {
            a[j * d + i] = a[i * d + j];
        }
    }
    let (values, vectors) = syevr_range(a, d, d - k + 1, d)?;
    if values.len() == k {
        return Ok((values, vectors));
    }
    for i in 0..d {
        a[i * d + i] = diag[i];
        for j in i + 1..d {
            a[i * d + j] = a[j * d + i];
        }
    }
    let (values, vectors) = syevr_range(a, d, 1, d)?;
    Ok((
        values[..k].to_vec(),
        vectors.slice(ndarray::s![.., ..k]).to_owned(),
    ))
}

/// The eigenpairs `il..=iu` (1-based, ascending order) of the upper triangle by `xsyevr`, as
/// many as it found: eigenvalues descending, eigenvectors as columns. `a` is overwritten.
fn syevr_range<T: Syevr>(
    a: &mut [T],
    d: usize,
    il: usize,
    iu: usize,
) -> Result<(Vec<f64>, Array2<f64>)> {
    let k = iu + 1 - il;
    let n = int(d, "syevr")?;
    let fail = |info: i32| Error::Numeric {
        op: "symmetric eigendecomposition (xsyevr)",
        detail: format!("info = {info} (n = {d}, eigenpairs {il}..={iu})"),
    };
    let (il, iu) = (int(il, "syevr")?, int(iu, "syevr")?);
    let (mut found, mut info) = (0i32, 0i32);
    let mut w = vec![T::default(); d];
    let mut z = vec![T::default(); d * k];
    let mut isuppz = vec![0i32; 2 * k];
    // Workspace query.
    let (mut lw, mut liw) = (T::default(), 0i32);
    // SAFETY: sizes as documented for xsyevr; lwork = liwork = -1 only writes the optimal sizes.
    unsafe {
        T::syevr(
            n,
            a.as_mut_ptr(),
            il,
            iu,
            &mut found,
            w.as_mut_ptr(),
            z.as_mut_ptr(),
            isuppz.as_mut_ptr(),
            &mut lw,
            -1,
            &mut liw,
            -1,
            &mut info,
        )
    };
    if info != 0 {
        return Err(fail(info));
    }
    let lwork = lw.to_len().max(26 * d);
    let liwork = (liw as usize).max(10 * d);
    let mut work = vec![T::default(); lwork];
    let mut iwork = vec![0i32; liwork];
    // SAFETY: a is n*n (lda = n), z is n*k (ldz = n, k columns wanted), isuppz 2k, work/iwork sized.
    unsafe {
        T::syevr(
            n,
            a.as_mut_ptr(),
            il,
            iu,
            &mut found,
            w.as_mut_ptr(),
            z.as_mut_ptr(),
            isuppz.as_mut_ptr(),
            work.as_mut_ptr(),
            int(lwork, "syevr")?,
            iwork.as_mut_ptr(),
            int(liwork, "syevr")?,
            &mut info,
        )
    };
    if info != 0 || found < 0 || found as usize > k {
        return Err(fail(if info != 0 { info } else { -1000 - found }));
    }
    // LAPACK returns ascending eigenvalues and column-major eigenvectors (column c at z[c*d..]).
    let m = found as usize;
    let values = (0..m).rev().map(|c| w[c].into()).collect();
    let vectors = Array2::from_shape_fn((d, m), |(i, j)| z[(m - 1 - j) * d + i].into());
    Ok((values, vectors))
}

/// Copies a row-major ndarray matrix into a faer matrix.
pub fn to_faer(a: ArrayView2<f64>) -> faer::Mat<f64> {
    faer::Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)])
}

/// Copies a faer matrix into a row-major ndarray matrix.
pub fn from_faer(a: faer::MatRef<'_, f64>) -> Array2<f64> {
    Array2::from_shape_fn((a.nrows(), a.ncols()), |(i, j)| a[(i, j)])
}

/// An orthonormal basis of the columns of `a` (thin QR; `a` has at least as many rows as columns).
pub fn orthonormalize(a: ArrayView2<f64>) -> Array2<f64> {
    let qr = to_faer(a).qr();
    from_faer(qr.compute_thin_Q().as_ref())
}

/// Eigen-decomposition of a symmetric matrix, eigenvalues in descending order and the matching
/// eigenvectors as columns.
pub fn sym_eig_desc(a: ArrayView2<f64>) -> Result<(Vec<f64>, Array2<f64>)> {
    let n = a.nrows();
    let evd = to_faer(a)
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numeric {
            op: "symmetric eigendecomposition",
            detail: format!("{e:?} (n = {n})"),
        })?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let values = (0..n).rev().map(|i| s[i]).collect();
    let vectors = Array2::from_shape_fn((n, n), |(i, j)| u[(i, n - 1 - j)]);
    Ok((values, vectors))
}

/// Thin SVD `a = U diag(s) Vᵀ`: returns `(U, s)`, singular values descending.
pub fn thin_svd_left(a: ArrayView2<f64>) -> Result<(Array2<f64>, Vec<f64>)> {
    let svd = to_faer(a).thin_svd().map_err(|e| Error::Numeric {
        op: "thin SVD",
        detail: format!("{e:?} (shape {:?})", a.dim()),
    })?;
    let s = svd.S().column_vector();
    Ok((from_faer(svd.U()), (0..s.nrows()).map(|i| s[i]).collect()))
}

/// Lower Cholesky factor `L` of a symmetric positive-definite matrix, or `None` if it is not.
pub fn cholesky_lower(a: ArrayView2<f64>) -> Option<Array2<f64>> {
    let llt = to_faer(a).llt(faer::Side::Lower).ok()?;
    Some(from_faer(llt.L()))
}

/// Solves `X Lᵀ = B` for `X` with a lower-triangular `L` (i.e. `X = B L⁻ᵀ`), row by row.
pub fn solve_right_lower_transpose(b: ArrayView2<f64>, l: ArrayView2<f64>) -> Array2<f64> {
    let (rows, k) = b.dim();
    let mut x = Array2::<f64>::zeros((rows, k));
    for r in 0..rows {
        // Row r of X satisfies L x_rᵀ = b_rᵀ: forward substitution.
        for i in 0..k {
            let mut v = b[(r, i)];
            for j in 0..i {
                v -= l[(i, j)] * x[(r, j)];
            }
            x[(r, i)] = v / l[(i, i)];
        }
    }
    x
}

/// Smallest singular value of a small square matrix.
pub fn smallest_singular_value(a: ArrayView2<f64>) -> Result<f64> {
    if a.is_empty() {
        return Ok(1.0);
    }
    let s = to_faer(a).singular_values().map_err(|e| Error::Numeric {
        op: "singular values",
        detail: format!("{e:?}"),
    })?;
    Ok(s.last().copied().unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// Seeded standard-normal f32 values.
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(&[seed]);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// `L⁻ᵀ` (CholQR2's inverse) is upper triangular and `L·(L⁻ᵀ)ᵀ = I` to rounding, for a
    /// well-conditioned factor and for one with a 1e-4 diagonal entry.
    #[test]
    fn inverse_transpose_inverts() {
        let mut rng = crate::rng::Rng::new(&[7]);
        for small in [1.0, 1e-4] {
            let m = 12;
            let mut l = Array2::from_shape_fn((m, m), |(i, j)| match i.cmp(&j) {
                std::cmp::Ordering::Greater => rng.normal(),
                std::cmp::Ordering::Equal => 1.0 + rng.normal().abs(),
                std::cmp::Ordering::Less => 0.0,
            });
            l[(5, 5)] = small;
            let x = inverse_transpose(l.view());
            assert!(x.indexed_iter().all(|((i, j), &v)| i <= j || v == 0.0));
            let err = (&l.dot(&x.t()) - &Array2::<f64>::eye(m))
                .iter()
                .fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(err < 1e-10 / small, "max |L·X − I| = {err:e}");
        }
    }

    /// `sym_eig_top` reads only the upper triangle (the strict lower part holds NaN here) and
    /// gives the top pairs of the full range, which is what its retry computes.
    #[test]
    fn syevr_top_pairs_match_the_full_range() {
        let d = 40;
        let x = noise(3 * d * d, 7);
        let mut sym = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                sym[i * d + j] = (0..3 * d)
                    .map(|t| f64::from(x[t * d + i]) * f64::from(x[t * d + j]))
                    .sum();
            }
        }
        let mut upper = sym.clone();
        for i in 0..d {
            for j in 0..i {
                upper[i * d + j] = f64::NAN;
            }
        }
        let (top, vectors) = sym_eig_top(&mut upper, d, 5).unwrap();
        let (all, all_vectors) = syevr_range(&mut sym, d, 1, d).unwrap();
        assert_eq!(all.len(), d);
        for i in 0..5 {
            assert!((top[i] - all[i]).abs() <= 1e-10 * all[0], "value {i}");
            let dot: f64 = (0..d).map(|r| vectors[(r, i)] * all_vectors[(r, i)]).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-8, "vector {i}: {dot}");
        }
    }

    #[test]
    fn tiles_cover_the_range_in_equal_parts() {
        assert_eq!(
            tiles(640, 128),
            vec![0..128, 128..256, 256..384, 384..512, 512..640]
        );
        assert_eq!(tiles(384, 256), vec![0..192, 192..384]);
        assert_eq!(tiles(5, 128), vec![0..5]);
        assert!(tiles(0, 128).is_empty());
    }

    /// The tiled kernels give bitwise the same f32 products with 1, 2 or 3 threads, at shapes
    /// where OpenBLAS's own threading would not (several tiles in each direction), and match a
    /// float64 product to f32 rounding.
    #[test]
    fn tiled_products_do_not_depend_on_the_thread_count() {
        let (m, k, n) = (300, 200, 600);
        let (x, w) = (noise(m * k, 1), noise(n * k, 2));
        let linear = |t: usize| {
            set_threads(t);
            let mut y = vec![0.5f32; m * n];
            linear_f32(&x, &w, &mut y, m, k, n);
            y
        };
        let gram = |t: usize| {
            set_threads(t);
            let xv = ArrayView2::from_shape((m, k), &x).unwrap();
            let (mut scratch, mut g) = (Vec::new(), vec![0.0f64; k * k]);
            syrk_accumulate(xv, &mut scratch, &mut g).unwrap();
            g
        };
        let (y1, g1) = (linear(1), gram(1));
        for t in [2, 3] {
            assert!(
                linear(t)
                    .iter()
                    .zip(&y1)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "linear, {t} threads"
            );
            assert!(
                gram(t)
                    .iter()
                    .zip(&g1)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "gram, {t} threads"
            );
        }
        let xd = Array2::from_shape_fn((m, k), |(i, j)| x[i * k + j] as f64);
        let wd = Array2::from_shape_fn((n, k), |(i, j)| w[i * k + j] as f64);
        let want = xd.dot(&wd.t());
        let gw = xd.t().dot(&xd);
        assert!(y1
            .iter()
            .zip(want.iter())
            .all(|(&a, &b)| (a as f64 - 0.5 - b).abs() < 1e-4 * (1.0 + b.abs())));
        for i in 0..k {
            for j in i..k {
                assert!(
                    (g1[i * k + j] - gw[(i, j)]).abs() < 1e-4 * (1.0 + gw[(i, j)].abs()),
                    "gram ({i}, {j})"
                );
            }
        }
        set_threads(0);
    }

    #[test]
    fn syrk_and_symm_match_plain_products() {
        let x = array![
            [1.0f32, 2.0, 3.0],
            [4.0, 5.0, 6.5],
            [-1.0, 0.5, 2.0],
            [0.0, 1.0, -3.0]
        ];
        let mut g = vec![0.0; 9];
        let mut scratch = Vec::new();
        syrk_accumulate(x.view(), &mut scratch, &mut g).unwrap();
        syrk_accumulate(x.view(), &mut scratch, &mut g).unwrap();
        let xd = x.mapv(|v| v as f64);
        let full = xd.t().dot(&xd) * 2.0;
        for i in 0..3 {
            for j in i..3 {
                assert!((g[i * 3 + j] - full[(i, j)]).abs() < 1e-9);
            }
        }
        let q = array![[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]];
        let gq = symm_upper(&g, 3, q.view()).unwrap();
        let want = full.dot(&q);
        assert!((&gq - &want).iter().all(|v| v.abs() < 1e-9));
    }

    #[test]
    fn eig_is_descending_and_reconstructs() {
        let a = array![[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]];
        let (w, v) = sym_eig_desc(a.view()).unwrap();
        assert!(w[0] >= w[1] && w[1] >= w[2]);
        let rec = v
            .dot(&Array2::from_diag(&ndarray::Array1::from(w)))
            .dot(&v.t());
        assert!((&rec - &a).iter().all(|e| e.abs() < 1e-12));
    }

    #[test]
    fn triangular_solve_inverts_cholesky() {
        let a = array![[4.0, 2.0], [2.0, 3.0]];
        let l = cholesky_lower(a.view()).unwrap();
        let b = array![[1.0, 2.0], [3.0, -1.0], [0.5, 0.25]];
        let x = solve_right_lower_transpose(b.view(), l.view());
        let back = x.dot(&l.t());
        assert!((&back - &b).iter().all(|e| e.abs() < 1e-12));
        assert!(cholesky_lower(array![[1.0, 2.0], [2.0, 1.0]].view()).is_none());
    }
}

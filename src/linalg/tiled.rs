//! Products tiled over their output ([`super::threads`]): `nn.Linear` in f32, the f64-accumulated
//! Gram update, `G·Q` with a symmetric or a full square `G`. Tile shapes depend on the problem
//! alone, so the products are bitwise the same whatever the thread count.

use super::blas::{sgemm, trans, Gemm};
use super::int;
use super::threads::{par_tiles, tiles, SendPtr};
use crate::Result;
use cblas_sys::{CBLAS_LAYOUT, CBLAS_SIDE, CBLAS_UPLO};
use ndarray::{Array2, ArrayView2};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::{noise, set_threads};
    use ndarray::array;

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
}

//! The CPU backend: [`Backend`] on host memory, OpenBLAS sgemm for the products and plain
//! loops for the rest.

use super::backend::{
    check_embed, exp, norm_mismatch, Activation, AttentionMask, Backend, Heads, Segments,
};
use super::host::HostTensor;
use crate::linalg::{par_groups, par_rows, sgemm};
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use std::ops::Range;

/// The CPU backend: OpenBLAS sgemm for products, plain loops for the rest. The loops run on
/// eva's threads ([`crate::linalg::par_rows`], [`crate::linalg::par_groups`]; OpenBLAS itself
/// stays on the calling thread) when the work is large enough, split by token rows (or by heads
/// in attention), never inside a sum, so their results do not depend on the thread count.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// A weight on the CPU: borrowed from the memory-mapped checkpoint when it is aligned F32,
/// decoded into an owned buffer otherwise.
pub struct CpuWeight {
    storage: Storage,
    shape: Vec<usize>,
}

enum Storage {
    Mapped {
        map: std::sync::Arc<memmap2::Mmap>,
        range: Range<usize>,
    },
    Owned(Vec<f32>),
}

impl CpuWeight {
    /// The values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Mapped { map, range } => {
                // SAFETY: checked at construction: the range is 4-aligned, inside the map and
                // holds little-endian f32 (every bit pattern is a valid f32).
                let bytes = &map[range.clone()];
                unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4) }
            }
            Storage::Owned(v) => v,
        }
    }

    /// As a matrix `[rows, cols]`; a vector is one row.
    pub fn matrix(&self) -> ArrayView2<'_, f32> {
        let (r, c) = match self.shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => unreachable!("weights are 1-D or 2-D (checked when loaded)"),
        };
        ArrayView2::from_shape((r, c), self.as_slice()).expect("length checked when loaded")
    }
}

impl Backend for Cpu {
    type Tensor = Array2<f32>;
    type Weight = CpuWeight;
    type RopeTables = (Array2<f32>, Array2<f32>);

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        if !(1..=2).contains(&t.shape.len()) {
            return Err(Error::data(format!(
                "checkpoint tensor {}: expected 1-D or 2-D, found shape {:?}",
                t.name, t.shape
            )));
        }
        let shape = t.shape.clone();
        let bytes = t.bytes();
        let aligned = (bytes.as_ptr() as usize) % 4 == 0;
        if t.dtype == safetensors::Dtype::F32 && aligned && cfg!(target_endian = "little") {
            t.check_finite()?;
            return Ok(CpuWeight {
                storage: Storage::Mapped {
                    map: t.map.clone(),
                    range: t.range.clone(),
                },
                shape,
            });
        }
        Ok(CpuWeight {
            storage: Storage::Owned(t.to_f32()?),
            shape,
        })
    }

    fn zeros(&self, tokens: usize, dim: usize) -> Array2<f32> {
        Array2::zeros((tokens, dim))
    }

    fn embed(&self, x: &mut Array2<f32>, table: &CpuWeight, ids: &[u32], what: &str) -> Result<()> {
        check_embed(what, &table.shape, x.dim(), ids.len())?;
        let t = table.matrix();
        for (mut row, &id) in x.rows_mut().into_iter().zip(ids) {
            if id as usize >= t.nrows() {
                return Err(Error::data(format!(
                    "{what}: index {id} is outside the table of {} rows",
                    t.nrows()
                )));
            }
            row += &t.row(id as usize);
        }
        Ok(())
    }

    fn linear(&self, x: &Array2<f32>, w: &CpuWeight, b: Option<&CpuWeight>) -> Array2<f32> {
        let w = w.matrix();
        let (m, k, n) = (x.nrows(), x.ncols(), w.nrows());
        assert_eq!(
            w.ncols(),
            k,
            "linear: input has {k} features, the weight expects {}",
            w.ncols()
        );
        // The output starts as the bias rows (or zeros) and sgemm adds `x Wᵀ` with beta = 1, as
        // PyTorch's addmm: no zeroing pass inside sgemm and no second pass for the bias.
        let mut y = Vec::with_capacity(m * n);
        match b {
            Some(b) => {
                let b = b.as_slice();
                for _ in 0..m {
                    y.extend_from_slice(b);
                }
            }
            None => y.resize(m * n, 0.0),
        }
        let x = x.as_slice().expect("activations are standard layout");
        crate::linalg::linear_f32(
            x,
            w.as_slice().expect("weights are contiguous"),
            &mut y,
            m,
            k,
            n,
        );
        Array2::from_shape_vec((m, n), y).expect("m x n values")
    }

    fn add(&self, x: &mut Array2<f32>, y: &Array2<f32>) {
        assert_eq!(x.dim(), y.dim(), "add: shapes differ");
        let y = y.as_slice().expect("activations are standard layout");
        let x = x.as_slice_mut().expect("activations are standard layout");
        par_rows(x, 1, 1, |start, x| {
            for (a, &b) in x.iter_mut().zip(&y[start..]) {
                *a += b;
            }
        });
    }

    fn reshape(&self, x: Array2<f32>, cols: usize) -> Array2<f32> {
        let n = x.len();
        assert!(
            cols > 0 && n % cols == 0,
            "reshape: {n} values are not rows of {cols}"
        );
        x.into_shape_with_order((n / cols, cols))
            .expect("activations are standard layout")
    }

    fn rms_norm(&self, x: &Array2<f32>, w: &CpuWeight, eps: f32) -> Array2<f32> {
        let d = x.ncols();
        if let Some(m) = norm_mismatch("weight", &w.shape, d) {
            panic!("rms_norm: {m}");
        }
        let w = w.as_slice();
        let src = x.as_slice().expect("activations are standard layout");
        let mut out = vec![0.0f32; src.len()];
        par_rows(&mut out, d, 4 * d, |start, out| {
            for (row, o) in src[start * d..]
                .chunks_exact(d)
                .zip(out.chunks_exact_mut(d))
            {
                let ms = sum_f64(row, |v| v * v) / d as f64;
                let inv = 1.0 / ((ms as f32) + eps).sqrt();
                for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
                    *o = g * (v * inv);
                }
            }
        });
        Array2::from_shape_vec(x.raw_dim(), out).expect("same shape")
    }

    fn layer_norm(&self, x: &Array2<f32>, w: &CpuWeight, b: &CpuWeight, eps: f32) -> Array2<f32> {
        let mut out = x.clone();
        layer_norm_in_place(&mut out, None, w, b, eps);
        out
    }

    fn add_layer_norm(
        &self,
        mut x: Array2<f32>,
        y: &Array2<f32>,
        w: &CpuWeight,
        b: &CpuWeight,
        eps: f32,
    ) -> Array2<f32> {
        assert_eq!(x.dim(), y.dim(), "add_layer_norm: shapes differ");
        layer_norm_in_place(
            &mut x,
            Some(y.as_slice().expect("activations are standard layout")),
            w,
            b,
            eps,
        );
        x
    }

    fn rope_tables(&self, cos: Array2<f32>, sin: Array2<f32>) -> (Array2<f32>, Array2<f32>) {
        (
            cos.as_standard_layout().into_owned(),
            sin.as_standard_layout().into_owned(),
        )
    }

    fn rope(&self, x: &mut Array2<f32>, head_dim: usize, (cos, sin): &(Array2<f32>, Array2<f32>)) {
        assert_eq!(
            cos.nrows(),
            x.nrows(),
            "rope: tables for {} tokens, activation has {}",
            cos.nrows(),
            x.nrows()
        );
        // Partial rotary: the tables cover the first 2·half features of each head.
        let half = cos.ncols();
        let d = x.ncols();
        assert!(
            2 * half <= head_dim && d % head_dim == 0,
            "rope: tables of {half} pairs for heads of {head_dim} in {d} features"
        );
        let (cos, sin) = (
            cos.as_slice().expect("standard layout"),
            sin.as_slice().expect("standard layout"),
        );
        let x = x.as_slice_mut().expect("activations are standard layout");
        par_rows(x, d, 4 * d, |start, x| {
            for (t, row) in x.chunks_exact_mut(d).enumerate() {
                let t = start + t;
                let (c, s) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                for head in row.chunks_exact_mut(head_dim) {
                    let (a, b) = head[..2 * half].split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * c[i] - x2 * s[i];
                        b[i] = x2 * c[i] + x1 * s[i];
                    }
                }
            }
        });
    }

    fn attention(
        &self,
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
        h: Heads,
        segments: &Segments,
        mask: AttentionMask,
    ) -> Array2<f32> {
        let hd = h.head_dim;
        let group = h.heads / h.kv_heads;
        let (scale, softcap) = (h.scale, h.softcap);
        let (ldq, ldk, ldv, ldo) = (q.ncols(), k.ncols(), v.ncols(), h.heads * hd);
        let (q, k, v) = (
            q.as_ptr() as usize,
            k.as_ptr() as usize,
            v.as_ptr() as usize,
        );
        let mut out = Array2::<f32>::zeros((segments.tokens(), ldo));
        let o = out.as_mut_ptr() as usize;
        // Heads are independent: the threads take contiguous groups of heads, each with its
        // own scores buffer, so every value is computed the same whatever the thread count
        // (OpenBLAS runs each sgemm on its caller's thread, see `linalg`).
        let flops: usize = segments
            .ranges
            .iter()
            .map(|r| 4 * r.len() * r.len() * hd)
            .sum();
        let run = |heads: Range<usize>| {
            let mut scores = Vec::new();
            for r in &segments.ranges {
                let n = r.len();
                if n == 0 {
                    continue;
                }
                scores.resize(n * n, 0.0f32);
                for head in heads.clone() {
                    let kv = head / group;
                    // SAFETY: the pointers address rows r of head `head` / `kv` of q, k, v
                    // (row-major with leading dimensions ldq, ldk, ldv) and of `out`; threads
                    // write disjoint column blocks of `out`, which outlives them.
                    unsafe {
                        let qh = (q as *const f32).add(r.start * ldq + head * hd);
                        let kh = (k as *const f32).add(r.start * ldk + kv * hd);
                        let vh = (v as *const f32).add(r.start * ldv + kv * hd);
                        let oh = (o as *mut f32).add(r.start * ldo + head * hd);
                        sgemm(
                            false,
                            true,
                            n,
                            n,
                            hd,
                            scale,
                            qh,
                            ldq,
                            kh,
                            ldk,
                            0.0,
                            scores.as_mut_ptr(),
                            n,
                        );
                        softmax_rows(
                            ArrayViewMut2::from_shape((n, n), &mut scores[..]).expect("n x n"),
                            mask,
                            softcap,
                        );
                        // `out` is zeros: beta = 1 spares sgemm its zeroing pass.
                        sgemm(
                            false,
                            false,
                            n,
                            hd,
                            n,
                            1.0,
                            scores.as_ptr(),
                            n,
                            vh,
                            ldv,
                            1.0,
                            oh,
                            ldo,
                        );
                    }
                }
            }
        };
        par_groups(h.heads, flops * h.heads, run);
        out
    }

    fn activate(&self, x: &mut Array2<f32>, act: Activation) {
        let v = x.as_slice_mut().expect("activations are standard layout");
        par_rows(v, 1, 16, |_, v| activate_slice(v, act));
    }

    fn gated(&self, gate: &Array2<f32>, up: &Array2<f32>, act: Activation) -> Array2<f32> {
        assert_eq!(gate.dim(), up.dim(), "gated: shapes differ");
        let mut out = gate.clone();
        let u = up.as_slice().expect("activations are standard layout");
        let v = out.as_slice_mut().expect("activations are standard layout");
        par_rows(v, 1, 16, |start, v| {
            activate_slice(v, act);
            for (a, &b) in v.iter_mut().zip(&u[start..]) {
                *a *= b;
            }
        });
        out
    }

    fn gather(&self, x: &Array2<f32>, idx: &[usize]) -> Array2<f32> {
        x.select(Axis(0), idx)
    }

    fn scatter_add(&self, out: &mut Array2<f32>, y: &Array2<f32>, idx: &[usize], w: &[f32]) {
        assert_eq!(
            (y.nrows(), y.ncols()),
            (idx.len(), out.ncols()),
            "scatter_add: one index per row of y, as wide as out"
        );
        assert_eq!(w.len(), idx.len(), "scatter_add: one weight per row");
        for (i, (&t, &wi)) in idx.iter().zip(w).enumerate() {
            let mut dst = out.row_mut(t);
            for (a, &b) in dst.iter_mut().zip(y.row(i)) {
                *a += b * wi;
            }
        }
    }

    fn rows(&self, x: &Array2<f32>, keep: &[usize]) -> Array2<f32> {
        if keep.len() == x.nrows() && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return x.clone();
        }
        x.select(Axis(0), keep)
    }

    fn host_view<'a>(&self, x: &'a Array2<f32>) -> Option<ArrayView2<'a, f32>> {
        Some(x.view())
    }

    fn dim(&self, x: &Array2<f32>) -> usize {
        x.ncols()
    }

    fn tokens(&self, x: &Array2<f32>) -> usize {
        x.nrows()
    }
}

/// `act` over a slice, one loop per function so that each vectorizes; 8 lanes where the CPU has
/// AVX2. The lane width changes no result: every value goes through the same operations (Rust
/// never contracts `a * b + c` into an FMA).
fn activate_slice(v: &mut [f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(v: &mut [f32], act: Activation) {
            activate_lanes(v, act)
        }
        // SAFETY: the CPU has AVX2.
        return unsafe { wide(v, act) };
    }
    activate_lanes(v, act)
}

#[inline(always)]
fn activate_lanes(v: &mut [f32], act: Activation) {
    match act {
        Activation::Silu => v.iter_mut().for_each(|x| *x = Activation::Silu.apply(*x)),
        Activation::Gelu => v.iter_mut().for_each(|x| *x = Activation::Gelu.apply(*x)),
        Activation::GeluTanh => v
            .iter_mut()
            .for_each(|x| *x = Activation::GeluTanh.apply(*x)),
        Activation::Relu => v.iter_mut().for_each(|x| *x = Activation::Relu.apply(*x)),
    }
}

/// `nn.LayerNorm` of every row of `x` (plus the same row of `residual`, added first), in place
/// (f64 statistics, biased variance).
fn layer_norm_in_place(
    x: &mut Array2<f32>,
    residual: Option<&[f32]>,
    w: &CpuWeight,
    b: &CpuWeight,
    eps: f32,
) {
    let d = x.ncols();
    for (what, v) in [("weight", w), ("bias", b)] {
        if let Some(m) = norm_mismatch(what, &v.shape, d) {
            panic!("layer_norm: {m}");
        }
    }
    let (w, b) = (w.as_slice(), b.as_slice());
    let x = x.as_slice_mut().expect("activations are standard layout");
    par_rows(x, d, 6 * d, |start, x| {
        let residual = residual.map(|r| &r[start * d..start * d + x.len()]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            unsafe fn wide(
                x: &mut [f32],
                residual: Option<&[f32]>,
                d: usize,
                w: &[f32],
                b: &[f32],
                eps: f32,
            ) {
                layer_norm_rows(x, residual, d, w, b, eps)
            }
            // SAFETY: the CPU has AVX2.
            return unsafe { wide(x, residual, d, w, b, eps) };
        }
        layer_norm_rows(x, residual, d, w, b, eps)
    });
}

#[inline(always)]
fn layer_norm_rows(
    x: &mut [f32],
    residual: Option<&[f32]>,
    d: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
) {
    for (t, row) in x.chunks_exact_mut(d).enumerate() {
        if let Some(r) = residual {
            for (v, &r) in row.iter_mut().zip(&r[t * d..(t + 1) * d]) {
                *v += r;
            }
        }
        let n = d as f64;
        let mean = sum_f64(row, |v| v) / n;
        let var = sum_f64(row, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / ((var as f32) + eps).sqrt();
        let mean = mean as f32;
        for ((v, &g), &c) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + c;
        }
    }
}

/// `Σ f(x)` over a row in f64 ([`lane_sum`]).
#[inline(always)]
fn sum_f64(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    lane_sum(row, |v| f(v as f64))
}

/// `Σ f(x)` over a row in 8 interleaved partial sums (lane `j` takes the entries `j mod 8`, so
/// that the additions pipeline and vectorize) added pairwise at the end: an order fixed by the
/// row length alone.
#[inline(always)]
fn lane_sum<T: Copy + Default + std::ops::Add<Output = T>>(row: &[f32], f: impl Fn(f32) -> T) -> T {
    let mut acc = [T::default(); 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = *a + f(v);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// `v = e^(v - max(v))` over a slice; returns `Σ v`. 8 lanes with AVX2, same values (see
/// [`activate_slice`]); the max is taken, and the sum added, in 8 interleaved partial results
/// combined pairwise, an order fixed by the slice length alone.
fn exp_shifted(v: &mut [f32]) -> f32 {
    #[inline(always)]
    fn lanes(v: &mut [f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; 8];
        let chunks = v.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, &x) in m.iter_mut().zip(c) {
                *m = m.max(x);
            }
        }
        for (m, &x) in m.iter_mut().zip(tail) {
            *m = m.max(x);
        }
        let max = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        // A plain loop for the exponentials (the loop vectorizer takes it; fused with the sums
        // it stayed scalar), then the sums.
        for x in v.iter_mut() {
            *x = exp(*x - max);
        }
        lane_sum(v, |x| x)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(v: &mut [f32]) -> f32 {
            lanes(v)
        }
        // SAFETY: the CPU has AVX2.
        return unsafe { wide(v) };
    }
    lanes(v)
}

/// Row-wise masked softmax in place (f32, max-subtracted, as PyTorch's eager attention), after
/// soft-capping the kept scores (`cap · tanh(s / cap)`, as transformers' eager attention does
/// before adding the mask). Masked entries become exactly 0, as adding PyTorch's `finfo.min` and
/// exponentiating does.
fn softmax_rows(mut scores: ArrayViewMut2<f32>, mask: AttentionMask, softcap: Option<f32>) {
    for (i, mut row) in scores.rows_mut().into_iter().enumerate() {
        let row = row.as_slice_mut().expect("scores are standard layout");
        let (lo, hi) = match mask {
            AttentionMask::Bidirectional => (0, row.len()),
            AttentionMask::Causal { window } => {
                (window.map_or(0, |w| (i + 1).saturating_sub(w)), i + 1)
            }
        };
        if let Some(cap) = softcap {
            for v in &mut row[lo..hi] {
                *v = (*v / cap).tanh() * cap;
            }
        }
        let sum = exp_shifted(&mut row[lo..hi]);
        let inv = 1.0 / sum;
        for v in &mut row[lo..hi] {
            *v *= inv;
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_window_keeps_the_last_w_keys() {
        let mut s = Array2::<f32>::ones((5, 5));
        softmax_rows(
            s.view_mut(),
            AttentionMask::Causal { window: Some(2) },
            None,
        );
        // Row 4 may see keys 3 and 4 (kv_idx > 4 - 2).
        assert_eq!(s.row(4).to_vec(), vec![0.0, 0.0, 0.0, 0.5, 0.5]);
        assert_eq!(s.row(0).to_vec(), vec![1.0, 0.0, 0.0, 0.0, 0.0]);
        // A window of 0 keeps no key (transformers' mask `kv_idx > q_idx - 0`): all weights 0,
        // as the GPU kernel gives (model configs refuse it, see model::config).
        let mut s = Array2::<f32>::ones((3, 3));
        softmax_rows(
            s.view_mut(),
            AttentionMask::Causal { window: Some(0) },
            None,
        );
        assert!(s.iter().all(|&v| v == 0.0), "{s:?}");
        let mut s = Array2::<f32>::ones((3, 3));
        softmax_rows(s.view_mut(), AttentionMask::Bidirectional, None);
        assert!(s.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-7));
    }

    /// Partial rotary (tables narrower than half a head) rotates each head's first `2·half`
    /// features exactly as a full rotation of those features alone, and leaves the rest.
    #[test]
    fn partial_rope_rotates_the_head_prefix_only() {
        let (tokens, heads, hd, half) = (3, 2, 8, 2);
        let x = Array2::from_shape_fn((tokens, heads * hd), |(t, j)| {
            (t * 31 + j * 7) as f32 * 0.1 - 1.0
        });
        let cos = Array2::from_shape_fn((tokens, half), |(t, i)| ((t + i) as f32 * 0.3).cos());
        let sin = Array2::from_shape_fn((tokens, half), |(t, i)| ((t + i) as f32 * 0.3).sin());
        let tables = Cpu.rope_tables(cos, sin);
        let mut partial = x.clone();
        Cpu.rope(&mut partial, hd, &tables);
        for h in 0..heads {
            let cols = h * hd..h * hd + 2 * half;
            let mut prefix = x.slice(ndarray::s![.., cols.clone()]).to_owned();
            Cpu.rope(&mut prefix, 2 * half, &tables);
            assert_eq!(partial.slice(ndarray::s![.., cols]), prefix);
            let tail = h * hd + 2 * half..(h + 1) * hd;
            assert_eq!(
                partial.slice(ndarray::s![.., tail.clone()]),
                x.slice(ndarray::s![.., tail])
            );
        }
    }

    /// `reshape` to heads and back keeps the values; an RMSNorm over the reshaped rows is the
    /// per-head norm.
    #[test]
    fn reshape_gives_per_head_rows() {
        let x = Array2::from_shape_fn((2, 6), |(t, j)| (t * 6 + j) as f32 + 1.0);
        let heads = Cpu.reshape(x.clone(), 3);
        assert_eq!(heads.dim(), (4, 3));
        assert_eq!(heads.row(1).to_vec(), vec![4.0, 5.0, 6.0]);
        let w = CpuWeight {
            shape: vec![3],
            storage: Storage::Owned(vec![1.0, 2.0, 0.5]),
        };
        let normed = Cpu.reshape(Cpu.rms_norm(&heads, &w, 0.0), 6);
        let (a, b) = (x.row(1), normed.row(1));
        let rms = ((a[3] * a[3] + a[4] * a[4] + a[5] * a[5]) / 3.0).sqrt();
        assert!((b[4] - 2.0 * a[4] / rms).abs() < 1e-6);
        assert_eq!(Cpu.reshape(heads, 6), x);
    }

    /// Every loop of the backend gives bitwise the same values on 1, 2 or 3 threads, at sizes
    /// where the scheduler cuts the work for 2 or 3 of them (the residual add for 2).
    #[test]
    fn loops_do_not_depend_on_the_thread_count() {
        let (tokens, heads, hd) = (1024, 8, 32);
        let d = heads * hd;
        let mut rng = crate::rng::Rng::new(&[11]);
        let mut matrix =
            |r: usize, c: usize| Array2::from_shape_fn((r, c), |_| rng.normal() as f32);
        let (x, y) = (matrix(tokens, d), matrix(tokens, d));
        let (k, v) = (matrix(tokens, 2 * hd), matrix(tokens, 2 * hd));
        let (cos, sin) = (matrix(tokens, hd / 2), matrix(tokens, hd / 2));
        let weight = |v: Array2<f32>| CpuWeight {
            shape: vec![v.len()],
            storage: Storage::Owned(v.into_raw_vec_and_offset().0),
        };
        let (g, b) = (weight(matrix(1, d)), weight(matrix(1, d)));
        let segments = Segments::from_lengths([600, 424]);
        let h = Heads::new(heads, 2, hd);
        let outputs = |threads: usize| {
            crate::linalg::set_threads(threads);
            let mut out = Vec::new();
            let mut a = x.clone();
            Cpu.add(&mut a, &y);
            out.push(a);
            out.push(Cpu.rms_norm(&x, &g, 1e-5));
            out.push(Cpu.layer_norm(&x, &g, &b, 1e-5));
            out.push(Cpu.add_layer_norm(x.clone(), &y, &g, &b, 1e-5));
            let mut r = x.clone();
            Cpu.rope(&mut r, hd, &Cpu.rope_tables(cos.clone(), sin.clone()));
            out.push(r);
            for mask in [
                AttentionMask::Bidirectional,
                AttentionMask::Causal { window: Some(100) },
            ] {
                out.push(Cpu.attention(&x, &k, &v, h, &segments, mask));
            }
            let mut a = x.clone();
            Cpu.activate(&mut a, Activation::Gelu);
            out.push(a);
            out.push(Cpu.gated(&x, &y, Activation::Silu));
            out
        };
        let one = outputs(1);
        for threads in [2, 3] {
            for (i, (a, b)) in outputs(threads).iter().zip(&one).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "output {i} with {threads} threads"
                );
            }
        }
        crate::linalg::set_threads(0);
    }
}

//! Statistics on the device: the layer inputs never leave the GPU, only the sums do.
//!
//! | item | state on the device | bytes |
//! |---|---|---|
//! | [`DeviceGram`] | moments (n, Σx̃, Σx̃²), f32 Gram part, f64 Gram | [`DeviceGram::bytes`] |
//! | [`DeviceSketch`] | moments, test matrix `[Ω Θ]`, f32 and f64 `Σ x̃ᵀ(x̃[Ω Θ])` | [`DeviceSketch::bytes`] |
//! | [`plan`] | which rows go into which product, and when the f32 part is flushed into f64 | — |
//!
//! Rows are shifted by the reference vector `c` as on the CPU (`x̃ = x - c`, src/stats/mod.rs).
//! Products are cuBLAS `GemmEx` (f32 or bf16 inputs, f32 accumulation); their f32 sums are added
//! into the f64 accumulators after at most `flush_every` rows ([`FLUSH_ROWS`] by default, the
//! CPU's chunk): the bound is in docs/numerics.md ("Statistics on the GPU").

use super::{Cuda, CudaTensor, DType, DeviceError};
use cudarc::driver::CudaSlice;
use std::ops::Range;

/// Rows an f32 product accumulator sums before it is flushed into f64: the CPU's
/// [`crate::stats::CHUNK_ROWS`], so both paths carry the same error bound.
pub const FLUSH_ROWS: usize = crate::stats::CHUNK_ROWS;

/// One product of a batch of rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Rows of the batch in this product.
    pub rows: Range<usize>,
    /// Whether the product overwrites the f32 part (`beta = 0`, the first after a flush) or adds
    /// to it (`beta = 1`).
    pub overwrite: bool,
    /// Whether the f32 part is added into f64 (and emptied) after this product.
    pub flush: bool,
}

/// Cuts a batch of `rows` rows into products, given `pending` rows already in the f32 part:
/// no f32 part ever sums more than `flush_every` rows, and a part is flushed as soon as it is
/// full. Rows left in a part that is not full wait for the next batch (or [`DeviceGram::to_host`]).
pub fn plan(pending: usize, rows: usize, flush_every: usize) -> Vec<Chunk> {
    assert!(
        flush_every > 0 && pending < flush_every,
        "plan: pending {pending} must be below flush_every {flush_every}"
    );
    let mut out = Vec::new();
    let (mut at, mut pending) = (0, pending);
    while at < rows {
        let take = (flush_every - pending).min(rows - at);
        let full = pending + take == flush_every;
        out.push(Chunk {
            rows: at..at + take,
            overwrite: pending == 0,
            flush: full,
        });
        pending = if full { 0 } else { pending + take };
        at += take;
    }
    out
}

/// Host copies of the moments.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMoments {
    /// Rows.
    pub n: u64,
    /// `Σ (x - c)`.
    pub sum: Vec<f64>,
    /// `Σ (x - c)²` per feature.
    pub sum_sq: Vec<f64>,
}

/// Moments and shifted-row scratch shared by both estimators.
struct Shifter {
    d: usize,
    reference: CudaSlice<f32>,
    sum: CudaSlice<f64>,
    sum_sq: CudaSlice<f64>,
    n: u64,
    /// Shifted rows of one chunk: f32, or bf16 for a bf16 Gram.
    shifted_f32: Option<CudaSlice<f32>>,
    shifted_bf16: Option<CudaSlice<half::bf16>>,
}

impl Shifter {
    fn new(
        be: &Cuda,
        reference: &[f32],
        flush_every: usize,
        input: DType,
    ) -> Result<Self, DeviceError> {
        let d = reference.len();
        let what = "device statistics";
        Ok(Shifter {
            d,
            reference: be.upload(reference, what)?,
            sum: be.zeros_of(d, what)?,
            sum_sq: be.zeros_of(d, what)?,
            n: 0,
            shifted_f32: if input == DType::F32 {
                Some(be.alloc(flush_every * d, what)?)
            } else {
                None
            },
            shifted_bf16: if input == DType::Bf16 {
                Some(be.alloc(flush_every * d, what)?)
            } else {
                None
            },
        })
    }

    /// Shifts `x[rows]` into the scratch and adds it to the moments; returns the scratch's pointer.
    fn shift(&mut self, be: &Cuda, x: &CudaTensor, rows: Range<usize>) -> Result<u64, DeviceError> {
        let d = self.d;
        let px = be.ptr(x.buf()?) + (rows.start * d * 4) as u64;
        let (pf, pb) = (
            self.shifted_f32.as_ref().map_or(0, |s| be.ptr(s)),
            self.shifted_bf16.as_ref().map_or(0, |s| be.ptr(s)),
        );
        let (pc, ps, pq) = (
            be.ptr(&self.reference),
            be.ptr(&self.sum),
            be.ptr(&self.sum_sq),
        );
        let (n, d32, block) = (rows.len() as i32, d as i32, super::kernels::SUM_BLOCK);
        be.launch(
            "shift_moments",
            super::kernels::Shape::Features(d),
            &args![px, pc, pf, pb, ps, pq, n, d32, block],
        )?;
        self.n += rows.len() as u64;
        Ok(if pf != 0 { pf } else { pb })
    }

    fn to_host(&self, be: &Cuda) -> crate::Result<HostMoments> {
        Ok(HostMoments {
            n: self.n,
            sum: be
                .stream
                .clone_dtoh(&self.sum)
                .map_err(super::driver("device-to-host copy"))?,
            sum_sq: be
                .stream
                .clone_dtoh(&self.sum_sq)
                .map_err(super::driver("device-to-host copy"))?,
        })
    }
}

fn check_input(x: &CudaTensor, d: usize) -> Result<(), DeviceError> {
    if x.cols != d {
        return Err(DeviceError::Unsupported {
            op: "device statistics",
            detail: format!("rows of {d} features expected, found {}", x.cols),
        });
    }
    Ok(())
}

/// Exact statistics of one unique input on the device: `G = Σ x̃ x̃ᵀ` (full `d × d`, f64), and
/// the moments.
pub struct DeviceGram {
    shift: Shifter,
    input: DType,
    flush_every: usize,
    pending: usize,
    part: CudaSlice<f32>,
    gram: CudaSlice<f64>,
}

impl DeviceGram {
    /// Device bytes for dimension `d`: f64 Gram, f32 part, moments and reference, and one chunk
    /// of shifted rows (`flush_every × d` in the input type).
    pub fn bytes(d: usize, flush_every: usize, input: DType) -> usize {
        let elem = if input == DType::Bf16 { 2 } else { 4 };
        8 * d * d + 4 * d * d + (8 + 8 + 4) * d + elem * flush_every * d
    }

    /// Empty statistics around `reference` (the CPU's choice of shift, identical on every rank);
    /// the Gram's inputs are the shifted rows in `input` (bf16 halves the product's traffic and
    /// rounds each shifted value to 8 bits of mantissa).
    pub fn new(
        be: &Cuda,
        reference: &[f32],
        input: DType,
        flush_every: usize,
    ) -> crate::Result<Self> {
        let d = reference.len();
        let what = "device statistics";
        be.ensure_free(
            Self::bytes(d, flush_every, input),
            &format!("allocating the exact Gram of an input of dimension {d}"),
        )?;
        Ok(DeviceGram {
            shift: Shifter::new(be, reference, flush_every, input)?,
            input,
            flush_every,
            pending: 0,
            part: be.zeros_of(d * d, what)?,
            gram: be.zeros_of(d * d, what)?,
        })
    }

    /// Adds the rows of `x` (`tokens × d`, on this device).
    pub fn accumulate(&mut self, be: &Cuda, x: &CudaTensor) -> crate::Result<()> {
        be.check()?;
        let d = self.shift.d;
        check_input(x, d)?;
        for c in plan(self.pending, x.rows, self.flush_every) {
            let p = self.shift.shift(be, x, c.rows.clone())?;
            // Row-major X̃ [t, d] is column-major [d, t]: G (symmetric) = X̃ᶜ X̃ᶜᵀ.
            let pg = be.ptr(&self.part);
            be.gemm(
                false,
                true,
                d,
                d,
                c.rows.len(),
                p,
                d,
                p,
                d,
                if c.overwrite { 0.0 } else { 1.0 },
                pg,
                d,
                self.input,
            )?;
            self.pending = if c.flush {
                0
            } else {
                self.pending + c.rows.len()
            };
            if c.flush {
                self.flush(be)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, be: &Cuda) -> Result<(), DeviceError> {
        let (pp, pg, n) = (
            be.ptr(&self.part),
            be.ptr(&self.gram),
            (self.shift.d * self.shift.d) as u64,
        );
        be.launch(
            "flush_f64",
            super::kernels::Shape::Elements(n as usize),
            &args![pp, pg, n],
        )?;
        self.pending = 0;
        Ok(())
    }

    /// Flushes what is pending and copies the moments and the full Gram (row-major `d × d`) to
    /// the host: what the leader and the collectives take today.
    pub fn to_host(&mut self, be: &Cuda) -> crate::Result<(HostMoments, Vec<f64>)> {
        be.check()?;
        if self.pending > 0 {
            self.flush(be)?;
        }
        let gram = be
            .stream
            .clone_dtoh(&self.gram)
            .map_err(super::driver("device-to-host copy"))?;
        Ok((self.shift.to_host(be)?, gram))
    }
}

/// The sketch's products on the device: `Y = Σ x̃ᵀ(x̃ [Ω Θ])` (`d × m`, f64) and the moments.
pub struct DeviceSketch {
    shift: Shifter,
    m: usize,
    flush_every: usize,
    pending: usize,
    /// `[Ω Θ]`, row-major `d × m`, f32.
    test: CudaSlice<f32>,
    /// `x̃ [Ω Θ]` of one chunk, row-major `rows × m`.
    p: CudaSlice<f32>,
    part: CudaSlice<f32>,
    y: CudaSlice<f64>,
}

impl DeviceSketch {
    /// Device bytes for dimension `d` and `m = k + q` test columns.
    pub fn bytes(d: usize, m: usize, flush_every: usize) -> usize {
        4 * d * m
            + 4 * flush_every * m
            + 4 * d * m
            + 8 * d * m
            + (8 + 8 + 4) * d
            + 4 * flush_every * d
    }

    /// Empty sketch around `reference` with the test matrix `test` (row-major `d × m`, the CPU's
    /// `SketchStats` test matrix in f32, identical on every rank).
    pub fn new(
        be: &Cuda,
        reference: &[f32],
        test: &[f32],
        flush_every: usize,
    ) -> crate::Result<Self> {
        let d = reference.len();
        assert!(
            d > 0 && test.len() % d == 0,
            "DeviceSketch: the test matrix must have d = {d} rows"
        );
        let m = test.len() / d;
        let what = "device sketch";
        be.ensure_free(
            Self::bytes(d, m, flush_every),
            &format!("allocating the sketch of an input of dimension {d}"),
        )?;
        Ok(DeviceSketch {
            shift: Shifter::new(be, reference, flush_every, DType::F32)?,
            m,
            flush_every,
            pending: 0,
            test: be.upload(test, what)?,
            p: be.alloc(flush_every * m, what)?,
            part: be.zeros_of(d * m, what)?,
            y: be.zeros_of(d * m, what)?,
        })
    }

    /// Adds the rows of `x` (`tokens × d`, on this device).
    pub fn accumulate(&mut self, be: &Cuda, x: &CudaTensor) -> crate::Result<()> {
        be.check()?;
        let (d, m) = (self.shift.d, self.m);
        check_input(x, d)?;
        for c in plan(self.pending, x.rows, self.flush_every) {
            let t = c.rows.len();
            let px = self.shift.shift(be, x, c.rows.clone())?;
            let (pt, pp, py) = (be.ptr(&self.test), be.ptr(&self.p), be.ptr(&self.part));
            // P [t, m] = X̃ T: column-major Pᶜ [m, t] = Tᶜ [m, d] · X̃ᶜ [d, t].
            be.gemm(false, false, m, t, d, pt, m, px, d, 0.0, pp, m, DType::F32)?;
            // Y [d, m] += X̃ᵀ P: column-major Yᶜ [m, d] = Pᶜ [m, t] · X̃ᶜᵀ [t, d].
            be.gemm(
                false,
                true,
                m,
                d,
                t,
                pp,
                m,
                px,
                d,
                if c.overwrite { 0.0 } else { 1.0 },
                py,
                m,
                DType::F32,
            )?;
            self.pending = if c.flush { 0 } else { self.pending + t };
            if c.flush {
                self.flush(be)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, be: &Cuda) -> Result<(), DeviceError> {
        let (pp, py, n) = (
            be.ptr(&self.part),
            be.ptr(&self.y),
            (self.shift.d * self.m) as u64,
        );
        be.launch(
            "flush_f64",
            super::kernels::Shape::Elements(n as usize),
            &args![pp, py, n],
        )?;
        self.pending = 0;
        Ok(())
    }

    /// Flushes what is pending and copies the moments and `Y` (row-major `d × m`) to the host.
    pub fn to_host(&mut self, be: &Cuda) -> crate::Result<(HostMoments, Vec<f64>)> {
        be.check()?;
        if self.pending > 0 {
            self.flush(be)?;
        }
        let y = be
            .stream
            .clone_dtoh(&self.y)
            .map_err(super::driver("device-to-host copy"))?;
        Ok((self.shift.to_host(be)?, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(p: &[Chunk]) -> Vec<Range<usize>> {
        p.iter().map(|c| c.rows.clone()).collect()
    }

    #[test]
    fn plan_flushes_exactly_every_flush_every_rows() {
        // 10 rows into parts of 4: 4 (flush), 4 (flush), 2 pending.
        let p = plan(0, 10, 4);
        assert_eq!(rows_of(&p), vec![0..4, 4..8, 8..10]);
        assert_eq!(
            p.iter().map(|c| (c.overwrite, c.flush)).collect::<Vec<_>>(),
            vec![(true, true), (true, true), (true, false)]
        );
        // The next batch first fills the pending part (adds to it), then flushes.
        let p = plan(2, 5, 4);
        assert_eq!(rows_of(&p), vec![0..2, 2..5]);
        assert_eq!(
            p.iter().map(|c| (c.overwrite, c.flush)).collect::<Vec<_>>(),
            vec![(false, true), (true, false)]
        );
    }

    #[test]
    fn plan_never_sums_more_than_flush_every_rows_in_f32() {
        for flush in [1, 3, 7, 4096] {
            let mut pending = 0;
            let mut total = 0;
            for batch in [0, 1, 5, 4095, 4096, 4097, 10_000, 2] {
                let p = plan(pending, batch, flush);
                assert_eq!(p.iter().map(|c| c.rows.len()).sum::<usize>(), batch);
                for c in &p {
                    assert!(!c.rows.is_empty());
                    assert_eq!(
                        c.overwrite,
                        pending == 0,
                        "beta = 0 exactly when the part is empty"
                    );
                    pending += c.rows.len();
                    assert!(
                        pending <= flush,
                        "an f32 part summed {pending} > {flush} rows"
                    );
                    assert_eq!(c.flush, pending == flush);
                    if c.flush {
                        pending = 0;
                    }
                }
                total += batch;
            }
            assert_eq!(pending, total % flush);
        }
    }

    #[test]
    fn buffer_sizes_count_every_allocation() {
        // d = 4096, flush 4096, f32: 128 MiB f64 Gram + 64 MiB f32 part + 64 MiB chunk + moments.
        let d = 4096;
        assert_eq!(
            DeviceGram::bytes(d, 4096, DType::F32),
            8 * d * d + 4 * d * d + 20 * d + 4 * 4096 * d
        );
        assert_eq!(
            DeviceGram::bytes(d, 4096, DType::Bf16),
            8 * d * d + 4 * d * d + 20 * d + 2 * 4096 * d
        );
        // The sketch never holds d²: d = 4096, m = 48.
        let s = DeviceSketch::bytes(d, 48, 4096);
        assert_eq!(s, 16 * d * 48 + 4 * 4096 * 48 + 20 * d + 4 * 4096 * d);
        // No d² term: at d = 4096 the one chunk of shifted rows dominates.
        assert!(s < DeviceGram::bytes(d, 4096, DType::F32) / 3);
    }
}

//! Statistics on the device: the layer inputs never leave the GPU, only the sums do.
//!
//! | item | state on the device | bytes |
//! |---|---|---|
//! | [`DeviceGram`] | moments (n, Σx̃, Σx̃²), f32 Gram part, f64 Gram | [`DeviceGram::bytes`] |
//! | [`DeviceSketch`] | moments, test matrix `[Ω Θ]`, f32 and f64 `Σ x̃ᵀ(x̃[Ω Θ])` | [`DeviceSketch::bytes`] |
//! | [`DeviceSums`] | f64 sums to all-reduce (the packed shared part, `G·Q` products) | its length × 8 |
//! | [`plan`] | which rows go into which product, and when the f32 part is flushed into f64 | — |
//!
//! These know nothing of the host's statistics types: sums cross as plain vectors
//! (`device::gpu::MomentSums`, row-major products); `stats::device` builds the host statistics from them.
//!
//! Rows are shifted by the reference vector `c` as on the CPU (`x̃ = x - c`, `stats::Moments`).
//! Products are cuBLAS `GemmEx` (f32 or bf16 inputs, f32 accumulation); their f32 sums are added
//! into the f64 accumulators after at most `flush_every` rows ([`FLUSH_ROWS`] by default, the
//! CPU's chunk): the bound is in docs/numerics.md ("Statistics on the GPU").

use super::runtime::Buffer;
use super::{Cuda, CudaTensor};
use crate::config::validate::DType;
use crate::device::error::DeviceError;
use crate::device::gpu::{DeviceBuffer, Gpu, GramAccumulator, MomentSums, SketchAccumulator};
use std::ops::Range;
use std::sync::Arc;

/// Rows an f32 product accumulator sums before it is flushed into f64: the CPU's
/// [`crate::device::blocks::CHUNK_ROWS`], so both paths carry the same error bound.
pub const FLUSH_ROWS: usize = crate::device::blocks::CHUNK_ROWS;

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

/// The shifted rows of one chunk, in the Gram's input type (allocated per chunk from the
/// stream's memory pool, so that no input keeps a chunk's scratch between captures).
enum Scratch {
    F32(Buffer<f32>),
    Bf16(Buffer<half::bf16>),
}

/// Moments shared by both estimators.
struct Shifter {
    d: usize,
    input: DType,
    reference: Buffer<f32>,
    sum: Buffer<f64>,
    sum_sq: Buffer<f64>,
    n: u64,
}

impl Shifter {
    fn new(be: &Cuda, reference: &[f32], input: DType) -> Result<Self, DeviceError> {
        let d = reference.len();
        let what = "device statistics";
        Ok(Shifter {
            d,
            input,
            reference: be.upload(reference, what)?,
            sum: be.zeros_of(d, what)?,
            sum_sq: be.zeros_of(d, what)?,
            n: 0,
        })
    }

    /// Shifts `x[rows]` into a new scratch and adds it to the moments.
    fn shift(
        &mut self,
        be: &Cuda,
        x: &CudaTensor,
        rows: Range<usize>,
    ) -> Result<(Scratch, u64), DeviceError> {
        let d = self.d;
        let px = be.rt.ptr(x.buf()?) + (rows.start * d * 4) as u64;
        let what = "the shifted rows of a capture";
        let scratch = match self.input {
            DType::F32 => Scratch::F32(be.alloc(rows.len() * d, what)?),
            DType::Bf16 => Scratch::Bf16(be.alloc(rows.len() * d, what)?),
        };
        let (pf, pb) = match &scratch {
            Scratch::F32(s) => (be.rt.ptr(s), 0),
            Scratch::Bf16(s) => (0, be.rt.ptr(s)),
        };
        let (pc, ps, pq) = (
            be.rt.ptr(&self.reference),
            be.rt.ptr(&self.sum),
            be.rt.ptr(&self.sum_sq),
        );
        let (n, d32, block) = (rows.len() as i32, d as i32, super::kernels::SUM_BLOCK);
        let blocks = rows.len().div_ceil(block as usize);
        let part = be.alloc::<f32>(2 * blocks * d, "the partial sums of the moments")?;
        let pp = be.rt.ptr(&part);
        be.rt.launch(
            "shift_moments",
            super::kernels::Shape::FeatureBlocks { d, blocks },
            &args![px, pc, pf, pb, pp, n, d32, block],
        )?;
        let nb = blocks as i32;
        be.rt.launch(
            "add_moments",
            super::kernels::Shape::Features(d),
            &args![pp, ps, pq, nb, d32],
        )?;
        self.n += rows.len() as u64;
        Ok((scratch, if pf != 0 { pf } else { pb }))
    }

    fn to_host(&self, be: &Cuda) -> crate::Result<MomentSums> {
        Ok(MomentSums {
            n: self.n,
            sum: be.rt.download(&self.sum, 0..self.d)?,
            sum_sq: be.rt.download(&self.sum_sq, 0..self.d)?,
        })
    }

    /// Replaces the moments with `m` (statistics brought back from the host).
    fn load(&mut self, be: &Cuda, m: &MomentSums) -> crate::Result<()> {
        be.rt.write(&m.sum, &mut self.sum, 0)?;
        be.rt.write(&m.sum_sq, &mut self.sum_sq, 0)?;
        self.n = m.n;
        Ok(())
    }

    /// Writes `[n, Σx̃, Σx̃²]` at `at` of `out`; returns the position after them.
    fn pack(&self, be: &Cuda, out: &mut DeviceSums, at: usize) -> crate::Result<usize> {
        let d = self.d;
        be.rt.write(&[self.n as f64], &mut out.data, at)?;
        be.rt.copy(&self.sum, &mut out.data, at + 1)?;
        be.rt.copy(&self.sum_sq, &mut out.data, at + 1 + d)?;
        Ok(at + 1 + 2 * d)
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
    flush_every: usize,
    pending: usize,
    part: Buffer<f32>,
    gram: Buffer<f64>,
}

impl DeviceGram {
    /// Device bytes for dimension `d` between captures: f64 Gram, f32 part, moments and
    /// reference. A capture adds one chunk of shifted rows ([`chunk_bytes`]) while it is added.
    pub fn bytes(d: usize) -> usize {
        8 * d * d + 4 * d * d + (8 + 8 + 4) * d
    }

    /// Adds the pending f32 part into the f64 Gram.
    fn flush(&mut self, be: &Cuda) -> Result<(), DeviceError> {
        flush_part(be, &self.part, &self.gram, self.shift.d * self.shift.d)?;
        self.pending = 0;
        Ok(())
    }

    fn settle(&mut self, be: &Cuda) -> crate::Result<()> {
        be.check()?;
        if self.pending > 0 {
            self.flush(be)?;
        }
        Ok(())
    }

    /// Writes the f64 Gram's upper triangle, row by row, at `at` of `out` (the host's
    /// `exact::pack_upper` layout); returns the position after it.
    fn pack_upper(&self, be: &Cuda, out: &mut DeviceSums, at: usize) -> crate::Result<usize> {
        let d = self.shift.d;
        let len = d * (d + 1) / 2;
        assert!(at + len <= out.len, "pack_upper: the buffer is too short");
        let (pg, po, d32) = (
            be.rt.ptr(&self.gram),
            be.rt.ptr(&out.data) + (at * 8) as u64,
            d as i32,
        );
        be.rt.launch(
            "pack_upper_f64",
            super::kernels::Shape::Rows(d),
            &args![pg, po, d32],
        )?;
        Ok(at + len)
    }

    /// The f64 Gram, after the step's packing flushed it (products and the packed Gram read
    /// only the f64 sums).
    fn settled(&self) -> Result<&Buffer<f64>, DeviceError> {
        match self.pending {
            0 => Ok(&self.gram),
            _ => Err(DeviceError::Unsupported {
                op: "Gram products",
                detail: "rows were added after the step's all-reduce".into(),
            }),
        }
    }
}

impl GramAccumulator for DeviceGram {
    type Gpu = Cuda;
    type Sums = DeviceSums;

    /// Empty statistics around `reference` (the CPU's choice of shift, identical on every rank);
    /// the Gram's inputs are the shifted rows in `input` (bf16 halves the product's traffic and
    /// rounds each shifted value to 8 bits of mantissa).
    fn new(be: &Cuda, reference: &[f32], input: DType, flush_every: usize) -> crate::Result<Self> {
        let d = reference.len();
        let what = "device statistics";
        be.ensure_free(
            Self::bytes(d),
            &format!("allocating the exact Gram of an input of dimension {d}"),
        )?;
        Ok(DeviceGram {
            shift: Shifter::new(be, reference, input)?,
            flush_every,
            pending: 0,
            part: be.zeros_of(d * d, what)?,
            gram: be.zeros_of(d * d, what)?,
        })
    }

    /// Adds the rows of `x` (`tokens × d`, on this device).
    fn accumulate(&mut self, be: &Cuda, x: &CudaTensor) -> crate::Result<()> {
        be.check()?;
        let d = self.shift.d;
        check_input(x, d)?;
        for c in plan(self.pending, x.rows, self.flush_every) {
            let (_scratch, p) = self.shift.shift(be, x, c.rows.clone())?;
            // Row-major X̃ [t, d] is column-major [d, t]: G (symmetric) = X̃ᶜ X̃ᶜᵀ.
            let pg = be.rt.ptr(&self.part);
            // SAFETY: the scratch holds the chunk's t·d shifted rows, the part d·d values.
            unsafe {
                be.rt.gemm(
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
                    self.shift.input,
                )
            }?;
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

    /// Replaces the sums with host ones (`gram` row-major `d × d`, at least its upper triangle
    /// valid: products read only that triangle).
    fn load(&mut self, be: &Cuda, moments: &MomentSums, gram: &[f64]) -> crate::Result<()> {
        self.settle(be)?;
        be.rt.write(gram, &mut self.gram, 0)?;
        self.shift.load(be, moments)
    }

    /// Dimension.
    fn dim(&self) -> usize {
        self.shift.d
    }

    /// Writes the shared part at `at` of `out` (`[n, Σx̃, Σx̃²]`, then with `with_gram` the f64
    /// Gram's upper triangle row by row, the host's `exact::pack_upper` layout) after flushing
    /// what is pending; returns the position after it.
    fn pack(
        &mut self,
        be: &Cuda,
        out: &mut DeviceSums,
        at: usize,
        with_gram: bool,
    ) -> crate::Result<usize> {
        self.settle(be)?;
        let at = self.shift.pack(be, out, at)?;
        match with_gram {
            true => self.pack_upper(be, out, at),
            false => Ok(at),
        }
    }

    /// `G·Q` for `q` row-major `d × m` in host memory: a cuBLAS `dsymm` on the f64 Gram's
    /// upper triangle, left on the device to be all-reduced.
    fn apply(&self, gpu: &Arc<Cuda>, q: &[f64], m: usize) -> crate::Result<DeviceSums> {
        let gram = self.settled()?;
        let d = self.shift.d;
        assert_eq!(q.len(), d * m, "DeviceGram::apply: Q must be d x m");
        let dq = gpu.upload(q, "a Gram product")?;
        let mut z = DeviceSums::zeros(gpu, d * m, "a Gram product")?;
        gpu.rt.symm_f64(gram, d, &dq, m, &mut z.data)?;
        Ok(z)
    }

    /// The Gram's upper triangle, packed row by row (`d(d+1)/2` values), left on the device.
    fn packed(&self, gpu: &Arc<Cuda>) -> crate::Result<DeviceSums> {
        self.settled()?;
        let d = self.shift.d;
        let mut out = DeviceSums::zeros(gpu, d * (d + 1) / 2, "a packed Gram")?;
        self.pack_upper(gpu, &mut out, 0)?;
        Ok(out)
    }

    /// A copy of the moments and the full Gram (row-major `d × d`) in host memory, with a
    /// pending f32 part added into the copy rather than flushed (this takes `&self`).
    fn snapshot(&self, be: &Cuda) -> crate::Result<(MomentSums, Vec<f64>)> {
        let d = self.shift.d;
        let g = with_pending(be, &self.part, &self.gram, d * d, self.pending)?;
        Ok((self.shift.to_host(be)?, g))
    }
}

/// The sketch's products on the device: `Y = Σ x̃ᵀ(x̃ [Ω Θ])` (`d × m`, f64) and the moments.
pub struct DeviceSketch {
    shift: Shifter,
    m: usize,
    flush_every: usize,
    pending: usize,
    /// `[Ω Θ]`, row-major `d × m`, f32.
    test: Buffer<f32>,
    part: Buffer<f32>,
    y: Buffer<f64>,
}

impl DeviceSketch {
    /// Device bytes for dimension `d` and `m = k + q` test columns between captures: test matrix,
    /// f32 and f64 sums, moments and reference. A capture adds its chunk of shifted rows and
    /// `x̃ [Ω Θ]` ([`chunk_bytes`]).
    pub fn bytes(d: usize, m: usize) -> usize {
        4 * d * m + 4 * d * m + 8 * d * m + (8 + 8 + 4) * d
    }

    fn flush(&mut self, be: &Cuda) -> Result<(), DeviceError> {
        flush_part(be, &self.part, &self.y, self.shift.d * self.m)?;
        self.pending = 0;
        Ok(())
    }

    fn settle(&mut self, be: &Cuda) -> crate::Result<()> {
        be.check()?;
        if self.pending > 0 {
            self.flush(be)?;
        }
        Ok(())
    }
}

impl SketchAccumulator for DeviceSketch {
    type Gpu = Cuda;
    type Sums = DeviceSums;

    /// Empty sketch around `reference` with the test matrix `test` (row-major `d × m`, the CPU's
    /// `SketchStats` test matrix in f32, identical on every rank).
    fn new(be: &Cuda, reference: &[f32], test: &[f32], flush_every: usize) -> crate::Result<Self> {
        let d = reference.len();
        assert!(
            d > 0 && test.len() % d == 0,
            "DeviceSketch: the test matrix must have d = {d} rows"
        );
        let m = test.len() / d;
        let what = "device sketch";
        be.ensure_free(
            Self::bytes(d, m),
            &format!("allocating the sketch of an input of dimension {d}"),
        )?;
        Ok(DeviceSketch {
            shift: Shifter::new(be, reference, DType::F32)?,
            m,
            flush_every,
            pending: 0,
            test: be.upload(test, what)?,
            part: be.zeros_of(d * m, what)?,
            y: be.zeros_of(d * m, what)?,
        })
    }

    /// Adds the rows of `x` (`tokens × d`, on this device).
    fn accumulate(&mut self, be: &Cuda, x: &CudaTensor) -> crate::Result<()> {
        be.check()?;
        let (d, m) = (self.shift.d, self.m);
        check_input(x, d)?;
        for c in plan(self.pending, x.rows, self.flush_every) {
            let t = c.rows.len();
            let (_scratch, px) = self.shift.shift(be, x, c.rows.clone())?;
            let p = be.alloc::<f32>(t * m, "a sketch product")?;
            let (pt, pp, py) = (be.rt.ptr(&self.test), be.rt.ptr(&p), be.rt.ptr(&self.part));
            // P [t, m] = X̃ T: column-major Pᶜ [m, t] = Tᶜ [m, d] · X̃ᶜ [d, t].
            // SAFETY: the test matrix holds d·m values, the scratch t·d, P t·m, the part d·m.
            unsafe {
                be.rt
                    .gemm(false, false, m, t, d, pt, m, px, d, 0.0, pp, m, DType::F32)
            }?;
            // Y [d, m] += X̃ᵀ P: column-major Yᶜ [m, d] = Pᶜ [m, t] · X̃ᶜᵀ [t, d].
            // SAFETY: as above.
            unsafe {
                be.rt.gemm(
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
                )
            }?;
            self.pending = if c.flush { 0 } else { self.pending + t };
            if c.flush {
                self.flush(be)?;
            }
        }
        Ok(())
    }

    /// Replaces the sums with host ones (`y` row-major `d × m`).
    fn load(&mut self, be: &Cuda, moments: &MomentSums, y: &[f64]) -> crate::Result<()> {
        self.settle(be)?;
        be.rt.write(y, &mut self.y, 0)?;
        self.shift.load(be, moments)
    }

    /// Dimension.
    fn dim(&self) -> usize {
        self.shift.d
    }

    /// Test columns `m = k + q`.
    fn columns(&self) -> usize {
        self.m
    }

    /// Writes the shared part at `at` of `out` (`[n, Σx̃, Σx̃², Y]`) after flushing what is
    /// pending; returns the position after it.
    fn pack(&mut self, be: &Cuda, out: &mut DeviceSums, at: usize) -> crate::Result<usize> {
        self.settle(be)?;
        let at = self.shift.pack(be, out, at)?;
        let n = self.shift.d * self.m;
        be.rt.copy(&self.y, &mut out.data, at)?;
        Ok(at + n)
    }

    /// A copy of the moments and `Y` (row-major `d × m`) in host memory, with a pending f32
    /// part added into the copy rather than flushed (this takes `&self`).
    fn snapshot(&self, be: &Cuda) -> crate::Result<(MomentSums, Vec<f64>)> {
        let n = self.shift.d * self.m;
        let y = with_pending(be, &self.part, &self.y, n, self.pending)?;
        Ok((self.shift.to_host(be)?, y))
    }
}

/// Adds the f32 part of a product into its f64 sum (`n` values), on the device.
fn flush_part(
    be: &Cuda,
    part: &Buffer<f32>,
    sum: &Buffer<f64>,
    n: usize,
) -> Result<(), DeviceError> {
    let (pp, ps, n64) = (be.rt.ptr(part), be.rt.ptr(sum), n as u64);
    be.rt.launch(
        "flush_f64",
        super::kernels::Shape::Elements(n),
        &args![pp, ps, n64],
    )
}

/// A host copy of an f64 sum (`n` values) with its f32 part added when `pending` rows are in
/// it, without flushing (for callers holding `&self`).
fn with_pending(
    be: &Cuda,
    part: &Buffer<f32>,
    sum: &Buffer<f64>,
    n: usize,
    pending: usize,
) -> crate::Result<Vec<f64>> {
    let mut host = be.rt.download(sum, 0..n)?;
    if pending > 0 {
        let part = be.rt.download(part, 0..n)?;
        host.iter_mut().zip(part).for_each(|(a, p)| *a += p as f64);
    }
    Ok(host)
}

/// Device bytes a capture of `rows` rows needs while it is added (at most one chunk of
/// [`FLUSH_ROWS`] rows at a time): its shifted rows, the f32 partial sums of the moments (two
/// per feature and block of [`super::kernels::SUM_BLOCK`] rows), and for a sketch of `m` columns
/// `x̃ [Ω Θ]`.
pub fn chunk_bytes(rows: usize, d: usize, sketch_columns: Option<usize>) -> usize {
    let t = rows.min(FLUSH_ROWS);
    let blocks = t.div_ceil(super::kernels::SUM_BLOCK as usize);
    4 * t * d + 8 * blocks * d + sketch_columns.map_or(0, |m| 4 * t * m)
}

/// f64 values in device memory: the packed shared parts of a stage's inputs, or `G·Q` products,
/// which a device all-reduce (`Communicator::all_reduce_sum_device`, NCCL) sums in place.
pub struct DeviceSums {
    gpu: Arc<Cuda>,
    data: Buffer<f64>,
    len: usize,
}

impl DeviceBuffer for DeviceSums {
    type Gpu = Cuda;

    /// `len` zeros on `gpu`.
    fn zeros(gpu: &Arc<Cuda>, len: usize, what: &str) -> crate::Result<Self> {
        Ok(DeviceSums {
            gpu: gpu.clone(),
            data: gpu.zeros_of(len, what)?,
            len,
        })
    }

    /// Values.
    fn len(&self) -> usize {
        self.len
    }

    /// The GPU they live on.
    fn gpu(&self) -> &Arc<Cuda> {
        &self.gpu
    }

    /// A copy in host memory.
    fn to_host(&self) -> crate::Result<Vec<f64>> {
        Ok(self.gpu.rt.download(&self.data, 0..self.len)?)
    }

    /// Overwrites the values with `host` (of the same length).
    fn copy_from_host(&mut self, host: &[f64]) -> crate::Result<()> {
        assert_eq!(host.len(), self.len, "DeviceSums::copy_from_host: lengths");
        if host.is_empty() {
            return Ok(());
        }
        Ok(self.gpu.rt.write(host, &mut self.data, 0)?)
    }
}

impl DeviceSums {
    /// The device buffer (at least one value long even when empty), for collectives that read
    /// and write device memory; they must be ordered after the work queued on the backend's
    /// stream (NCCL on the same device's default stream is).
    pub fn buffer_mut(&mut self) -> &mut Buffer<f64> {
        &mut self.data
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
        // d = 4096: 128 MiB f64 Gram + 64 MiB f32 part + moments and reference; a capture of
        // 10 000 rows adds one chunk of 4096 shifted rows (64 MiB) while it is added.
        let d = 4096;
        assert_eq!(DeviceGram::bytes(d), 8 * d * d + 4 * d * d + 20 * d);
        // ... and its moments' partial sums: 16 blocks of 256 rows, two f32 sums per feature.
        assert_eq!(chunk_bytes(10_000, d, None), 4 * 4096 * d + 8 * 16 * d);
        assert_eq!(chunk_bytes(100, d, None), 4 * 100 * d + 8 * d);
        // The sketch never holds d²: d = 4096, m = 48.
        let s = DeviceSketch::bytes(d, 48);
        assert_eq!(s, 16 * d * 48 + 20 * d);
        assert_eq!(
            chunk_bytes(10_000, d, Some(48)),
            4 * 4096 * (d + 48) + 8 * 16 * d
        );
        assert!(s < DeviceGram::bytes(d) / 50);
    }
}

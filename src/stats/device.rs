//! Statistics on the GPU that ran the forward pass (`--device cuda`): the layer inputs never
//! leave it, only the sums do. Products are flushed from f32 into f64 every [`CHUNK_ROWS`] rows,
//! the CPU's chunk, so both paths carry the same error bound. [`DeviceStats`] is what [`super::InputStats::Device`] holds: the
//! device accumulators of `device::cuda::gram` (which know no statistics types) with the host
//! parts (shift, test matrix) that turn their sums back into [`ExactStats`] or [`SketchStats`].

use super::exact::ExactStats;
use super::sketch::SketchStats;
use super::{InputStats, Moments};
use crate::config::validate::DType;
use crate::device::blocks::CHUNK_ROWS;
use crate::device::cuda::{Cuda, CudaTensor, DeviceGram, DeviceSketch, DeviceSums};
use crate::device::error::DeviceError;
use crate::device::gpu::{Gpu, GramAccumulator, MomentSums, SketchAccumulator};
use crate::Result;
use ndarray::ArrayView2;
use std::sync::Arc;

/// The statistics of one unique input on a GPU: exact or sketch as decided for the CPU, with the
/// same shift and (sketch) the same test matrix, so that all-reduced sums and the leader's solves
/// are those of the CPU path up to the f32 products' rounding.
pub struct DeviceStats {
    gpu: Arc<Cuda>,
    kind: Kind,
}

enum Kind {
    Exact {
        gram: DeviceGram,
        /// The shift, for [`DeviceStats::to_host`].
        reference: Vec<f32>,
    },
    Sketch {
        sketch: DeviceSketch,
        /// The test matrices and the reconstruction; its own sums are not used.
        host: Box<SketchStats>,
    },
}

/// Host moments as the device accumulators take them.
fn sums_of(m: &Moments) -> MomentSums {
    MomentSums {
        n: m.n,
        sum: m.sum.clone(),
        sum_sq: m.sum_sq.clone(),
    }
}

/// Device moments as the host statistics hold them.
fn moments_of(m: MomentSums) -> Moments {
    Moments {
        n: m.n,
        sum: m.sum,
        sum_sq: m.sum_sq,
    }
}

impl DeviceStats {
    /// `host`'s statistics on `gpu`: the same estimator, shift and test matrix, and its sums
    /// uploaded when it has any (a resumed run).
    pub fn new(gpu: &Arc<Cuda>, host: &InputStats) -> Result<Self> {
        let kind = match host {
            InputStats::Exact(e) => {
                let mut gram = DeviceGram::new(gpu, e.reference(), DType::F32, CHUNK_ROWS)?;
                if e.moments.n > 0 {
                    gram.load(gpu, &sums_of(&e.moments), e.gram())?;
                }
                Kind::Exact {
                    gram,
                    reference: e.reference().to_vec(),
                }
            }
            InputStats::Sketch(s) => {
                let test = s.test32().as_standard_layout();
                let mut sketch = DeviceSketch::new(
                    gpu,
                    s.reference(),
                    test.as_slice().expect("standard layout"),
                    CHUNK_ROWS,
                )?;
                if s.moments.n > 0 {
                    let y = s.sketch().as_standard_layout();
                    let y = y.as_slice().expect("standard layout");
                    sketch.load(gpu, &sums_of(&s.moments), y)?;
                }
                Kind::Sketch {
                    sketch,
                    host: Box::new(s.clone()),
                }
            }
            InputStats::Device(d) => return d.to_host().and_then(|h| Self::new(gpu, &h)),
        };
        Ok(DeviceStats {
            gpu: gpu.clone(),
            kind,
        })
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Cuda> {
        &self.gpu
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        match &self.kind {
            Kind::Exact { gram, .. } => gram.dim(),
            Kind::Sketch { sketch, .. } => sketch.dim(),
        }
    }

    /// The sketch's test matrices and reconstruction (`None` for exact statistics).
    pub fn sketch(&self) -> Option<&SketchStats> {
        match &self.kind {
            Kind::Exact { .. } => None,
            Kind::Sketch { host, .. } => Some(host),
        }
    }

    /// Adds rows on this GPU.
    pub fn accumulate(&mut self, x: &CudaTensor) -> Result<()> {
        let gpu = &*self.gpu;
        match &mut self.kind {
            Kind::Exact { gram, .. } => gram.accumulate(gpu, x),
            Kind::Sketch { sketch, .. } => sketch.accumulate(gpu, x),
        }
    }

    /// Adds host rows (uploaded first).
    pub fn accumulate_host(&mut self, x: ArrayView2<f32>) -> Result<()> {
        let t = self.gpu.to_device(&x.to_owned())?;
        self.accumulate(&t)
    }

    /// Values [`DeviceStats::pack`] writes ([`super::shared_len`]).
    pub fn packed_len(&self, with_gram: bool) -> usize {
        let sketch_columns = match &self.kind {
            Kind::Sketch { sketch, .. } => Some(sketch.columns()),
            Kind::Exact { .. } => None,
        };
        super::shared_len(self.dim(), sketch_columns, with_gram)
    }

    /// Writes the shared part at `at` of `out`, laid out as `InputStats::pack_shared` writes it
    /// on the host (`[n, Σx̃, Σx̃², sketch | Gram upper triangle]`); returns the position after it.
    pub fn pack(&mut self, out: &mut DeviceSums, at: usize, with_gram: bool) -> Result<usize> {
        let gpu = &*self.gpu;
        match &mut self.kind {
            Kind::Exact { gram, .. } => gram.pack(gpu, out, at, with_gram),
            Kind::Sketch { sketch, .. } => sketch.pack(gpu, out, at),
        }
    }

    /// The exact Gram (an error for a sketch).
    fn gram(&self) -> Result<&DeviceGram> {
        match &self.kind {
            Kind::Exact { gram, .. } => Ok(gram),
            Kind::Sketch { .. } => Err(DeviceError::Unsupported {
                op: "Gram products",
                detail: "these statistics are a sketch".into(),
            }
            .into()),
        }
    }

    /// `G·Q` (`Q` is `d x m`, row-major on the host) on the device, for exact statistics, left on
    /// the device to be all-reduced.
    pub fn gram_apply(&self, q: ArrayView2<f64>) -> Result<DeviceSums> {
        let gram = self.gram()?;
        assert_eq!(q.nrows(), gram.dim(), "gram_apply: Q must have d rows");
        let q = q.as_standard_layout();
        gram.apply(&self.gpu, q.as_slice().expect("standard layout"), q.ncols())
    }

    /// The Gram's upper triangle, packed row by row (`d(d+1)/2` values), left on the device.
    pub fn packed_gram(&self) -> Result<DeviceSums> {
        self.gram()?.packed(&self.gpu)
    }

    /// These statistics as host ones (the same estimator, shift, test matrix and sums).
    pub fn to_host(&self) -> Result<InputStats> {
        let gpu = &*self.gpu;
        Ok(match &self.kind {
            Kind::Exact { gram, reference } => {
                let (moments, g) = gram.snapshot(gpu)?;
                InputStats::Exact(ExactStats::from_parts(
                    reference.clone(),
                    moments_of(moments),
                    g,
                ))
            }
            Kind::Sketch { sketch, host } => {
                let (moments, y) = sketch.snapshot(gpu)?;
                InputStats::Sketch((**host).clone().with_sums(moments_of(moments), y))
            }
        })
    }
}

#[cfg(all(test, eva_gpu))]
mod tests {
    #[test]
    fn packed_gram_offsets_match_the_host_layout() {
        // pack_upper_f64 starts row i at i·d − i(i−1)/2: the host's pack_upper order.
        for d in [1usize, 2, 5, 64] {
            let full: Vec<f64> = (0..d * d).map(|v| v as f64).collect();
            let mut host = Vec::new();
            crate::stats::exact::pack_upper(&full, d, &mut host);
            for i in 0..d {
                let start = i * d - i * i.saturating_sub(1) / 2;
                assert_eq!(host[start], full[i * d + i], "d {d}, row {i}");
            }
            assert_eq!(host.len(), d * (d + 1) / 2);
        }
        let src = crate::device::cuda::kernels::SOURCE;
        assert!(src.contains("unsigned long long start = i * d - i * (i - 1) / 2;"));
    }
}

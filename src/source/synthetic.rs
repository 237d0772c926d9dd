//! `--synthetic SPEC`: activations with a known spectrum, for tests and scaling benchmarks.
//!
//! SPEC is a comma-separated list of `key=value` (all optional):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `layers` | 4 | unique inputs (transformer blocks) |
//! | `group` | 1 | layers per input: `model.layers.{l}.proj{j}`, j < group, share input l |
//! | `dim` | 256 | in_features of every layer |
//! | `out` | `dim` | out_features of every layer |
//! | `decay` | 1.0 | eigenvalues of input l are `(i+1)^-decay_l`, `decay_l` spread from 0.5·decay to 1.5·decay over the inputs |
//! | `mean` | 0.0 | mean vector = mean × a fixed standard-normal vector |
//! | `tokens` | 256 | rows per unit and input |
//! | `units` | 64 | number of units |
//! | `seed` | 0 | seed of bases, means and data |
//!
//! Unit `u` of input `l` is `x = μ_l + Q_l (λ_l^½ ⊙ z)` with `z` i.i.d. uniform on `[-√3, √3]`
//! (unit variance) drawn from `(seed, l, u)` alone, so any rank can produce any unit; `Q_l` is a
//! product of three Householder reflections drawn from `(seed, l)`, so the eigenvectors are dense.

use super::{Rows, Sink, Source};
use crate::catalog::Catalog;
use crate::rng::Rng;
use crate::{Error, Result};
use ndarray::{Array1, Array2};

/// Parsed `--synthetic` specification.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSpec {
    pub layers: usize,
    pub group: usize,
    pub dim: usize,
    pub out: usize,
    pub decay: f64,
    pub mean: f64,
    pub tokens: usize,
    pub units: usize,
    pub seed: u64,
}

impl std::str::FromStr for SyntheticSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut spec = SyntheticSpec {
            layers: 4,
            group: 1,
            dim: 256,
            out: 0,
            decay: 1.0,
            mean: 0.0,
            tokens: 256,
            units: 64,
            seed: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, found `{part}`"))?;
            let int = || {
                value
                    .parse::<usize>()
                    .map_err(|_| format!("`{key}` expects a non-negative integer, found `{value}`"))
            };
            let float = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("`{key}` expects a number, found `{value}`"))
            };
            match key {
                "layers" => spec.layers = int()?,
                "group" => spec.group = int()?,
                "dim" => spec.dim = int()?,
                "out" => spec.out = int()?,
                "decay" => spec.decay = float()?,
                "mean" => spec.mean = float()?,
                "tokens" => spec.tokens = int()?,
                "units" => spec.units = int()?,
                "seed" => spec.seed = value.parse().map_err(|_| format!("`seed` expects an integer, found `{value}`"))?,
                _ => return Err(format!("unknown key `{key}` (known: layers, group, dim, out, decay, mean, tokens, units, seed)")),
            }
        }
        if spec.out == 0 {
            spec.out = spec.dim;
        }
        for (key, v) in [
            ("layers", spec.layers),
            ("group", spec.group),
            ("dim", spec.dim),
            ("tokens", spec.tokens),
            ("units", spec.units),
        ] {
            if v == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        if spec.decay < 0.0 {
            return Err(format!("`decay` must be >= 0, found {}", spec.decay));
        }
        Ok(spec)
    }
}

impl std::fmt::Display for SyntheticSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self;
        write!(
            f,
            "layers={},group={},dim={},out={},decay={},mean={},tokens={},units={},seed={}",
            s.layers, s.group, s.dim, s.out, s.decay, s.mean, s.tokens, s.units, s.seed
        )
    }
}

/// Generated activations with a known spectrum.
pub struct SyntheticSource {
    spec: SyntheticSpec,
    catalog: Catalog,
    /// Per input: Householder vectors (3 x dim), sqrt of eigenvalues, mean.
    bases: Vec<(Array2<f64>, Array1<f64>, Array1<f64>)>,
}

const SALT_BASIS: u64 = 0xB451;
const SALT_DATA: u64 = 0xDA7A;

impl SyntheticSource {
    /// Builds the catalog and per-input bases.
    pub fn new(spec: SyntheticSpec) -> Result<Self> {
        let (l, g) = (spec.layers, spec.group);
        let layers = (0..l)
            .flat_map(|b| (0..g).map(move |j| (format!("model.layers.{b}.proj{j}"), b, j)))
            .map(|(name, _, _)| (name, spec.dim, spec.out))
            .collect();
        let groups = (0..l).map(|b| (b * g..(b + 1) * g).collect()).collect();
        let catalog = Catalog::new(layers, groups);
        let bases = (0..l).map(|b| Self::basis(&spec, b)).collect();
        Ok(SyntheticSource {
            spec,
            catalog,
            bases,
        })
    }

    fn basis(spec: &SyntheticSpec, input: usize) -> (Array2<f64>, Array1<f64>, Array1<f64>) {
        let d = spec.dim;
        let mut rng = Rng::new(&[spec.seed, SALT_BASIS, input as u64]);
        let mut h = Array2::from_shape_fn((3, d), |_| rng.normal());
        for mut row in h.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row /= norm;
        }
        let decay = Self::decay_of(spec, input);
        let sqrt_lambda = Array1::from_shape_fn(d, |i| ((i + 1) as f64).powf(-decay).sqrt());
        let mean = Array1::from_shape_fn(d, |_| spec.mean * rng.normal());
        (h, sqrt_lambda, mean)
    }

    fn decay_of(spec: &SyntheticSpec, input: usize) -> f64 {
        if spec.layers == 1 {
            spec.decay
        } else {
            spec.decay * (0.5 + input as f64 / (spec.layers - 1) as f64)
        }
    }

    /// The true covariance eigenvalues of `input`, descending.
    pub fn eigenvalues(&self, input: usize) -> Vec<f64> {
        self.bases[input].1.iter().map(|s| s * s).collect()
    }

    /// The true covariance eigenvectors of `input` as columns (`dim x dim`).
    pub fn eigenvectors(&self, input: usize) -> Array2<f64> {
        let d = self.spec.dim;
        let mut q = Array2::<f64>::eye(d);
        for mut col in q.columns_mut() {
            let mut v = col.to_owned();
            self.rotate(input, v.as_slice_mut().expect("owned vector"));
            col.assign(&v);
        }
        q
    }

    /// Applies `Q_l = H1 H2 H3` to a vector in place.
    fn rotate(&self, input: usize, y: &mut [f64]) {
        let h = &self.bases[input].0;
        for r in (0..3).rev() {
            let v = h.row(r);
            let dot: f64 = v.iter().zip(y.iter()).map(|(a, b)| a * b).sum();
            for (yi, vi) in y.iter_mut().zip(v) {
                *yi -= 2.0 * dot * vi;
            }
        }
    }

    /// Rows of unit `unit` for `input` (`tokens x dim`).
    pub fn generate(&self, input: usize, unit: usize) -> Array2<f32> {
        let (d, n) = (self.spec.dim, self.spec.tokens);
        let (_, sqrt_lambda, mean) = &self.bases[input];
        let mut rng = Rng::new(&[self.spec.seed, SALT_DATA, input as u64, unit as u64]);
        let mut out = Array2::<f32>::zeros((n, d));
        let mut y = vec![0.0f64; d];
        // Two uniform values per 64 random bits, each on [-√3, √3).
        let scale = 3f64.sqrt() / (1u64 << 31) as f64;
        for mut row in out.rows_mut() {
            for (pair, lam) in y
                .chunks_mut(2)
                .zip(sqrt_lambda.as_slice().expect("owned").chunks(2))
            {
                let bits = rng.next_u64();
                let halves = [(bits >> 32) as f64, (bits & 0xFFFF_FFFF) as f64];
                for ((yi, l), h) in pair.iter_mut().zip(lam).zip(halves) {
                    *yi = (h - (1u64 << 31) as f64) * scale * l;
                }
            }
            self.rotate(input, &mut y);
            for ((o, yi), m) in row.iter_mut().zip(&y).zip(mean) {
                *o = (yi + m) as f32;
            }
        }
        out
    }

    /// The parsed specification.
    pub fn spec(&self) -> &SyntheticSpec {
        &self.spec
    }
}

impl Source for SyntheticSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn units(&self) -> usize {
        self.spec.units
    }

    fn max_unit_tokens(&self) -> Option<usize> {
        Some(self.spec.tokens)
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        for &unit in units {
            if unit >= self.spec.units {
                return Err(Error::data(format!(
                    "synthetic unit {unit} does not exist ({} units)",
                    self.spec.units
                )));
            }
            for input in (0..self.catalog.inputs.len()).filter(|&i| wanted[i]) {
                let x = self.generate(input, unit);
                sink(input, Rows::Host(x.view()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_rejects() {
        let s: SyntheticSpec = "layers=2,dim=16,tokens=8,units=3,mean=5,seed=9"
            .parse()
            .unwrap();
        assert_eq!(
            (s.layers, s.dim, s.out, s.tokens, s.units, s.seed),
            (2, 16, 16, 8, 3, 9)
        );
        assert!("dim=0".parse::<SyntheticSpec>().is_err());
        assert!("colour=3"
            .parse::<SyntheticSpec>()
            .unwrap_err()
            .contains("unknown key"));
        assert!("dim".parse::<SyntheticSpec>().is_err());
    }

    #[test]
    fn eigenvectors_are_orthonormal_and_units_reproducible() {
        let src = SyntheticSource::new("layers=2,dim=12,tokens=5".parse().unwrap()).unwrap();
        let q = src.eigenvectors(1);
        let e = q.t().dot(&q) - Array2::<f64>::eye(12);
        assert!(e.iter().all(|v| v.abs() < 1e-12));
        assert_eq!(src.generate(1, 3), src.generate(1, 3));
        assert_ne!(src.generate(1, 3), src.generate(1, 4));
    }
}

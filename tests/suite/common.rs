//! Test helpers: writing activation shards, running the binary, reading the adapter back, and
//! float64 references computed here, independently of the code under test.

use eva::rng::Rng;
use ndarray::{concatenate, Array2, Axis};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Activation dtype in a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    F32,
    F16,
    BF16,
}

impl Fmt {
    pub fn dtype(self) -> Dtype {
        match self {
            Fmt::F32 => Dtype::F32,
            Fmt::F16 => Dtype::F16,
            Fmt::BF16 => Dtype::BF16,
        }
    }

    /// Bytes of `x` in this dtype.
    pub fn encode(self, x: &Array2<f32>) -> Vec<u8> {
        match self {
            Fmt::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Fmt::F16 => x
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            Fmt::BF16 => x
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        }
    }

    /// `x` rounded to this dtype and back: what eva reads.
    pub fn round(self, x: &Array2<f32>) -> Array2<f32> {
        match self {
            Fmt::F32 => x.clone(),
            Fmt::F16 => x.mapv(|v| half::f16::from_f32(v).to_f32()),
            Fmt::BF16 => x.mapv(|v| half::bf16::from_f32(v).to_f32()),
        }
    }
}

/// A raw tensor for a shard: name, dtype, shape, bytes.
pub struct Raw {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes one shard file with the given tensors and `out_features` metadata (None = no metadata).
pub fn write_raw(path: &Path, tensors: &[Raw], out_features: Option<&BTreeMap<String, usize>>) {
    let meta = out_features.map(|o| {
        HashMap::from([(
            "out_features".to_string(),
            serde_json::to_string(o).unwrap(),
        )])
    });
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name.clone(), t)), meta).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Writes a shard of layers `(name, rows, out_features)` in `fmt`.
pub fn write_shard(path: &Path, layers: &[(String, Array2<f32>, usize)], fmt: Fmt) {
    let tensors: Vec<Raw> = layers
        .iter()
        .map(|(n, x, _)| Raw {
            name: n.clone(),
            dtype: fmt.dtype(),
            shape: vec![x.nrows(), x.ncols()],
            bytes: fmt.encode(x),
        })
        .collect();
    let outs: BTreeMap<String, usize> = layers.iter().map(|(n, _, o)| (n.clone(), *o)).collect();
    write_raw(path, &tensors, Some(&outs));
}

/// Rows `n x d` with covariance `Q diag(spectrum) Qᵀ` (Q random orthogonal from `seed`) and mean
/// `mean × (fixed normal vector)`; unit `unit` draws its own rows.
pub fn gen_rows(seed: u64, unit: u64, n: usize, spectrum: &[f64], mean: f64) -> Array2<f32> {
    let d = spectrum.len();
    let mut basis_rng = Rng::new(&[seed, 1]);
    let q = eva::linalg::orthonormalize_householder(
        Array2::from_shape_fn((d, d), |_| basis_rng.normal()).view(),
    );
    let mu: Vec<f64> = (0..d).map(|_| mean * basis_rng.normal()).collect();
    let mut rng = Rng::new(&[seed, 2, unit]);
    let z = Array2::from_shape_fn((n, d), |(_, j)| rng.normal() * spectrum[j].sqrt());
    let x = z.dot(&q.t());
    Array2::from_shape_fn((n, d), |(i, j)| (x[(i, j)] + mu[j]) as f32)
}

/// Power-law spectrum `(i+1)^-decay` of length `d`.
pub fn power_law(d: usize, decay: f64) -> Vec<f64> {
    (0..d).map(|i| ((i + 1) as f64).powf(-decay)).collect()
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The repository's root. The test binary may run in a copy of the tree elsewhere (the GPU
/// machine): `EVA_REPO_DIR` names its root there.
pub fn repo() -> PathBuf {
    std::env::var_os("EVA_REPO_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// `tests/reference/`: the fixtures `tests/reference/make_fixtures.py` writes.
pub fn reference_dir() -> PathBuf {
    repo().join("tests/reference")
}

/// The fixture checkpoint of `arch` in `tests/reference/`.
pub fn fixture(arch: &str) -> PathBuf {
    reference_dir().join(arch)
}

/// The fixtures' examples (`tests/reference/data.jsonl`).
pub fn reference_data() -> PathBuf {
    reference_dir().join("data.jsonl")
}

/// A path in the repository as a string that lives as long as the test (for argument arrays).
pub fn repo_str(relative: &str) -> &'static str {
    let path = repo().join(relative).into_os_string();
    Box::leak(path.into_string().expect("a UTF-8 path").into_boxed_str())
}

/// The `eva` binary: `EVA_BIN` where the test binary runs away from its build (the GPU machine),
/// else the one cargo built with this test.
pub fn eva_bin() -> PathBuf {
    std::env::var_os("EVA_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_eva")), PathBuf::from)
}

/// Runs the `eva` binary.
pub fn eva(args: &[&str]) -> Output {
    Command::new(eva_bin())
        .args(args)
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// Runs `eva init` on a directory of shards, expecting success, and returns the output directory.
pub fn init_ok(activations: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "init",
        "--activations",
        activations.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = eva(&args);
    assert!(
        o.status.success(),
        "eva failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The written adapter: tensors by name (f32), tensor shapes, safetensors metadata, config, report.
pub struct Written {
    pub tensors: BTreeMap<String, Array2<f32>>,
    pub metadata: HashMap<String, String>,
    pub config: serde_json::Value,
    pub report: serde_json::Value,
}

pub fn read_adapter(dir: &Path) -> Written {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let shape = view.shape();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(
            name,
            Array2::from_shape_vec((shape[0], shape[1]), values).unwrap(),
        );
    }
    let read_json = |f: &str| serde_json::from_slice(&std::fs::read(dir.join(f)).unwrap()).unwrap();
    Written {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
        config: read_json("adapter_config.json"),
        report: read_json("eva_report.json"),
    }
}

/// Float64 dense PCA of the concatenated rows: covariance eigenvalues (descending) and vectors
/// (columns), computed in the most direct way: center in f64, `XᵀX/(n-1)`, full eigendecomposition.
pub fn dense_pca(units: &[Array2<f32>]) -> (Vec<f64>, Array2<f64>) {
    let views: Vec<_> = units.iter().map(|u| u.view()).collect();
    let x = concatenate(Axis(0), &views).unwrap().mapv(|v| v as f64);
    let mean = x.mean_axis(Axis(0)).unwrap();
    let xc = &x - &mean;
    let c = xc.t().dot(&xc) / (x.nrows() as f64 - 1.0);
    eva::linalg::sym_eig_desc(c.view()).unwrap()
}

/// `‖Uᵀ A_orthᵀ‖_F² / r`: 1 when the rows of `a` (r x d) span the same space as `u` (d x r).
pub fn subspace_similarity(a: &Array2<f32>, u: ndarray::ArrayView2<f64>) -> f64 {
    let a = a.mapv(|v| v as f64);
    let q = eva::linalg::orthonormalize_householder(a.t());
    let m = q.t().dot(&u);
    m.iter().map(|v| v * v).sum::<f64>() / a.nrows() as f64
}

/// PEFT's `_get_rank_distribution`, written out plainly: layer `l` offers `min(caps[l], d)`
/// ratios of its input; the global top `budget` are counted per layer (ties: layer order, then
/// index).
pub fn peft_allocation(layer_ratios: &[Vec<f64>], caps: &[usize], budget: usize) -> Vec<usize> {
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for (l, r) in layer_ratios.iter().enumerate() {
        for (j, &v) in r.iter().take(caps[l]).enumerate() {
            all.push((v, l, j));
        }
    }
    all.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap()
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    let mut counts = vec![0; layer_ratios.len()];
    for &(_, l, _) in all.iter().take(budget) {
        counts[l] += 1;
    }
    counts
}

/// The path of a shard for unit `i`.
pub fn shard(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("unit-{i:05}.safetensors"))
}

/// Asserts that nothing was written next to or at `out`.
pub fn assert_nothing_written(out: &Path) {
    assert!(!out.exists(), "{} should not exist", out.display());
    let parent = out.parent().unwrap();
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(".eva-tmp-"),
                "temporary directory {name} left behind"
            );
        }
    }
}

/// Asserts a refused run: exit `code`, every `needle` in stderr, one `eva: error` line for data
/// errors, no panic, and nothing written at or beside `out`.
pub fn assert_refused(o: &Output, code: i32, needles: &[&str], out: &Path) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "message should mention `{n}`: {err}");
    }
    if code == 1 {
        assert_eq!(
            err.trim_end()
                .lines()
                .filter(|l| l.starts_with("eva: error"))
                .count(),
            1,
            "{err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_nothing_written(out);
}

/// Largest entry difference allowed between adapters that should be equal (after aligning each
/// row's sign): float64 sums in another order, then one f32 rounding of A.
pub const MAX_DELTA_A: f32 = 1e-6;

/// Asserts that two written adapters hold the same ranks, steps and A matrices.
pub fn assert_same_written(wa: &Written, wb: &Written) {
    assert_eq!(wa.report["steps"], wb.report["steps"], "steps differ");
    let ranks = |w: &Written| {
        w.report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["rank"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ranks(wa), ranks(wb), "ranks differ");
    assert_eq!(wa.config["rank_pattern"], wb.config["rank_pattern"]);
    assert_eq!(
        wa.tensors.keys().collect::<Vec<_>>(),
        wb.tensors.keys().collect::<Vec<_>>()
    );
    for (name, ta) in &wa.tensors {
        let tb = &wb.tensors[name];
        assert_eq!(ta.dim(), tb.dim(), "{name}");
        for (ra, rb) in ta.rows().into_iter().zip(tb.rows()) {
            let sign = if ra.dot(&rb) < 0.0 { -1.0 } else { 1.0 };
            let delta = ra
                .iter()
                .zip(rb.iter())
                .map(|(x, y)| (x - sign * y).abs())
                .fold(0.0f32, f32::max);
            assert!(delta <= MAX_DELTA_A, "{name}: max |ΔA| = {delta}");
        }
    }
}

/// `mpirun -np NP eva ARGS` with the environment OpenMPI needs as root in a container.
#[cfg(feature = "mpi")]
pub fn mpirun(np: usize, args: &[&str]) -> Command {
    mpirun_program(np, &eva_bin(), args)
}

/// `mpirun -np NP PROGRAM ARGS`, as [`mpirun`] runs eva.
#[cfg(feature = "mpi")]
pub fn mpirun_program(np: usize, program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string()])
        .arg(program)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OPENBLAS_NUM_THREADS", "1");
    c
}

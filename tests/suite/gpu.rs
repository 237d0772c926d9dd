//! GPU tests. On the emulated device (feature `cuda-emu`: the same backend, kernels and host code,
//! run on the CPU) they run with every `cargo test --features cuda-emu`, as CI does. With feature
//! `cuda` they are `#[ignore]`d: run them with `cargo test --features cuda -- --ignored gpu::` on a
//! machine with an NVIDIA GPU, as scripts/gpu-check.sh does. Each one opens the GPU first and
//! **fails** when it cannot: none returns early, so a run without a GPU is red, never green.
//!
//! | test | against |
//! |---|---|
//! | `forward_f32_matches_the_cpu_on_<arch>` | the CPU backend's layer inputs, `--dtype f32`: max error ≤ [`F32_TOL`] of the tensor's largest value |
//! | `forward_bf16_is_close_to_the_cpu_on_<arch>` | the same, bf16 weights: ≤ [`BF16_TOL`] |
//! | `attention_matches_the_cpu_backend` | `Cpu::attention`: packed sequences, GQA, causal with windows of none, 0 (no key), 1 and 7, bidirectional, soft-capping, head_dim 16 and 128 |
//! | `shape_mismatches_in_embed_and_norms_are_errors_on_both_backends` | the CPU backend: the same wrong shapes fail there too |
//! | `exact_gram_matches_the_cpu_f64_gram` | `stats::exact::ExactStats` (f32 products over 4096 rows, f64 sums) |
//! | `sketch_products_match_f64` | `Xᵀ(X T)` in f64 on the host |
//! | `device_input_stats_match_the_cpu` | `stats::InputStats` on the host: packed shared parts (exact with and without the Gram, sketch), `G·Q`, the packed Gram, `to_host`/`to_device` |
//! | `init_f32_matches_pytorch_pca::<arch>` | a float64 PCA of PyTorch's layer inputs, as the CPU's adapter (qwen3, gemma3_text, gemma3, phi3, mixtral, qwen2_moe, qwen3_moe; MoE experts per expert): similarity ≥ 0.9999 |
//! | `whole_adapter_matches_the_cpu` | `eva init --device cpu` on examples/tiny-llama: same ranks, subspace similarity ≥ 0.9999 per layer (`--dtype f32`) |
//! | `nonfinite_activations_fail_the_run_as_on_the_cpu` | `eva init --device cpu` on a tiny Llama whose block 0 overflows to infinity, or whose activations' squares overflow f32: the same error line, exit 1, nothing written |

use super::common::{eva_bin, fixture, repo};
use eva::config::validate::DType;
use eva::device::backend::Backend;
use eva::device::cpu::Cpu;
use eva::device::cuda::Cuda;
use eva::device::gpu::{CudaOptions, DeviceBuffer, Gpu, GramAccumulator, SketchAccumulator};
use eva::model::{Model, Need, Point};
use ndarray::Array2;

/// An environment variable a test cannot run without (it fails, naming it).
fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("set {name} (see scripts/gpu-check.sh)"))
}

fn dtype_of(s: &str) -> DType {
    match s {
        "f32" => DType::F32,
        "bf16" => DType::Bf16,
        _ => panic!("dtype must be f32 or bf16, found {s}"),
    }
}

/// `--dtype f32`: the GPU follows the CPU op by op in f32 with f64 norm statistics; what differs
/// is summation order (cuBLAS's blocking, the attention's online softmax in tiles of 32 keys,
/// tree reductions), a few ulps per op. Errors are measured as `max |gpu - cpu| / max |cpu|` per
/// captured tensor (an element-wise relative error is meaningless where a value is near 0).
const F32_TOL: f32 = 1e-4;

/// `--dtype bf16`: every weight matrix and every linear layer's input is rounded to bf16
/// (relative error ≤ 2⁻⁹ each), so one product is off by up to ~2⁻⁸ ≈ 3.9e-3 of its inputs'
/// scale before f32 accumulation; the fixtures' two blocks chain up to six products on the path
/// to the last capture (q/k/v, o, gate/up, down, then the next block's), and errors add:
/// 6 × 3.9e-3 ≈ 2.3e-2, rounded up to 3e-2. Anything near 1e-1 would be a bug, not rounding.
const BF16_TOL: f32 = 3e-2;

fn open(dtype: DType) -> Cuda {
    Cuda::open(CudaOptions {
        ordinal: 0,
        dtype,
        slice: "the test model".into(),
    })
    .unwrap_or_else(|e| panic!("this GPU test needs a GPU: {e}"))
}

/// Deterministic token ids (an LCG) for sequences of the given lengths, avoiding 0..4 (special
/// and padding ids in the fixtures).
fn token_ids(vocab: usize, lengths: &[usize], seed: u64) -> Vec<Vec<u32>> {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (4 + (state >> 33) % (vocab as u64 - 4)) as u32
    };
    lengths
        .iter()
        .map(|&n| (0..n).map(|_| next()).collect())
        .collect()
}

/// Every capture point of every block, as host matrices keyed by (layer, point), for the given
/// backend.
fn captures<B: Backend>(
    be: &B,
    model: &mut Model,
    lengths: &[usize],
    seed: u64,
    to_host: impl Fn(&B, &B::Tensor) -> Array2<f32>,
) -> Vec<((usize, Point), Array2<f32>)> {
    let ids = token_ids(model.config.vocab, lengths, seed);
    let types: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n]).collect();
    let batch = model.batch(ids.iter().zip(&types).map(|(a, b)| (&a[..], &b[..])));
    let loaded = model.load(be, 0..model.layers()).unwrap();
    let mut need = Need::new(model.layers());
    for m in model.modules() {
        need.set(m.layer, m.point);
    }
    let mut out = Vec::new();
    loaded
        .forward(be, &batch, &need, None, false, &mut |layer, point, x, _| {
            out.push(((layer, point), to_host(be, x)));
            Ok(())
        })
        .unwrap();
    out
}

/// Runs `arch` on the CPU and on the GPU with `dtype` and asserts the per-tensor error bound.
fn forward_parity(arch: &str, dtype: DType, tol: f32) {
    let gpu = open(dtype);
    let mut model = Model::open(&fixture(arch)).unwrap();
    // One sequence longer than several of the attention kernel's tiles of 32 queries and keys
    // (decoders: and Mistral's window of 8), short ones, and a single token; encoders are capped by their
    // learned positions.
    let lengths: Vec<usize> = match model.config.max_positions() {
        Some(m) => vec![m, m / 2 + 1, 3, 1],
        None => vec![300, 13, 5, 1],
    };
    let want = captures(&Cpu, &mut model, &lengths, 7, |be, x| {
        be.host_view(x).unwrap().to_owned()
    });
    let got = captures(&gpu, &mut model, &lengths, 7, |be, x| {
        be.to_host(x).unwrap()
    });
    gpu.check().unwrap();
    assert_eq!(
        want.len(),
        got.len(),
        "{arch}: different numbers of captures"
    );
    let points: std::collections::BTreeSet<(usize, Point)> =
        model.modules().iter().map(|m| (m.layer, m.point)).collect();
    assert_eq!(
        want.len(),
        points.len(),
        "{arch}: every point of every block (every expert routed some of the tokens)"
    );
    for ((key, w), (gkey, g)) in want.iter().zip(&got) {
        assert_eq!(key, gkey);
        assert_eq!(w.dim(), g.dim(), "{arch} {key:?}: shapes");
        let scale = w
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let err = w
            .iter()
            .zip(g)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err.is_finite() && err <= tol, "{arch} {dtype:?} {key:?}: max error {err:e} of max |cpu| {scale:e} (tolerance {tol:e})");
        eprintln!("{arch} {dtype:?} {key:?}: max error {err:.2e} of max |cpu|");
    }
}

macro_rules! forward_tests {
    ($($arch:ident),*) => {
        $(
            mod $arch {
                #[test]
                #[cfg_attr(feature = "cuda", ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)")]
                fn forward_f32_matches_the_cpu() {
                    super::forward_parity(stringify!($arch), eva::config::validate::DType::F32, super::F32_TOL);
                }

                #[test]
                #[cfg_attr(feature = "cuda", ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)")]
                fn forward_bf16_is_close_to_the_cpu() {
                    super::forward_parity(stringify!($arch), eva::config::validate::DType::Bf16, super::BF16_TOL);
                }
            }
        )*
    };
}

forward_tests!(
    llama,
    mistral,
    qwen2,
    qwen3,
    gemma3_text,
    gemma3,
    phi3,
    bert,
    roberta
);

/// Mixture-of-experts blocks on the GPU (router logits from cuBLAS, routing on the host, the
/// routed rows gathered and the experts' outputs added back by `scatter_add_rows`): every
/// expert's routed rows and hidden activations match the CPU's in f32. (In bf16 a token whose
/// top-k experts nearly tie may route differently, so the rows would not line up.)
macro_rules! moe_forward_tests {
    ($($arch:ident),*) => {
        $(
            mod $arch {
                #[test]
                #[cfg_attr(feature = "cuda", ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)")]
                fn forward_f32_matches_the_cpu() {
                    super::forward_parity(stringify!($arch), eva::config::validate::DType::F32, super::F32_TOL);
                }
            }
        )*
    };
}

moe_forward_tests!(mixtral, qwen2_moe, qwen3_moe);

/// `eva init --device cuda --dtype f32` on the fixtures of the 2026 families and the mixtures of
/// experts, the whole run (forward, routed expert rows gathered on the device, device statistics,
/// the leader): the components are a float64 PCA of PyTorch's own activations to similarity
/// ≥ 0.9999 per layer and per expert, as the CPU's are (`model::init_<arch>_matches_pytorch_pca`).
macro_rules! init_tests {
    ($($arch:ident: $task:expr),* $(,)?) => {
        mod init_f32_matches_pytorch_pca {
            $(
                #[test]
                #[cfg_attr(feature = "cuda", ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)")]
                fn $arch() {
                    let _gpu = super::open(eva::config::validate::DType::F32);
                    super::super::model::init_matches_pytorch_pca(
                        stringify!($arch),
                        $task,
                        &["--device", "cuda", "--dtype", "f32"],
                    );
                }
            )*
        }
    };
}

init_tests!(
    qwen3: Some("CAUSAL_LM"),
    gemma3_text: Some("CAUSAL_LM"),
    gemma3: None,
    phi3: Some("CAUSAL_LM"),
    mixtral: Some("CAUSAL_LM"),
    qwen2_moe: Some("CAUSAL_LM"),
    qwen3_moe: Some("CAUSAL_LM"),
);

/// The tiled attention kernel through the backend against the CPU backend's attention, on the
/// same inputs: both softmax in f32 over the same keys, in different orders (the CPU per row, the
/// kernel online over tiles of up to 32 keys), so they agree to a few f32 ulps of the values
/// (standard normal, |v| < 6): 1e-5 absolutely. A window of 0 keeps no key: exactly 0 on both.
#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn attention_matches_the_cpu_backend() {
    use eva::device::backend::{AttentionMask, Heads, Segments};
    let gpu = open(DType::F32);
    let segments = Segments::from_lengths([45, 0, 1, 20]);
    let tokens = segments.tokens();
    let mut rng = eva::rng::Rng::new(&[25]);
    let mut matrix = |c: usize| Array2::from_shape_fn((tokens, c), |_| rng.normal() as f32);
    for (heads, kv_heads, head_dim, softcap) in [(4, 2, 16, None), (2, 1, 128, Some(2.0f32))] {
        let h = Heads {
            softcap,
            ..Heads::new(heads, kv_heads, head_dim)
        };
        let (q, k, v) = (
            matrix(heads * head_dim),
            matrix(kv_heads * head_dim),
            matrix(kv_heads * head_dim),
        );
        let (dq, dk, dv) = (
            gpu.to_device(&q).unwrap(),
            gpu.to_device(&k).unwrap(),
            gpu.to_device(&v).unwrap(),
        );
        for mask in [
            AttentionMask::Bidirectional,
            AttentionMask::Causal { window: None },
            AttentionMask::Causal { window: Some(0) },
            AttentionMask::Causal { window: Some(1) },
            AttentionMask::Causal { window: Some(7) },
        ] {
            let want = Cpu.attention(&q, &k, &v, h, &segments, mask);
            let got = gpu
                .to_host(&gpu.attention(&dq, &dk, &dv, h, &segments, mask))
                .unwrap();
            assert_eq!(want.dim(), got.dim());
            let err = want
                .iter()
                .zip(&got)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5,
                "head_dim {head_dim} {mask:?}: max error {err:e}"
            );
            if mask == (AttentionMask::Causal { window: Some(0) }) {
                assert!(
                    want.iter().chain(&got).all(|&x| x == 0.0),
                    "{mask:?}: no key, output 0"
                );
            }
        }
    }
}

/// A checkpoint tensor of f32 `values` (anonymous memory, as if mapped from a file).
fn host_tensor(name: &str, shape: &[usize], values: &[f32]) -> eva::device::host::HostTensor {
    let mut m = memmap2::MmapMut::map_anon(values.len() * 4).unwrap();
    for (c, v) in m.chunks_exact_mut(4).zip(values) {
        c.copy_from_slice(&v.to_le_bytes());
    }
    eva::device::host::HostTensor {
        name: name.into(),
        dtype: safetensors::Dtype::F32,
        shape: shape.to_vec(),
        map: std::sync::Arc::new(m.make_read_only().unwrap()),
        range: 0..values.len() * 4,
        file: 0,
    }
}

/// An embedding table narrower than the activation, fewer ids than rows, and norm weights or
/// biases of the wrong length: the GPU kernels would read past them; instead the GPU returns
/// (embed) or records (norms) an error naming the shapes, and the CPU returns or panics with it.
#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn shape_mismatches_in_embed_and_norms_are_errors_on_both_backends() {
    let table = host_tensor("embed", &[10, 3], &[0.5; 30]);
    let short = host_tensor("norm.weight", &[3], &[1.0; 3]);
    let good = host_tensor("norm.bias", &[4], &[0.0; 4]);
    let x = Array2::<f32>::ones((2, 4));
    let want = "expected one id per row and rows of 4 values";
    for ids in [&[1u32, 2][..], &[1][..]] {
        let t = if ids.len() == 2 {
            table.clone()
        } else {
            host_tensor("embed", &[10, 4], &[0.5; 40])
        };
        let e = Cpu
            .embed(
                &mut x.clone(),
                &Cpu.weight(&t).unwrap(),
                ids,
                "embed_tokens",
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("embed_tokens") && e.contains(want), "{e}");
        let gpu = open(DType::F32);
        let mut dx = gpu.to_device(&x).unwrap();
        let e = gpu
            .embed(&mut dx, &gpu.weight(&t).unwrap(), ids, "embed_tokens")
            .unwrap_err()
            .to_string();
        assert!(e.contains("embed_tokens") && e.contains(want), "{e}");
    }
    let (w, b) = (Cpu.weight(&short).unwrap(), Cpu.weight(&good).unwrap());
    for (op, norm) in [
        (
            "rms_norm",
            Box::new(|| drop(Cpu.rms_norm(&x, &w, 1e-5))) as Box<dyn Fn()>,
        ),
        (
            "layer_norm",
            Box::new(|| drop(Cpu.layer_norm(&x, &w, &b, 1e-5))),
        ),
    ] {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(norm)).unwrap_err();
        let e = e.downcast_ref::<String>().expect("a formatted panic");
        assert!(
            e.starts_with(op) && e.contains("the weight has shape [3], the activation 4 features"),
            "{e}"
        );
    }
    for op in ["rms_norm", "layer_norm", "add_layer_norm"] {
        let gpu = open(DType::F32);
        let (w, b, dx) = (
            gpu.weight(&short).unwrap(),
            gpu.weight(&good).unwrap(),
            gpu.to_device(&x).unwrap(),
        );
        let _ = match op {
            "rms_norm" => gpu.rms_norm(&dx, &w, 1e-5),
            "layer_norm" => gpu.layer_norm(&dx, &b, &w, 1e-5),
            _ => gpu.add_layer_norm(gpu.to_device(&x).unwrap(), &dx, &w, &b, 1e-5),
        };
        let e = gpu.check().unwrap_err().to_string();
        let what = if op == "layer_norm" { "bias" } else { "weight" };
        assert!(
            e.contains(&format!(
                "the {what} has shape [3], the activation 4 features"
            )),
            "{op}: {e}"
        );
    }
}

/// Rows with a large mean and a decaying spectrum, the case the shift exists for.
fn rows(n: usize, d: usize, seed: u64) -> Array2<f32> {
    let spectrum: Vec<f64> = (0..d).map(|i| 1.0 / (1.0 + i as f64)).collect();
    super::common::gen_rows(seed, 0, n, &spectrum, 3.0)
}

#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn exact_gram_matches_the_cpu_f64_gram() {
    let gpu = open(DType::F32);
    let d = 96;
    // 9000 rows in batches of 2500: flushes inside and across batches, and a pending remainder.
    let x = rows(9000, d, 3);
    let reference: Vec<f32> = x.row(0).to_vec();
    let mut cpu = eva::stats::exact::ExactStats::new(reference.clone());
    let mut ws = eva::stats::Workspace::default();
    // f32: both sides sum at most 4096 f32 products per entry before f64 (typical error
    // √4096·2⁻²⁴ ≈ 4e-6 each); bf16: the shifted rows are rounded to 2⁻⁹.
    for (f32_in, tol) in [(DType::F32, 2e-5), (DType::Bf16, 1e-2)] {
        let mut dev = eva::device::cuda::DeviceGram::new(
            &gpu,
            &reference,
            f32_in,
            eva::device::cuda::gram::FLUSH_ROWS,
        )
        .unwrap();
        for start in (0..9000).step_by(2500) {
            let part = x
                .slice(ndarray::s![start..(start + 2500).min(9000), ..])
                .to_owned();
            dev.accumulate(&gpu, &gpu.to_device(&part).unwrap())
                .unwrap();
            if f32_in == DType::F32 {
                cpu.accumulate(part.view(), &mut ws).unwrap();
            }
        }
        let (moments, gram) = dev.snapshot(&gpu).unwrap();
        assert_eq!(moments.n, 9000);
        let g = cpu.gram();
        let scale = (0..d).map(|i| g[i * d + i]).fold(0.0f64, f64::max);
        // cuBLAS computes the (i, j) and (j, i) entries in different tiles, and a split-K
        // schedule may sum their products in different orders: the Gram is symmetric up to
        // the f32 rounding of those sums (the f32 bound above, whatever the input type: bf16
        // inputs change the products, not how they are summed), not bit for bit.
        let (mut err, mut asym) = (0.0f64, 0.0f64);
        for i in 0..d {
            for j in i..d {
                err = err.max((gram[i * d + j] - g[i * d + j]).abs());
                asym = asym.max((gram[i * d + j] - gram[j * d + i]).abs());
            }
        }
        assert!(
            asym / scale <= 2e-5,
            "{f32_in:?} Gram: asymmetry {:e} of the largest diagonal entry",
            asym / scale
        );
        assert!(
            err / scale <= tol,
            "{f32_in:?} Gram: max error {:e} of the largest diagonal entry (tolerance {tol:e})",
            err / scale
        );
        let sum_err = moments
            .sum
            .iter()
            .zip(&cpu.moments.sum)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let sum_scale = cpu.moments.sum_sq.iter().sum::<f64>().sqrt() * (9000f64).sqrt();
        assert!(
            sum_err <= tol * sum_scale,
            "{f32_in:?} feature sums: error {sum_err:e}"
        );
        eprintln!(
            "{f32_in:?} Gram: max error {:.2e} of max diagonal; sums {sum_err:.2e}",
            err / scale
        );
    }
}

#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn sketch_products_match_f64() {
    let gpu = open(DType::F32);
    let (n, d, m) = (5000, 80, 24);
    let x = rows(n, d, 5);
    let reference: Vec<f32> = x.row(0).to_vec();
    let test = Array2::from_shape_fn((d, m), |(i, j)| {
        (((i * 31 + j * 17) % 13) as f32 - 6.0) / 6.0
    });
    let mut dev =
        eva::device::cuda::DeviceSketch::new(&gpu, &reference, test.as_slice().unwrap(), 4096)
            .unwrap();
    dev.accumulate(&gpu, &gpu.to_device(&x).unwrap()).unwrap();
    let (moments, y) = dev.snapshot(&gpu).unwrap();
    assert_eq!(moments.n, n as u64);
    let c = ndarray::Array1::from(reference).mapv(f64::from);
    let xs = x.mapv(f64::from) - &c;
    let want = xs.t().dot(&xs.dot(&test.mapv(f64::from)));
    let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let err = want
        .iter()
        .zip(&y)
        .fold(0.0f64, |a, (w, g)| a.max((w - g).abs()))
        / scale;
    assert!(err <= 1e-5, "sketch: max error {err:e} of max |Y|");
}

/// For scripts/gpu_parity.py: runs `EVA_PARITY_MODEL` on the GPU with `EVA_PARITY_DTYPE` over
/// sequences of `EVA_PARITY_LENGTHS` (comma-separated) and writes every block's layer inputs,
/// named by the module that reads them (the first of its equal-input group), with the token ids
/// and lengths, to the safetensors file `EVA_PARITY_OUT`. The script runs PyTorch on the same ids
/// and compares.
#[test]
#[ignore = "needs an NVIDIA GPU and EVA_PARITY_* (scripts/gpu-check.sh)"]
fn dump_layer_inputs_for_gpu_parity_py() {
    let gpu = open(dtype_of(&env("EVA_PARITY_DTYPE")));
    let mut model = Model::open(std::path::Path::new(&env("EVA_PARITY_MODEL"))).unwrap();
    let lengths: Vec<usize> = env("EVA_PARITY_LENGTHS")
        .split(',')
        .map(|v| v.trim().parse().unwrap())
        .collect();
    let ids = token_ids(model.config.vocab, &lengths, 11);
    let got = captures(&gpu, &mut model, &lengths, 11, |be, x| {
        be.to_host(x).unwrap()
    });
    gpu.check().unwrap();
    let name_of = |layer: usize, point: Point| {
        model
            .modules()
            .iter()
            .find(|m| m.layer == layer && m.point == point)
            .expect("a module at every point")
            .name
            .clone()
    };
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for ((layer, point), x) in &got {
        tensors.push((
            name_of(*layer, *point),
            safetensors::Dtype::F32,
            vec![x.nrows(), x.ncols()],
            x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let flat: Vec<u8> = ids
        .iter()
        .flatten()
        .flat_map(|&v| (v as i64).to_le_bytes())
        .collect();
    tensors.push((
        "input_ids".into(),
        safetensors::Dtype::I64,
        vec![1, ids.iter().map(Vec::len).sum()],
        flat,
    ));
    tensors.push((
        "lengths".into(),
        safetensors::Dtype::I64,
        vec![1, lengths.len()],
        lengths
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect(),
    ));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, std::path::Path::new(&env("EVA_PARITY_OUT")))
        .unwrap();
    eprintln!(
        "wrote {} layer inputs of {} ({})",
        got.len(),
        env("EVA_PARITY_MODEL"),
        gpu.describe()
    );
}

/// For scripts/gpu_parity.py: forward tokens/s of `EVA_BENCH_MODEL` on the GPU with
/// `EVA_BENCH_DTYPE`, `EVA_BENCH_SEQS` sequences of `EVA_BENCH_LEN` tokens packed in one pass,
/// through every block (the last block's MLP input is the last capture; nothing is copied to the
/// host). Prints `EVA_BENCH tokens_per_s=<v> seconds_per_pass=<v>` after a synchronize per pass.
#[test]
#[ignore = "needs an NVIDIA GPU and EVA_BENCH_* (scripts/gpu-check.sh)"]
fn bench_forward_tokens_per_second() {
    let gpu = open(dtype_of(&env("EVA_BENCH_DTYPE")));
    let mut model = Model::open(std::path::Path::new(&env("EVA_BENCH_MODEL"))).unwrap();
    let (seqs, len): (usize, usize) = (
        env("EVA_BENCH_SEQS").parse().unwrap(),
        env("EVA_BENCH_LEN").parse().unwrap(),
    );
    let lengths = vec![len; seqs];
    let ids = token_ids(model.config.vocab, &lengths, 13);
    let types: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n]).collect();
    let batch = model.batch(ids.iter().zip(&types).map(|(a, b)| (&a[..], &b[..])));
    let loaded = model.load(&gpu, 0..model.layers()).unwrap();
    let mut need = Need::new(model.layers());
    need.set(model.layers() - 1, Point::MlpHidden);
    let run = || {
        loaded
            .forward(&gpu, &batch, &need, None, false, &mut |_, _, _, _| Ok(()))
            .unwrap();
        gpu.synchronize().unwrap();
    };
    run();
    run();
    let passes = 10;
    let t = std::time::Instant::now();
    for _ in 0..passes {
        run();
    }
    let s = t.elapsed().as_secs_f64() / passes as f64;
    println!(
        "EVA_BENCH tokens_per_s={:.1} seconds_per_pass={s:.6} device=\"{}\"",
        (seqs * len) as f64 / s,
        gpu.describe()
    );
}

/// The statistics the engine keeps with `--device cuda` (`InputStats::Device`) against the host
/// ones on the same rows, through the engine's own calls: the packed shared part (what the fused
/// all-reduce sums), `G·Q` (the remote products) and the packed Gram, and the copies both ways.
/// Bounds: the f32 products of at most 4096 rows before each f64 flush on both sides (different
/// summation orders), `2e-5` of the largest diagonal entry; sums and sketches `1e-5`.
#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn device_input_stats_match_the_cpu() {
    use eva::device::rows::Rows;
    use eva::stats::{Estimator, InputStats, Packed, Shared, Workspace};
    let gpu = std::sync::Arc::new(open(DType::F32));
    let d = 72;
    let x = rows(7000, d, 9);
    let reference: Vec<f32> = x.row(0).to_vec();
    let sketch = Estimator::Sketch {
        k: 20,
        seed: 3,
        stream: 4,
    };
    for (estimator, replicas) in [(Estimator::Exact, 1), (Estimator::Exact, 2), (sketch, 1)] {
        let mut host = InputStats::new(reference.clone(), estimator, None).unwrap();
        let mut dev = InputStats::new(reference.clone(), estimator, Some(&gpu)).unwrap();
        let mut ws = Workspace::default();
        // Captures of uneven sizes, as passes deliver them; the device ones stay on the GPU.
        for r in [0..1500, 1500..1501, 1501..6000, 6000..7000] {
            let part = x.slice(ndarray::s![r, ..]).to_owned();
            host.accumulate(Rows::Host(part.view()), &mut ws).unwrap();
            let t = gpu.to_device(&part).unwrap();
            dev.accumulate(Rows::Device { gpu: &gpu, x: &t }, &mut ws)
                .unwrap();
        }
        // The device always shares a small Gram (that is how the host leader gets it); pack the
        // host one with the Gram too where the device does, to compare the same layout.
        let shared_dev: Shared = dev.empty_shared(replicas);
        let shared_host = if shared_dev.gram.is_some() {
            host.empty_shared(2)
        } else {
            host.empty_shared(replicas)
        };
        let want = Packed::of(&mut [(&mut host, &shared_host)])
            .unwrap()
            .into_host()
            .unwrap();
        let got = Packed::of(&mut [(&mut dev, &shared_dev)])
            .unwrap()
            .into_host()
            .unwrap();
        assert_eq!(want.len(), got.len(), "{estimator:?}: packed lengths");
        assert_eq!(want[0], got[0], "{estimator:?}: token counts");
        let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let err = want
            .iter()
            .zip(&got)
            .fold(0.0f64, |a, (w, g)| a.max((w - g).abs()))
            / scale;
        assert!(
            err <= 2e-5,
            "{estimator:?}: packed shared part, max error {err:e} of max |value|"
        );
        eprintln!("{estimator:?} replicas {replicas}: packed part max error {err:.2e}");
        let back = dev.to_host().unwrap();
        assert_eq!(back.name(), host.name());
        let again = back.to_device(&gpu).unwrap().to_host().unwrap();
        if estimator == Estimator::Exact {
            let (h, b, a) = (
                host.host_gram().unwrap(),
                back.host_gram().unwrap(),
                again.host_gram().unwrap(),
            );
            let diag = (0..d).map(|i| h[i * d + i]).fold(0.0f64, f64::max);
            for i in 0..d {
                for j in i..d {
                    let e = (h[i * d + j] - b[i * d + j]).abs() / diag;
                    assert!(e <= 2e-5, "to_host Gram ({i}, {j}): {e:e}");
                    assert_eq!(
                        b[i * d + j],
                        a[i * d + j],
                        "to_device then to_host is exact"
                    );
                }
            }
            // G·Q on the device (cuBLAS dsymm) against the host's (dsymm on the same upper
            // triangle): both from the device's f64 sums, so only the products' order differs.
            let q = Array2::from_shape_fn((d, 5), |(i, j)| ((i * 7 + j * 3) % 11) as f64 - 5.0);
            let InputStats::Device(dx) = &dev else {
                panic!("device statistics")
            };
            let z = dx.gram_apply(q.view()).unwrap().to_host().unwrap();
            let InputStats::Exact(be) = &back else {
                panic!("host statistics")
            };
            let zh = be.gram_apply(q.view()).unwrap();
            let zs = zh.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let ze = zh
                .iter()
                .zip(&z)
                .fold(0.0f64, |a, (w, g)| a.max((w - g).abs()))
                / zs;
            assert!(ze <= 1e-12, "device G·Q against the host's: {ze:e}");
            let packed = dx.packed_gram().unwrap().to_host().unwrap();
            let mut want = Vec::new();
            eva::stats::exact::pack_upper(b, d, &mut want);
            assert_eq!(
                packed, want,
                "the packed Gram is the host's pack_upper of the same sums"
            );
        }
    }
}

/// The whole run: `eva init --device cuda --dtype f32` (forward, device statistics, the fused
/// all-reduce, the leader on the host) against `--device cpu` on examples/tiny-llama with every
/// example read (`--no-early-stop`, so both read the same data): the same rank per layer, and each
/// layer's `lora_A` rows span the CPU's subspace to similarity ≥ 0.9999.
#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn whole_adapter_matches_the_cpu() {
    let _gpu = open(DType::F32);
    let root = repo();
    let tmp = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        let out = tmp.path().join(device);
        let mut args = vec![
            "init".to_string(),
            "--model".into(),
            root.join("examples/tiny-llama").display().to_string(),
            "--data".into(),
            root.join("examples/data/train.txt").display().to_string(),
            "--no-early-stop".into(),
            "--device".into(),
            device.into(),
            "--out".into(),
            out.display().to_string(),
        ];
        if device == "cuda" {
            args.extend(["--dtype".into(), "f32".into()]);
        }
        let o = std::process::Command::new(eva_bin())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "eva init --device {device}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        super::common::read_adapter(&out)
    };
    let (cpu, gpu) = (run("cpu"), run("cuda"));
    let names: Vec<&String> = cpu
        .tensors
        .keys()
        .filter(|n| n.contains("lora_A"))
        .collect();
    assert!(!names.is_empty());
    let mut worst = 1.0f64;
    for name in names {
        let (a, b) = (&cpu.tensors[name], &gpu.tensors[name]);
        assert_eq!(a.dim(), b.dim(), "{name}: ranks differ");
        let u = eva::linalg::orthonormalize_householder(a.mapv(f64::from).t());
        let sim = super::common::subspace_similarity(b, u.view());
        worst = worst.min(sim);
        assert!(
            sim >= 0.9999,
            "{name}: subspace similarity {sim:.6} < 0.9999"
        );
    }
    eprintln!(
        "whole adapter: worst subspace similarity {worst:.6}; times on the GPU {} (CPU {})",
        gpu.report["time_s"], cpu.report["time_s"]
    );
}

/// examples/tiny-llama with block 0's gate and up weights scaled by `2^shift` (exactly, by their
/// bf16 exponents; finite, so the load accepts them). At 100, `silu(gate)·up` overflows, so the
/// input of block 0's `down_proj` holds infinities on both backends from the first example on; at
/// 55 it stays finite (~1e33) but its squares overflow f32.
fn overflowing_tiny_llama(dir: &std::path::Path, shift: u16) {
    let src = repo().join("examples/tiny-llama");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<super::common::Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let mut data = t.data().to_vec();
            if name.starts_with("model.layers.0.mlp.") && !name.contains("down_proj") {
                assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
                for b in data.chunks_exact_mut(2) {
                    let v = u16::from_le_bytes([b[0], b[1]]);
                    let exponent = (v >> 7) & 0xff;
                    if exponent != 0 {
                        assert!(exponent + shift < 0xff, "{name}: {v:#x} would overflow");
                        b.copy_from_slice(&(v + (shift << 7)).to_le_bytes());
                    }
                }
            }
            super::common::Raw {
                name,
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                bytes: data,
            }
        })
        .collect();
    super::common::write_raw(&dir.join("model.safetensors"), &tensors, None);
}

/// A non-finite activation on the GPU is found by the queued check (no download per capture),
/// and a finite one whose square overflows f32 by the step's solve; either fails the run as on
/// the CPU: exit 1, the CPU's message word for word (the same capture, token, feature and value;
/// the same feature and token count), nothing written.
#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "needs an NVIDIA GPU (scripts/gpu-check.sh)"
)]
fn nonfinite_activations_fail_the_run_as_on_the_cpu() {
    let _gpu = open(DType::F32);
    let tmp = tempfile::tempdir().unwrap();
    let data = repo().join("examples/data/train.txt");
    for (shift, what) in [
        (100, "non-finite activation"),
        (55, "the squares of its activations overflow f32"),
    ] {
        let model = tmp.path().join(format!("model-{shift}"));
        overflowing_tiny_llama(&model, shift);
        let run = |device: &[&str]| {
            let out = tmp.path().join(format!("{}-{shift}", device[1]));
            let o = std::process::Command::new(eva_bin())
                .args(["init", "--model"])
                .arg(&model)
                .arg("--data")
                .arg(&data)
                .args(device)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap();
            super::common::assert_refused(
                &o,
                1,
                &["input of model.layers.0.mlp.down_proj", what],
                &out,
            );
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            err.lines()
                .find(|l| l.starts_with("eva: error"))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            run(&["--device", "cuda", "--dtype", "f32"]),
            run(&["--device", "cpu"]),
            "2^{shift}"
        );
    }
}

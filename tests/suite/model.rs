//! `--model DIR --data FILE` against PyTorch: the tiny random checkpoints and the layer inputs
//! transformers computed for them (`tests/reference/make_fixtures.py`), tokenization, label
//! masking, equal-input groups, the adapter eva writes from them, and one test per bad input.

use super::common::*;
use eva::model::text::{read_examples, TextEncoder};
use eva::source::model::{ModelOptions, ModelSource};
use eva::source::Source;
use ndarray::{concatenate, Array2, Axis};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Per-element tolerance against PyTorch, `|eva - torch| ≤ ATOL + RTOL·|torch|`. Both compute
/// in f32 from the same (upcast) weights; they differ only in summation order (BLAS blocking,
/// f64 norm statistics here), so errors stay at a few ulps of the values times the depth.
const ATOL: f32 = 1e-5;
/// See [`ATOL`].
const RTOL: f32 = 1e-4;

pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

pub fn fixture(arch: &str) -> PathBuf {
    reference_dir().join(arch)
}

pub fn reference_data() -> PathBuf {
    reference_dir().join("data.jsonl")
}

/// A tensor of `reference.safetensors` as f32 or i64 values with its shape.
pub struct Reference {
    pub f32s: BTreeMap<String, Array2<f32>>,
    pub i64s: BTreeMap<String, Array2<i64>>,
    pub max_seq_len: usize,
}

pub fn read_reference(arch: &str) -> Reference {
    let bytes = std::fs::read(fixture(arch).join("reference.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let max_seq_len = meta.metadata().as_ref().unwrap()["max_seq_len"].parse().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut f32s, mut i64s) = (BTreeMap::new(), BTreeMap::new());
    for (name, view) in st.tensors() {
        let shape = (view.shape()[0], view.shape()[1]);
        match view.dtype() {
            Dtype::F32 => {
                let v = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                f32s.insert(name, Array2::from_shape_vec(shape, v).unwrap());
            }
            Dtype::I64 => {
                let v = view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
                i64s.insert(name, Array2::from_shape_vec(shape, v).unwrap());
            }
            d => panic!("unexpected dtype {d:?} for {name}"),
        }
    }
    Reference { f32s, i64s, max_seq_len }
}

/// Reads every unit of `source` in one call and returns the rows of each input.
fn capture_all(source: &mut dyn Source) -> Vec<Array2<f32>> {
    let inputs = source.catalog().inputs.clone();
    let mut rows: Vec<Vec<Array2<f32>>> = vec![Vec::new(); inputs.len()];
    let units: Vec<usize> = (0..source.units()).collect();
    source
        .read(&units, &vec![true; inputs.len()], &mut |g, x| {
            rows[g].push(x.to_owned());
            Ok(())
        })
        .unwrap();
    rows.into_iter()
        .zip(&inputs)
        .map(|(r, inp)| {
            let views: Vec<_> = r.iter().map(|a| a.view()).collect();
            if views.is_empty() {
                Array2::zeros((0, inp.dim))
            } else {
                concatenate(Axis(0), &views).unwrap()
            }
        })
        .collect()
}

fn open(arch: &str, max_seq_len: usize) -> ModelSource {
    ModelSource::open(&fixture(arch), &reference_data(), &ModelOptions { text_field: None, max_seq_len, use_label_mask: true }).unwrap()
}

/// Largest `|a - b|` and largest `|a - b| / (ATOL + RTOL·|b|)` (≤ 1 passes).
fn errors(a: &Array2<f32>, b: &Array2<f32>) -> (f32, f32) {
    a.iter().zip(b).fold((0.0f32, 0.0f32), |(m, r), (&x, &y)| {
        let d = (x - y).abs();
        (m.max(d), r.max(d / (ATOL + RTOL * y.abs())))
    })
}

/// Layers of the reference whose captured inputs are bitwise identical, as sorted groups.
fn byte_identity_groups(reference: &Reference, names: &[String]) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for n in names {
        let x = &reference.f32s[n];
        let bits: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
        match groups.iter_mut().find(|g| {
            let y = &reference.f32s[&g[0]];
            y.dim() == x.dim() && y.iter().map(|v| v.to_bits()).eq(bits.iter().copied())
        }) {
            Some(g) => g.push(n.clone()),
            None => groups.push(vec![n.clone()]),
        }
    }
    groups
}

fn check_against_torch(arch: &str) {
    let reference = read_reference(arch);
    let mut source = open(arch, reference.max_seq_len);
    let catalog = source.catalog().clone();
    let names: Vec<String> = catalog.layers.iter().map(|l| l.name.clone()).collect();
    let torch_names: Vec<&String> = reference.f32s.keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted.iter().collect::<Vec<_>>(), torch_names, "{arch}: eva's module names are PyTorch's nn.Linear names");

    // Equal-input groups from the architecture equal the groups byte identity gives.
    let mut ours: Vec<Vec<String>> = catalog.inputs.iter().map(|i| i.members.iter().map(|&m| names[m].clone()).collect()).collect();
    let mut theirs = byte_identity_groups(&reference, &names);
    ours.iter_mut().for_each(|g| g.sort());
    theirs.iter_mut().for_each(|g| g.sort());
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "{arch}: equal-input groups");

    let rows = capture_all(&mut source);
    let mut worst = (0.0f32, 0.0f32, String::new());
    for layer in &catalog.layers {
        let got = &rows[layer.input];
        let want = &reference.f32s[&layer.name];
        assert_eq!(got.dim(), want.dim(), "{arch} {}: rows x features", layer.name);
        let (abs, rel) = errors(got, want);
        assert!(rel <= 1.0, "{arch} {}: max |eva - torch| = {abs:e} exceeds {ATOL:e} + {RTOL:e}·|torch|", layer.name);
        if rel > worst.1 {
            worst = (abs, rel, layer.name.clone());
        }
    }
    println!("{arch}: {} layers, max abs error {:.2e}, max error / tolerance {:.3} ({})", catalog.layers.len(), worst.0, worst.1, worst.2);
}

#[test]
fn llama_matches_pytorch() {
    check_against_torch("llama");
}

#[test]
fn mistral_matches_pytorch() {
    check_against_torch("mistral");
}

#[test]
fn qwen2_matches_pytorch() {
    check_against_torch("qwen2");
}

#[test]
fn bert_matches_pytorch() {
    check_against_torch("bert");
}

#[test]
fn roberta_matches_pytorch() {
    check_against_torch("roberta");
}

/// Token ids and the label mask equal what the Python tokenizers library produced.
#[test]
fn tokenization_and_label_mask_match_python() {
    for arch in ["llama", "mistral", "qwen2", "bert", "roberta"] {
        let reference = read_reference(arch);
        let enc = TextEncoder::open(&fixture(arch), reference.max_seq_len).unwrap();
        let examples = read_examples(&reference_data(), None).unwrap();
        let (ids, mask, keep) = (&reference.i64s["input_ids"], &reference.i64s["attention_mask"], &reference.i64s["keep"]);
        assert_eq!(examples.items.len(), ids.nrows(), "blank line skipped");
        for (i, ex) in examples.items.iter().enumerate() {
            let e = enc.encode(ex, || format!("example {i}")).unwrap();
            let n = mask.row(i).iter().filter(|&&m| m == 1).count();
            let want_ids: Vec<u32> = ids.row(i).iter().take(n).map(|&v| v as u32).collect();
            let want_keep: Vec<bool> = keep.row(i).iter().take(n).map(|&v| v == 1).collect();
            assert_eq!(e.ids, want_ids, "{arch} example {i}: ids");
            assert_eq!(e.labelled, want_keep, "{arch} example {i}: labels");
            assert!(e.ids.len() <= reference.max_seq_len);
        }
        // The reference data has a truncated example and masked prompts.
        assert!(mask.row(0).iter().all(|&m| m == 1) && mask.ncols() == reference.max_seq_len, "{arch}: example 0 is truncated");
        assert!(keep.iter().zip(mask.iter()).any(|(&k, &m)| m == 1 && k == 0), "{arch}: some tokens are label-masked");
    }
}

/// Without the label mask, prompt tokens count too: more rows, and the labelled rows are a
/// subset in order.
#[test]
fn no_label_mask_keeps_prompt_tokens() {
    let reference = read_reference("bert");
    let opts = ModelOptions { text_field: None, max_seq_len: reference.max_seq_len, use_label_mask: false };
    let mut source = ModelSource::open(&fixture("bert"), &reference_data(), &opts).unwrap();
    let rows = capture_all(&mut source);
    let total = reference.i64s["attention_mask"].iter().filter(|&&m| m == 1).count();
    let kept = reference.i64s["keep"].iter().filter(|&&m| m == 1).count();
    assert!(kept < total);
    assert!(rows.iter().all(|r| r.nrows() == total));
}

/// Reading units one at a time, or a few at a time, gives the same rows as one packed batch.
#[test]
fn rows_do_not_depend_on_batching() {
    let reference = read_reference("llama");
    let mut source = open("llama", reference.max_seq_len);
    let all = capture_all(&mut source);
    let n = source.units();
    let inputs = source.catalog().inputs.len();
    let mut pieces: Vec<Vec<Array2<f32>>> = vec![Vec::new(); inputs];
    for chunk in (0..n).collect::<Vec<_>>().chunks(2) {
        source
            .read(chunk, &vec![true; inputs], &mut |g, x| {
                pieces[g].push(x.to_owned());
                Ok(())
            })
            .unwrap();
    }
    for (g, p) in pieces.iter().enumerate() {
        let views: Vec<_> = p.iter().map(|a| a.view()).collect();
        let cat = concatenate(Axis(0), &views).unwrap();
        let (abs, _) = errors(&cat, &all[g]);
        assert!(abs <= 1e-5, "input {g}: {abs}");
    }
}

/// Only wanted inputs are delivered (converged layers stop being computed).
#[test]
fn only_wanted_inputs_are_delivered() {
    let reference = read_reference("qwen2");
    let mut source = open("qwen2", reference.max_seq_len);
    let inputs = source.catalog().inputs.len();
    let mut wanted = vec![false; inputs];
    wanted[1] = true;
    let mut seen = Vec::new();
    source
        .read(&[0, 1], &wanted, &mut |g, _| {
            seen.push(g);
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, vec![1]);
}

/// `eva init` on a fixture: adapter names are the checkpoint's module paths, the config points
/// at the model and its task, and with `--no-early-stop --estimator exact` the components are a
/// float64 PCA of PyTorch's own activations.
fn init_matches_pytorch_pca(arch: &str, task: &str) {
    let reference = read_reference(arch);
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let dir = fixture(arch);
    let max = reference.max_seq_len.to_string();
    let o = eva(&[
        "init", "--model", dir.to_str().unwrap(), "--data", reference_data().to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--max-seq-len", &max, "--rank", "2", "--rho", "1", "--no-early-stop", "--estimator", "exact", "--batch-size", "2", "-q",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = read_adapter(&out);
    assert_eq!(w.config["task_type"], task);
    let base = w.config["base_model_name_or_path"].as_str().unwrap();
    assert_eq!(Path::new(base).canonicalize().unwrap(), dir.canonicalize().unwrap());
    for (name, x) in &reference.f32s {
        let a = &w.tensors[&format!("base_model.model.{name}.lora_A.weight")];
        let (_, vectors) = dense_pca(std::slice::from_ref(x));
        let sim = subspace_similarity(a, vectors.slice(ndarray::s![.., ..a.nrows()]));
        assert!(sim >= 0.9999, "{arch} {name}: subspace similarity {sim}");
    }
}

#[test]
fn init_llama_matches_pytorch_pca() {
    init_matches_pytorch_pca("llama", "CAUSAL_LM");
}

#[test]
fn init_bert_matches_pytorch_pca() {
    init_matches_pytorch_pca("bert", "SEQ_CLS");
}

#[test]
fn init_roberta_matches_pytorch_pca() {
    init_matches_pytorch_pca("roberta", "FEATURE_EXTRACTION");
}

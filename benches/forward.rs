//! `--model` throughput: forward tokens/s of the CPU backend (capturing every linear layer's
//! input, as `eva init` does before its statistics) and the time split of whole `eva init` runs
//! (forward / statistics / leader, from `eva_report.json`), next to this machine's own sgemm rate.
//!
//! | model | source |
//! |---|---|
//! | `minilm` | all-MiniLM-L6-v2 (BERT, 6 blocks, d = 384, 22.7M parameters) from `$EVA_MINILM_DIR` (`.ci/run` shows how to get it); skipped when unset |
//! | `llama-100m` | a Llama-shaped checkpoint with random weights (12 blocks, d = 768, GQA 12/4, MLP 2048, vocab 32000; 100M parameters), written under `target/bench-models/` on first use, with the tokenizer of `examples/tiny-llama` |
//!
//! Data: `target/bench-models/bench.txt`, 512 examples of 3–8 random sentences from
//! `examples/data/sample.txt` (fixed seed), truncated to `--max-seq-len 128`, 32 per step.
//! The same files feed PEFT's EVA in `tests/reference/peft_eva_bench.py` (docs/model.md).
//!
//! Usage: `cargo bench --bench forward [-- [minilm] [llama-100m] [examples=N] [reps=N] [forward-only] [pack=N]]`.
//!
//! The forward-only column runs the model source's passes (`EXAMPLES_PER_PASS` = 8 examples, as
//! `eva init` does); `pack=N` (implies `forward-only`) runs N examples per pass instead.

mod util;

use eva::device::cpu::Cpu;
use eva::source::model::{ModelOptions, ModelSource};
use eva::source::Source;
use ndarray::Array2;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MAX_SEQ_LEN: usize = 128;
const BATCH: usize = 32;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small deterministic generator (splitmix64), so the data is the same on every machine.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A normal deviate (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = ((self.next() >> 11) as f64) / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

fn bench_dir() -> PathBuf {
    let d = root().join("target/bench-models");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn data_file(examples: usize) -> PathBuf {
    let path = bench_dir().join(format!("bench-{examples}.txt"));
    if !path.exists() {
        let text = std::fs::read_to_string(root().join("examples/data/sample.txt")).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut rng = Mix(7);
        let mut out = String::new();
        for _ in 0..examples {
            let k = 3 + rng.below(6) as usize;
            let ex: Vec<&str> = (0..k)
                .map(|_| lines[rng.below(lines.len() as u64) as usize])
                .collect();
            out.push_str(&ex.join(" "));
            out.push('\n');
        }
        std::fs::write(&path, out).unwrap();
    }
    path
}

/// Writes the random Llama-shaped checkpoint once (F32, ~400 MB).
fn llama_100m() -> PathBuf {
    let dir = bench_dir().join("llama-100m");
    if dir.join("model.safetensors").exists() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let (hidden, inter, layers, heads, kv, vocab) =
        (768usize, 2048usize, 12usize, 12usize, 4usize, 32000usize);
    let hd = hidden / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("examples/tiny-llama/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let mut rng = Mix(100);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Mix| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| (offset + scale * rng.normal()).to_le_bytes())
            .collect();
        tensors.push((name, shape, bytes));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab, hidden],
        0.02,
        0.0,
        &mut rng,
    );
    add("model.norm.weight".into(), vec![hidden], 0.0, 1.0, &mut rng);
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        add(
            format!("{p}input_layernorm.weight"),
            vec![hidden],
            0.0,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}post_attention_layernorm.weight"),
            vec![hidden],
            0.0,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.q_proj.weight"),
            vec![heads * hd, hidden],
            0.02,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv * hd, hidden],
            0.02,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv * hd, hidden],
            0.02,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}self_attn.o_proj.weight"),
            vec![hidden, heads * hd],
            0.02,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}mlp.gate_proj.weight"),
            vec![inter, hidden],
            0.02,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}mlp.up_proj.weight"),
            vec![inter, hidden],
            0.02,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}mlp.down_proj.weight"),
            vec![hidden, inter],
            0.02,
            0.0,
            &mut rng,
        );
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors")).unwrap();
    dir
}

fn median(v: Vec<f64>) -> f64 {
    util::summary(&v).0
}

/// Sgemm GFLOP/s at the shape of an MLP up-projection of `tokens` rows (OpenBLAS on all threads).
fn sgemm_rate(tokens: usize, d: usize, inter: usize, reps: usize) -> f64 {
    let a =
        Array2::<f32>::from_shape_fn((tokens, d), |(i, j)| ((i * 7 + j * 3) % 13) as f32 / 13.0);
    let b = Array2::<f32>::from_shape_fn((inter, d), |(i, j)| ((i * 5 + j) % 11) as f32 / 11.0);
    let mut c = Array2::<f32>::zeros((tokens, inter));
    let t = util::time_runs(reps, || {
        util::blas_reference(|| ndarray::linalg::general_mat_mul(1.0, &a, &b.t(), 0.0, &mut c))
    });
    2.0 * (tokens * d * inter) as f64 / median(t) / 1e9
}

/// Forward-only: every unit read with every input wanted, `pack` examples per pass (0: the
/// model source's own, as `eva init` runs them), rows delivered and dropped.
fn forward_only(model: &Path, data: &Path, reps: usize, pack: usize) -> (f64, u64, f64) {
    let opts = ModelOptions {
        text_field: None,
        max_seq_len: MAX_SEQ_LEN,
        use_label_mask: true,
    };
    let mut source = ModelSource::open_dir(model, data, &opts).unwrap();
    let inputs = source.catalog().inputs.len();
    let units: Vec<usize> = (0..source.units()).collect();
    let mut tokens = 0u64;
    let mut times = Vec::new();
    for r in 0..=reps {
        let t = Instant::now();
        let mut n = 0u64;
        let pack = if pack > 0 { pack } else { source.pass_units() };
        for pass in units.chunks(pack) {
            source
                .read(pass, &vec![true; inputs], &mut |g, x| {
                    if g == 0 {
                        n += x.nrows() as u64;
                    }
                    Ok(())
                })
                .unwrap();
        }
        if r > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        tokens = n;
    }
    let secs = median(times);
    // Linear-layer flops per token: 2 · Σ in·out over the captured modules.
    let flops_per_token: f64 = source
        .model()
        .modules()
        .iter()
        .map(|m| 2.0 * (m.in_features * m.out_features) as f64)
        .sum();
    (
        tokens as f64 / secs,
        tokens,
        flops_per_token * tokens as f64 / secs / 1e9,
    )
}

/// A whole `eva init` run; returns (wall seconds, report).
fn init_run(model: &Path, data: &Path, extra: &[&str]) -> (f64, serde_json::Value) {
    let out = bench_dir().join("adapter");
    let t = Instant::now();
    let mut args = vec![
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--force",
        "-q",
    ];
    let bs = BATCH.to_string();
    let msl = MAX_SEQ_LEN.to_string();
    args.extend_from_slice(&["--batch-size", &bs, "--max-seq-len", &msl]);
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_eva"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "eva init failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let wall = t.elapsed().as_secs_f64();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eva_report.json")).unwrap()).unwrap();
    (wall, report)
}

fn main() {
    let mut names = Vec::new();
    let mut examples = 512;
    let mut reps = 3;
    let mut forward_only_flag = false;
    let mut pack = 0usize;
    for a in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        if let Some(v) = a.strip_prefix("examples=") {
            examples = v.parse().expect("examples=N");
        } else if let Some(v) = a.strip_prefix("pack=") {
            pack = v.parse().expect("pack=N");
            forward_only_flag = true;
        } else if a == "forward-only" {
            forward_only_flag = true;
        } else if let Some(v) = a.strip_prefix("reps=") {
            reps = v.parse().expect("reps=N");
        } else {
            names.push(a);
        }
    }
    if names.is_empty() {
        names = vec!["minilm".into(), "llama-100m".into()];
    }
    eva::linalg::set_threads(0);
    let cores = std::thread::available_parallelism()
        .map(|v| v.get())
        .unwrap_or(1);
    let data = data_file(examples);
    println!("# forward bench: {cores} cores, backend {}, {examples} examples, max_seq_len {MAX_SEQ_LEN}, batch {BATCH}", eva::device::backend::Backend::name(&Cpu));
    println!("data: {}", data.display());
    println!();
    println!("| model | sgemm GFLOP/s (machine) | forward tokens/s | forward linear GFLOP/s | init exact, all data: s (forward / statistics / leader) | init default (early stop): s, steps (forward / statistics / leader) |");
    println!("|---|---|---|---|---|---|");
    for name in names {
        let (dir, d, inter) = match name.as_str() {
            "minilm" => {
                match std::env::var_os("EVA_MINILM_DIR") {
                    Some(p) => (PathBuf::from(p), 384, 1536),
                    None => {
                        eprintln!("minilm: skipped, EVA_MINILM_DIR is not set (see .ci/run for the download)");
                        continue;
                    }
                }
            }
            "llama-100m" => (llama_100m(), 768, 2048),
            other => panic!("unknown model {other} (minilm, llama-100m)"),
        };
        let rate = sgemm_rate(BATCH * 90, d, inter, 5);
        let (tps, tokens, gflops) = forward_only(&dir, &data, reps, pack);
        let split = |r: &serde_json::Value| {
            let t = &r["time_s"];
            format!(
                "{:.1} / {:.1} / {:.1}",
                t["forward"].as_f64().unwrap(),
                t["statistics"].as_f64().unwrap(),
                t["leader"].as_f64().unwrap()
            )
        };
        if forward_only_flag {
            let packed = if pack > 0 {
                format!(", {pack} per pass")
            } else {
                String::new()
            };
            println!(
                "| {name} ({tokens} tokens{packed}) | {rate:.0} | {tps:.0} | {gflops:.0} | | |"
            );
            continue;
        }
        let (wall_exact, rep_exact) =
            init_run(&dir, &data, &["--no-early-stop", "--estimator", "exact"]);
        let (wall_default, rep_default) = init_run(&dir, &data, &[]);
        println!(
            "| {name} ({tokens} tokens) | {rate:.0} | {tps:.0} | {gflops:.0} | {wall_exact:.1} ({}) | {wall_default:.1}, {} ({}) |",
            split(&rep_exact),
            rep_default["steps"],
            split(&rep_default)
        );
    }
}

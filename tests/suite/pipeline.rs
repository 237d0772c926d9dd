//! Layer slices: a `dp × pp` grid gives the adapter of one process (bitwise where the forward's
//! arithmetic is the same: every pass runs the same blocks on the same rows), a stage loads
//! only its shards, bad grids are usage errors, and a failing block on the last stage ends the
//! whole job with its cause and no output.

use super::common::*;
use super::distributed::{shards, shipped_model};
use eva::model::Model;
use std::path::Path;
use std::time::{Duration, Instant};

fn init(out: &Path, source: &[&str], extra: &[&str]) -> Written {
    let mut args = vec!["init", "--out", out.to_str().unwrap(), "-q", "--rank", "3"];
    args.extend_from_slice(source);
    args.extend_from_slice(extra);
    let o = eva(&args);
    assert!(
        o.status.success(),
        "{:?}: {}",
        extra,
        String::from_utf8_lossy(&o.stderr)
    );
    read_adapter(out)
}

#[test]
fn every_grid_gives_the_single_process_adapter_on_the_shipped_model() {
    let tmp = tempdir();
    let single = tmp.path().join("single");
    let one = init(&single, &shipped_model(), &["--batch-size", "16"]);
    let weights = std::fs::read(single.join("adapter_model.safetensors")).unwrap();
    for (ranks, pp) in [("2", "2"), ("3", "3"), ("4", "2"), ("4", "4")] {
        let out = tmp.path().join(format!("r{ranks}pp{pp}"));
        let w = init(
            &out,
            &shipped_model(),
            &["--batch-size", "16", "--local-ranks", ranks, "--pp", pp],
        );
        assert_same_written(&one, &w);
        assert_eq!(
            w.report["pipeline_stages"].as_u64().unwrap().to_string(),
            pp
        );
        // Hidden states went stage to stage.
        assert!(w.report["bytes"]["hidden_per_rank_total"].as_u64().unwrap() > 0);
        // Same passes through the same blocks: bitwise the same activations and Grams, and with
        // one replica the same solves.
        if ranks == pp {
            assert_eq!(
                std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
                weights,
                "{ranks} ranks, --pp {pp}"
            );
        }
    }
    // An explicit split that differs from the balanced one gives the same adapter too.
    let out = tmp.path().join("split");
    let w = init(
        &out,
        &shipped_model(),
        &[
            "--batch-size",
            "16",
            "--local-ranks",
            "2",
            "--pp",
            "2",
            "--pp-split",
            "1,3",
        ],
    );
    assert_same_written(&one, &w);
    assert_eq!(
        w.report["stage_split"],
        serde_json::json!(["blocks 0..1", "blocks 1..4"])
    );
}

/// `--model DIR --data FILE` of a fixture, 24 tokens per example.
fn fixture_source<'a>(dir: &'a Path, data: &'a Path) -> [&'a str; 6] {
    [
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-seq-len",
        "24",
    ]
}

/// The newer decoders on two stages (one block each; the multimodal Gemma 3's keys
/// `language_model.model.*`, Phi-3's fused layers) give bitwise the single-process adapter.
#[test]
fn two_stages_give_the_single_process_adapter_on_the_newer_families() {
    let tmp = tempdir();
    let data = reference_data();
    for arch in ["qwen3", "gemma3", "phi3"] {
        let dir = fixture(arch);
        let source = fixture_source(&dir, &data);
        let single = tmp.path().join(format!("{arch}-single"));
        let one = init(&single, &source, &["--batch-size", "2"]);
        let staged = tmp.path().join(format!("{arch}-pp2"));
        let two = init(
            &staged,
            &source,
            &["--batch-size", "2", "--local-ranks", "2", "--pp", "2"],
        );
        assert_same_written(&one, &two);
        assert_eq!(two.report["pipeline_stages"].as_u64(), Some(2), "{arch}");
        assert_eq!(
            std::fs::read(staged.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(single.join("adapter_model.safetensors")).unwrap(),
            "{arch}: --pp 2"
        );
    }
}

#[test]
fn shards_and_synthetic_data_split_their_inputs_over_the_stages() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    shards(&data);
    let spec = "layers=3,group=2,dim=64,tokens=128,units=30,mean=4";
    for source in [
        vec!["--activations", data.to_str().unwrap()],
        vec!["--synthetic", spec],
    ] {
        let one = init(&tmp.path().join("one"), &source, &["--batch-size", "3"]);
        for (ranks, pp) in [("2", "2"), ("3", "3"), ("4", "2")] {
            let out = tmp.path().join(format!("r{ranks}pp{pp}"));
            let w = init(
                &out,
                &source,
                &["--batch-size", "3", "--local-ranks", ranks, "--pp", pp],
            );
            assert_same_written(&one, &w);
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::remove_dir_all(tmp.path().join("one")).unwrap();
    }
}

#[test]
fn a_stage_opens_only_the_shards_of_its_blocks() {
    // The fixture's three shards: embeddings and block 0's attention inputs; the rest of
    // block 0 and block 1's attention; the rest of block 1.
    let dir = fixture("llama");
    let names = |m: &Model| {
        m.checkpoint
            .opened_files()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    let mut m = Model::open(&dir).unwrap();
    assert!(
        names(&m).is_empty(),
        "opening indexes without reading a shard"
    );
    m.load(&eva::device::cpu::Cpu, 1..2).unwrap();
    assert_eq!(
        names(&m),
        [
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors"
        ]
    );
    let mut m = Model::open(&dir).unwrap();
    m.load(&eva::device::cpu::Cpu, 0..1).unwrap();
    assert_eq!(
        names(&m),
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors"
        ]
    );
}

#[test]
fn grids_that_do_not_fit_are_usage_errors() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let o = out.to_str().unwrap();
    let mut args = vec!["init", "--out", o];
    args.extend_from_slice(&shipped_model());
    let run = |extra: &[&str]| eva(&[&args[..], extra].concat());
    assert_refused(
        &run(&["--local-ranks", "3", "--pp", "2"]),
        2,
        &["--pp 2", "3 ranks"],
        &out,
    );
    assert_refused(
        &run(&["--local-ranks", "2", "--pp", "2", "--pp-split", "1,1"]),
        2,
        &["--pp-split 1,1", "4 blocks"],
        &out,
    );
    assert_refused(
        &run(&["--local-ranks", "2", "--pp", "2", "--pp-split", "4,0"]),
        2,
        &["--pp-split 4,0"],
        &out,
    );
    assert_refused(
        &run(&["--local-ranks", "5", "--pp", "5"]),
        2,
        &["--pp 5", "4 blocks"],
        &out,
    );
}

#[test]
fn a_failing_block_on_the_last_stage_ends_the_job_with_its_cause() {
    let tmp = tempdir();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let shipped = repo().join("examples/tiny-llama");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(shipped.join(f), model.join(f)).unwrap();
    }
    // A NaN in block 3's attention output projection (stage 1 of 2 holds blocks 2..4).
    let bytes = std::fs::read(shipped.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Raw {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            bytes: v.data().to_vec(),
        })
        .collect();
    let bad = tensors
        .iter_mut()
        .find(|t| t.name == "model.layers.3.self_attn.o_proj.weight")
        .unwrap();
    bad.bytes[0..2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    write_raw(&model.join("model.safetensors"), &tensors, None);
    let out = tmp.path().join("adapter");
    let t = Instant::now();
    let data = repo().join("examples/data/sample.txt");
    let o = eva(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--local-ranks",
        "2",
        "--pp",
        "2",
    ]);
    assert!(t.elapsed() < Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rank 1") && err.contains("layers.3") && !err.contains("panicked"),
        "{err}"
    );
    assert_nothing_written(&out);
}

#[test]
fn inspect_prints_the_split_init_uses() {
    let tmp = tempdir();
    let o = eva(&["inspect", "--model", shipped_model()[1], "--pp", "2"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = init(
        &tmp.path().join("a"),
        &shipped_model(),
        &["--local-ranks", "2", "--pp", "2"],
    );
    for (s, split) in w.report["stage_split"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let range = split.as_str().unwrap().trim_start_matches("blocks ");
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{s}  {range}"))),
            "stage {s} {range} in:\n{text}"
        );
    }
}

#[test]
fn units_split_into_stage_files_read_as_whole_units() {
    let tmp = tempdir();
    let whole = tmp.path().join("whole");
    shards(&whole);
    // The same units, each split into one file per training stage (blocks 0 and 1).
    let split = tmp.path().join("split");
    std::fs::create_dir_all(&split).unwrap();
    for u in 0..12 {
        let bytes = std::fs::read(shard(&whole, u)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let outs: std::collections::BTreeMap<String, usize> =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["out_features"]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for stage in 0..2 {
            let prefix = format!("blk.{stage}.");
            let tensors: Vec<Raw> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .map(|(name, v)| Raw {
                    name,
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                })
                .collect();
            let outs: std::collections::BTreeMap<String, usize> = outs
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix))
                .map(|(n, o)| (n.clone(), *o))
                .collect();
            write_raw(
                &split.join(format!("unit-{u:05}.stage-{stage:02}.safetensors")),
                &tensors,
                Some(&outs),
            );
        }
    }
    let one = init(
        &tmp.path().join("one"),
        &["--activations", whole.to_str().unwrap()],
        &["--batch-size", "3"],
    );
    for extra in [&[][..], &["--local-ranks", "2", "--pp", "2"][..]] {
        let out = tmp.path().join("from-split");
        let w = init(
            &out,
            &["--activations", split.to_str().unwrap()],
            &[&["--batch-size", "3"][..], extra].concat(),
        );
        assert_same_written(&one, &w);
        assert_eq!(w.report["units_total"], 12);
        std::fs::remove_dir_all(&out).unwrap();
    }
    // A unit that is both whole and split is refused.
    std::fs::copy(shard(&whole, 0), split.join("unit-00000.safetensors")).unwrap();
    let out = tmp.path().join("bad");
    let o = eva(&[
        "init",
        "--activations",
        split.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_refused(&o, 1, &["unit-00000.safetensors", "whole unit"], &out);
}

#[test]
fn large_exact_grams_stay_on_their_ranks_inside_each_stage() {
    // d = 2048: with two replicas per stage the Grams are not all-reduced; the stage leader
    // reaches them through Σ_r G_r·Q products served by its stage.
    let tmp = tempdir();
    let spec = [
        "--synthetic",
        "layers=2,group=1,dim=2048,tokens=256,units=6,decay=1.5",
    ];
    let one = init(&tmp.path().join("one"), &spec, &["--batch-size", "2"]);
    for (ranks, pp) in [("2", "1"), ("4", "2")] {
        let w = init(
            &tmp.path().join(format!("r{ranks}")),
            &spec,
            &["--batch-size", "2", "--local-ranks", ranks, "--pp", pp],
        );
        assert_same_written(&one, &w);
    }
}

/// Mixture-of-experts checkpoints: `--pp 2` (the experts' statistics on the stage of their
/// block) and 2 data-parallel ranks give the single process's adapter, byte for byte with one
/// replica; the experts' `lora_A` (one per parameter, `r` rows per expert) included.
#[test]
fn moe_models_give_the_same_adapter_on_every_grid() {
    let tmp = tempdir();
    for arch in ["qwen3_moe", "qwen2_moe"] {
        let dir = fixture(arch);
        let data = reference_data();
        let more = ["--no-early-stop", "--batch-size", "2"];
        let source = [&fixture_source(&dir, &data)[..], &more].concat();
        let single = tmp.path().join(format!("{arch}-single"));
        let one = init(&single, &source, &[]);
        assert!(
            one.config["target_parameters"].as_array().unwrap().len() >= 2,
            "{arch}: experts targeted"
        );
        let weights = std::fs::read(single.join("adapter_model.safetensors")).unwrap();
        for (ranks, pp) in [("2", "2"), ("2", "1")] {
            let out = tmp.path().join(format!("{arch}-r{ranks}pp{pp}"));
            let w = init(&out, &source, &["--local-ranks", ranks, "--pp", pp]);
            assert_same_written(&one, &w);
            if ranks == pp {
                assert_eq!(
                    std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
                    weights,
                    "{arch}: {ranks} ranks, --pp {pp}"
                );
            }
        }
    }
}

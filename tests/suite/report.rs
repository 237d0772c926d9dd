//! What eva writes for people next to the adapter: `eva_report.svg` rendered by a real SVG
//! renderer (rsvg-convert, Debian's librsvg2-bin), the `README.md` model card's YAML front
//! matter, and `eva report DIR` (ranks add up to the budget, `--json`, older directories).

use super::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

/// `eva init --synthetic SPEC --out DIR -q` plus `extra`; returns DIR.
fn synthetic(tmp: &Path, spec: &str, extra: &[&str]) -> PathBuf {
    let out = tmp.join("adapter");
    let mut args = vec![
        "init",
        "--synthetic",
        spec,
        "--out",
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = eva(&args);
    assert!(
        o.status.success(),
        "eva init failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The `width` and `height` attributes of the `<svg>` element, px.
fn svg_size(svg: &str) -> (u32, u32) {
    let open = &svg[svg.find("<svg").expect("an <svg> element")..];
    let open = &open[..open.find('>').unwrap()];
    let attr = |k: &str| -> u32 {
        let at = open
            .find(&format!(" {k}=\""))
            .unwrap_or_else(|| panic!("<svg> has no {k}"))
            + k.len()
            + 3;
        open[at..open[at..].find('"').unwrap() + at]
            .parse::<f64>()
            .unwrap()
            .round() as u32
    };
    (attr("width"), attr("height"))
}

/// Renders `svg` with rsvg-convert and returns the PNG's bytes and its (width, height) from IHDR.
fn render_png(svg: &Path) -> (Vec<u8>, u32, u32) {
    let png = svg.with_extension("png");
    let o = Command::new("rsvg-convert")
        .arg("--format=png")
        .arg("-o")
        .arg(&png)
        .arg(svg)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run rsvg-convert ({e}): install Debian's librsvg2-bin (.ci/run does)")
        });
    assert!(
        o.status.success(),
        "rsvg-convert failed on {}: {}",
        svg.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    // PNG: 8-byte signature, then the IHDR chunk (length, "IHDR", width, height), big-endian.
    assert!(
        bytes.len() > 33
            && bytes[..8] == [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]
            && &bytes[12..16] == b"IHDR",
        "not a PNG"
    );
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (w, h) = (be(16), be(20));
    (bytes, w, h)
}

/// Checks the picture of `dir` renders at its declared size and names every layer.
fn check_picture(dir: &Path) -> (u32, u32) {
    let svg_path = dir.join("eva_report.svg");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eva_report.json")).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    for l in layers {
        let name = l["name"].as_str().unwrap();
        // Three panels (rank, variance captured, convergence), one cell each.
        assert_eq!(
            svg.matches(&format!("<title>{name}: rank ")).count(),
            3,
            "{name} in every panel"
        );
    }
    let (w, h) = svg_size(&svg);
    let (png, pw, ph) = render_png(&svg_path);
    assert_eq!((pw, ph), (w, h), "PNG size is the SVG's");
    // Measured at 810 x 674: blank 3.1 KB, cells without text 7.6 KB, the whole picture 88 KB.
    assert!(
        png.len() > 5000,
        "PNG of {} bytes: nothing drawn?",
        png.len()
    );
    (w, h)
}

#[test]
fn picture_renders_for_4_and_80_blocks() {
    let tmp = tempdir();
    let small = synthetic(
        &tmp.path().join("4"),
        "layers=4,group=7,dim=32,tokens=128,units=16",
        &["--rank", "4"],
    );
    let (w4, h4) = check_picture(&small);
    // 4 blocks × 7 types: cells at their widest.
    assert!(
        (500..=1400).contains(&w4) && (300..=700).contains(&h4),
        "4 blocks: {w4} x {h4}"
    );

    let big = synthetic(
        &tmp.path().join("80"),
        "layers=80,group=3,dim=16,tokens=64,units=8",
        &["--rank", "2", "--max-steps", "1"],
    );
    let (w80, h80) = check_picture(&big);
    // 80 blocks: cells at their narrowest (14 px), so the picture stays about a screen wide.
    assert!(
        (1100..=1500).contains(&w80) && (300..=500).contains(&h80),
        "80 blocks: {w80} x {h80}"
    );
    // A run stopped by --max-steps marks layers that did not converge.
    let svg = std::fs::read_to_string(big.join("eva_report.svg")).unwrap();
    assert!(
        svg.contains("not converged"),
        "unconverged layers are marked"
    );
}

/// Splits `README.md` into its YAML front matter and the rest.
fn front_matter(card: &str) -> (Yaml, String) {
    let rest = card
        .strip_prefix("---\n")
        .expect("front matter opens the card");
    let end = rest.find("\n---\n").expect("front matter closes");
    let docs = YamlLoader::load_from_str(&rest[..end])
        .unwrap_or_else(|e| panic!("front matter is not YAML: {e}\n{}", &rest[..end]));
    assert_eq!(docs.len(), 1);
    (docs[0].clone(), rest[end + 5..].to_string())
}

fn tags(y: &Yaml) -> Vec<String> {
    y["tags"]
        .as_vec()
        .expect("tags is a list")
        .iter()
        .map(|t| t.as_str().expect("tags are strings").to_string())
        .collect()
}

#[test]
fn model_card_front_matter_is_peft_yaml() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let o = eva(&[
        "init",
        "--model",
        "examples/tiny-llama",
        "--data",
        "examples/data/train.txt",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(
        o.status.success(),
        "eva init failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let base = config["base_model_name_or_path"]
        .as_str()
        .unwrap()
        .to_string();
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let (y, body) = front_matter(&card);
    assert_eq!(y["base_model"].as_str(), Some(base.as_str()));
    assert_eq!(y["library_name"].as_str(), Some("peft"));
    assert_eq!(y["pipeline_tag"].as_str(), Some("text-generation"));
    let mut want = vec![
        format!("base_model:adapter:{base}"),
        "eva".into(),
        "lora".into(),
        "transformers".into(),
    ];
    want.sort();
    assert_eq!(tags(&y), want);
    assert!(body.contains("](eva_report.svg)"), "links the picture");
    assert!(
        body.contains("## EVA settings")
            && body.contains("## Data seen")
            && body.contains("## Rank distribution")
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eva_report.json")).unwrap()).unwrap();
    assert!(
        body.contains(&format!(
            "{} of {} examples",
            report["units_seen"], report["units_total"]
        )),
        "{body}"
    );
    check_picture(&out);

    // A name YAML would misread when plain is quoted, and no base model means no base tags.
    let odd = synthetic(
        &tmp.path().join("odd"),
        "layers=2,dim=16,tokens=64,units=4",
        &["--base-model", "yes: no #1", "--force"],
    );
    let (y, _) = front_matter(&std::fs::read_to_string(odd.join("README.md")).unwrap());
    assert_eq!(y["base_model"].as_str(), Some("yes: no #1"));
    assert!(
        y["pipeline_tag"].is_badvalue(),
        "pipeline_tag only for causal LMs"
    );
    let none = synthetic(
        &tmp.path().join("none"),
        "layers=2,dim=16,tokens=64,units=4",
        &[],
    );
    let (y, _) = front_matter(&std::fs::read_to_string(none.join("README.md")).unwrap());
    assert!(y["base_model"].is_badvalue());
    assert_eq!(tags(&y), ["eva", "lora"]);
}

/// Runs `eva report` with `args`, expecting success; returns stdout.
fn report_ok(args: &[&str]) -> Vec<u8> {
    let mut all = vec!["report"];
    all.extend_from_slice(args);
    let o = eva(&all);
    assert!(
        o.status.success(),
        "eva report failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Sums the `total` columns of `eva report`'s two tables: per module type and per block.
fn table_totals(text: &str) -> (usize, usize) {
    let section = |head: &str| -> Vec<Vec<String>> {
        let start = text
            .find(head)
            .unwrap_or_else(|| panic!("no `{head}` in\n{text}"))
            + head.len();
        text[start..]
            .lines()
            .skip(2)
            .take_while(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let by_type: usize = section("per module type")
        .iter()
        .map(|r| r[2].parse::<usize>().unwrap())
        .sum();
    let by_block: usize = section("per block (ranks)")
        .iter()
        .map(|r| r.last().unwrap().parse::<usize>().unwrap())
        .sum();
    (by_type, by_block)
}

#[test]
fn report_ranks_add_up_to_the_budget() {
    let tmp = tempdir();
    // Decays that differ per block, so ranks move between blocks.
    let out = synthetic(
        tmp.path(),
        "layers=6,group=3,dim=32,decay=1.5,tokens=128,units=16",
        &["--rank", "4"],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eva_report.json")).unwrap()).unwrap();
    let budget = report["rank_budget"].as_u64().unwrap() as usize;
    assert_eq!(budget, 4 * 18);
    let ranks: Vec<u64> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["rank"].as_u64().unwrap())
        .collect();
    assert!(
        ranks.iter().any(|&r| r != 4),
        "ranks were redistributed: {ranks:?}"
    );
    let text = String::from_utf8(report_ok(&[out.to_str().unwrap()])).unwrap();
    assert!(
        text.contains(&format!("sum {budget} = budget {budget}")),
        "{text}"
    );
    assert_eq!(table_totals(&text), (budget, budget), "{text}");
    assert!(
        text.contains("not converged   ") && text.contains("not certified   none"),
        "exact: every allocation certain\n{text}"
    );
    assert!(text.contains("time            total"), "{text}");

    // --json passes the file through, byte for byte.
    assert_eq!(
        report_ok(&[out.to_str().unwrap(), "--json"]),
        std::fs::read(out.join("eva_report.json")).unwrap()
    );
}

#[test]
fn report_reads_older_directories_and_names_without_blocks() {
    let tmp = tempdir();
    // Layer names without a block number, as in output.rs.
    let data = tmp.path().join("acts");
    std::fs::create_dir_all(&data).unwrap();
    for u in 0..4 {
        let layers: Vec<(String, ndarray::Array2<f32>, usize)> = ["model.a.iso", "model.b.steep"]
            .iter()
            .enumerate()
            .map(|(g, n)| {
                (
                    n.to_string(),
                    gen_rows(g as u64, u, 200, &power_law(16, 1.0 + g as f64), 0.0),
                    8,
                )
            })
            .collect();
        write_shard(&shard(&data, u as usize), &layers, Fmt::F32);
    }
    let out = tmp.path().join("adapter");
    init_ok(&data, &out, &["--rank", "2", "--max-steps", "1"]);
    check_picture(&out);
    let text = String::from_utf8(report_ok(&[out.to_str().unwrap()])).unwrap();
    assert!(
        text.contains("layers without a block number") && text.contains("model.b.steep"),
        "{text}"
    );
    assert!(text.contains("not converged   2 layer(s)"), "{text}");

    // What an older eva wrote: no picture, no card, a report without `backend` and the per-step bytes.
    std::fs::remove_file(out.join("eva_report.svg")).unwrap();
    std::fs::remove_file(out.join("README.md")).unwrap();
    let path = out.join("eva_report.json");
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("backend");
    old["bytes"].as_object_mut().unwrap().remove("per_step");
    old["bytes"]
        .as_object_mut()
        .unwrap()
        .remove("per_rank_mean_step");
    std::fs::write(&path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    let text = String::from_utf8(report_ok(&[out.to_str().unwrap()])).unwrap();
    assert!(text.contains("sum 4 = budget 4"), "{text}");
    assert!(text.contains("no eva_report.svg or README.md"), "{text}");
    assert_eq!(
        report_ok(&[out.to_str().unwrap(), "--json"]),
        std::fs::read(&path).unwrap()
    );
}

#[test]
fn report_refuses_what_eva_did_not_write() {
    let tmp = tempdir();
    for (dir, needle) in [
        (tmp.path().join("missing"), "is not a directory"),
        (tmp.path().to_path_buf(), "has no eva_report.json"),
    ] {
        let o = eva(&["report", dir.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("eva: error: ") && err.contains(needle) && err.lines().count() == 1,
            "{err}"
        );
    }
    std::fs::write(tmp.path().join("eva_report.json"), "{\"steps\": 3}").unwrap();
    let o = eva(&["report", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not an eva report"));
}

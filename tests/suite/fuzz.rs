//! Mutation tests of every reader of untrusted bytes: activation shards, checkpoints,
//! `config.json`, `tokenizer.json`, `.jsonl` data and the wire decoders. Valid inputs are
//! mutated (bit flips, truncations, length-field and number edits, splices) with eva's own
//! deterministic RNG; each case must give `Ok` or a clean error, never a panic, a hang or an
//! allocation out of proportion to the input. Inputs that once failed are kept in
//! `tests/fixtures/fuzz/` and replayed first.

use super::common::*;
use eva::model::text::{read_examples, Example, TextEncoder};
use eva::rng::Rng;
use eva::source::model::{ModelOptions, ModelSource};
use eva::source::shards::ShardSource;
use eva::source::Source;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Counts the largest single allocation of the current thread while a case runs.
struct Watch;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown are not watched.
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Watch = Watch;

/// Largest single allocation allowed for a case: a fixed allowance (models, tokenizers and the
/// forward pass of the tiny fixtures) plus a multiple of the input's size.
fn allowance(input_bytes: usize) -> usize {
    (64 << 20) + 16 * input_bytes
}

/// Time one case may take (debug builds on a shared 2-core machine).
const CASE_TIME: Duration = Duration::from_secs(20);

/// Runs `case` on its own thread with a time bound, catching panics and watching allocations.
/// `what` describes the input for messages; `input` (the mutated bytes) sizes the allocation
/// allowance and is saved under `target/fuzz-failures/` when the case fails, ready to be kept
/// as a fixture.
fn run_case(what: &str, input: &[u8], case: impl FnOnce() -> Result<(), String> + Send + 'static) {
    let input_bytes = input.len();
    let saved = || {
        let dir = repo().join("target/fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let name: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(60)
            .collect();
        let path = dir.join(name);
        let _ = std::fs::write(&path, input);
        path.display().to_string()
    };
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-case".into())
        .spawn(move || {
            LARGEST.with(|l| l.set(0));
            WATCHING.with(|w| w.set(true));
            let outcome = catch_unwind(AssertUnwindSafe(case));
            WATCHING.with(|w| w.set(false));
            let _ = tx.send((
                outcome.map_err(|p| panic_text(&p)),
                LARGEST.with(|l| l.get()),
            ));
        })
        .unwrap();
    match rx.recv_timeout(CASE_TIME) {
        Ok((Ok(Ok(())), largest)) => {
            assert!(largest <= allowance(input_bytes), "{what}: allocated {largest} bytes at once for an input of {input_bytes} bytes (saved as {})", saved())
        }
        Ok((Ok(Err(e)), _)) => panic!("{what}: {e} (saved as {})", saved()),
        Ok((Err(panic), _)) => panic!("{what}: panicked: {panic} (saved as {})", saved()),
        Err(_) => panic!(
            "{what}: did not finish within {CASE_TIME:?} (a hang?) (saved as {})",
            saved()
        ),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// One mutation of `valid`, chosen by `rng`. `numbers` marks text formats (JSON) whose digits
/// are worth replacing with hostile numbers.
fn mutate(rng: &mut Rng, valid: &[u8], json: bool) -> Vec<u8> {
    let mut b = valid.to_vec();
    let pick = |rng: &mut Rng, n: usize| {
        if n == 0 {
            0
        } else {
            (rng.next_u64() % n as u64) as usize
        }
    };
    let rounds = 1 + pick(rng, 3);
    for _ in 0..rounds {
        match pick(rng, if json { 7 } else { 6 }) {
            // Bit flips.
            0 => {
                for _ in 0..1 + pick(rng, 8) {
                    if !b.is_empty() {
                        let i = pick(rng, b.len());
                        b[i] ^= 1 << pick(rng, 8);
                    }
                }
            }
            // Truncation.
            1 => {
                let n = pick(rng, b.len() + 1);
                b.truncate(n);
            }
            // A little-endian length field: overwrite 8 bytes (the safetensors header length at
            // 0, or any aligned word) with a hostile value.
            2 => {
                let values = [
                    0u64,
                    1,
                    7,
                    8,
                    u32::MAX as u64,
                    u64::MAX,
                    1 << 40,
                    b.len() as u64,
                    b.len() as u64 + 1,
                    (b.len() as u64).saturating_sub(9),
                ];
                let v = values[pick(rng, values.len())];
                let at = if pick(rng, 2) == 0 {
                    0
                } else {
                    pick(rng, b.len() / 8 + 1) * 8
                };
                if at + 8 <= b.len() {
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            // Splice: copy a chunk to another place.
            3 => {
                if !b.is_empty() {
                    let from = pick(rng, b.len());
                    let len = 1 + pick(rng, (b.len() - from).min(256));
                    let chunk = b[from..from + len].to_vec();
                    let to = pick(rng, b.len() + 1);
                    b.splice(to..to, chunk);
                }
            }
            // Delete a range.
            4 => {
                if !b.is_empty() {
                    let from = pick(rng, b.len());
                    let len = 1 + pick(rng, (b.len() - from).min(64));
                    b.drain(from..from + len);
                }
            }
            // Random bytes in place.
            5 => {
                for _ in 0..1 + pick(rng, 16) {
                    if !b.is_empty() {
                        let i = pick(rng, b.len());
                        b[i] = rng.next_u64() as u8;
                    }
                }
            }
            // JSON: replace a number (a shape, an offset, a size, an id) with a hostile one.
            _ => {
                let starts: Vec<usize> = (0..b.len())
                    .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
                    .collect();
                if !starts.is_empty() {
                    let s = starts[pick(rng, starts.len())];
                    let e = (s..b.len())
                        .find(|&i| !b[i].is_ascii_digit())
                        .unwrap_or(b.len());
                    let hostile = [
                        "0",
                        "-1",
                        "1",
                        "4294967296",
                        "18446744073709551615",
                        "99999999999999999999999",
                        "1e400",
                        "0.5",
                        "null",
                        "[]",
                        "\"x\"",
                        "65",
                    ];
                    let h = hostile[pick(rng, hostile.len())];
                    b.splice(s..e, h.bytes());
                }
            }
        }
    }
    b
}

/// Fixtures kept from earlier failures, for `reader` (files `tests/fixtures/fuzz/<reader>-*`).
fn fixtures(reader: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = repo().join("tests/fixtures/fuzz");
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{reader}-")))
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    out
}

/// The inputs of one reader: its fixtures, then `cases` mutations of each valid input.
fn inputs(reader: &str, valid: &[Vec<u8>], cases: usize, json: bool) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = fixtures(reader)
        .into_iter()
        .map(|(p, b)| (p.display().to_string(), b))
        .collect();
    for (v, bytes) in valid.iter().enumerate() {
        let mut rng = Rng::new(&[eva::rng::name_key(reader), v as u64]);
        for i in 0..cases {
            out.push((
                format!("{reader} case {i} of valid input {v} (seed [{reader}, {v}])"),
                mutate(&mut rng, bytes, json),
            ));
        }
    }
    out
}

#[test]
fn activation_shards() {
    let tmp = tempdir();
    let valid_dir = tmp.path().join("valid");
    std::fs::create_dir_all(&valid_dir).unwrap();
    let mut valid = Vec::new();
    for (u, fmt) in [Fmt::F32, Fmt::BF16, Fmt::F16].into_iter().enumerate() {
        let x = gen_rows(1, u as u64, 6, &power_law(4, 1.0), 0.5);
        let y = gen_rows(2, u as u64, 6, &power_law(3, 1.0), 0.0);
        let p = valid_dir.join(format!("u{u}.safetensors"));
        write_shard(
            &p,
            &[
                ("a.fc".into(), x.clone(), 2),
                ("b.fc".into(), y, 5),
                ("c.fc".into(), x, 2),
            ],
            fmt,
        );
        valid.push(std::fs::read(&p).unwrap());
    }
    let good = valid[0].clone();
    for (i, (what, bytes)) in inputs("shard", &valid, 700, false).into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        // The mutated file is unit 1 of 2: the catalog comes from a valid unit 0 or from it.
        let order = i % 2;
        std::fs::write(dir.join(format!("u{order}.safetensors")), &bytes).unwrap();
        std::fs::write(dir.join(format!("u{}.safetensors", 1 - order)), &good).unwrap();
        run_case(&what, &bytes, move || {
            if let Ok(mut src) = ShardSource::open(&dir) {
                let wanted = vec![true; src.catalog().inputs.len()];
                for u in 0..src.units() {
                    let _ = src.read(&[u], &wanted, &mut |_, rows| {
                        std::hint::black_box(rows.to_host()?.sum());
                        Ok(())
                    });
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        });
    }
}

/// Copies a model directory and replaces `file` with `bytes`.
fn model_with(src: &Path, dst: &Path, file: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        if e.file_name() != "reference.safetensors" {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(dst.join(file), bytes).unwrap();
}

/// Opens a model source and runs one pass of four short examples.
fn open_and_run(dir: &Path, data: &Path) -> Result<(), String> {
    let opts = ModelOptions {
        text_field: None,
        max_seq_len: 32,
        use_label_mask: true,
    };
    let Ok(model) = eva::model::Model::open(dir) else {
        return Ok(());
    };
    let blocks = 0..model.layers();
    if let Ok(mut src) = ModelSource::open(model, data, &opts, blocks) {
        let wanted = vec![true; src.catalog().inputs.len()];
        let units: Vec<usize> = (0..src.units().min(4)).collect();
        let _ = src.read(&units, &wanted, &mut |_, rows| {
            std::hint::black_box(rows.to_host()?.sum());
            Ok(())
        });
    }
    Ok(())
}

/// Mutates `file` of the model directories `models` and opens and runs each.
fn model_files(reader: &str, models: &[PathBuf], file: &str, cases: usize, json: bool) {
    let tmp = tempdir();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "The city plans to plant trees.\nA second example, longer than the first one.\nthree\nfour words here\n").unwrap();
    let valid: Vec<Vec<u8>> = models
        .iter()
        .map(|m| std::fs::read(m.join(file)).unwrap())
        .collect();
    let all = inputs(reader, &valid, cases, json);
    let per_model = all.len() / models.len().max(1) + 1;
    for (i, (what, bytes)) in all.into_iter().enumerate() {
        let model = &models[(i / per_model).min(models.len() - 1)];
        let dir = tmp.path().join(format!("case{i}"));
        model_with(model, &dir, file, &bytes);
        let data = data.clone();
        run_case(
            &format!("{what} ({} of {})", file, model.display()),
            &bytes,
            move || {
                let r = open_and_run(&dir, &data);
                let _ = std::fs::remove_dir_all(&dir);
                r
            },
        );
    }
}

#[test]
fn checkpoint_files() {
    // A single-file BF16 checkpoint and an F32 one.
    model_files(
        "checkpoint",
        &[repo().join("examples/tiny-llama"), fixture("bert")],
        "model.safetensors",
        250,
        false,
    );
}

#[test]
fn sharded_checkpoint_index() {
    model_files(
        "index",
        &[fixture("llama")],
        "model.safetensors.index.json",
        300,
        true,
    );
}

#[test]
fn config_json() {
    model_files(
        "config",
        &[repo().join("examples/tiny-llama"), fixture("bert")],
        "config.json",
        400,
        true,
    );
}

#[test]
fn tokenizer_json() {
    model_files(
        "tokenizer",
        &[repo().join("examples/tiny-llama"), fixture("bert")],
        "tokenizer.json",
        150,
        true,
    );
}

#[test]
fn jsonl_data() {
    let tmp = tempdir();
    let valid = vec![
        std::fs::read(reference_data()).unwrap(),
        b"{\"prompt\": \"Q: two plus two?\\n\", \"completion\": \"A: four\"}\n{\"text\": \"plain \\u00e9t\\u00e9 text\"}\n\n".to_vec(),
    ];
    let encoder =
        std::sync::Arc::new(TextEncoder::open(&repo().join("examples/tiny-llama"), 64).unwrap());
    for (i, (what, bytes)) in inputs("jsonl", &valid, 1500, true).into_iter().enumerate() {
        let path = tmp.path().join(format!("case{i}.jsonl"));
        std::fs::write(&path, &bytes).unwrap();
        let encoder = encoder.clone();
        run_case(&what, &bytes, move || {
            if let Ok(ex) = read_examples(&path, None) {
                for (j, item) in ex.items.iter().enumerate() {
                    let enc = encoder
                        .encode(item, || format!("example {j}"))
                        .map_err(|e| e.to_string())?;
                    if enc.ids.len() > 64 || enc.ids.len() != enc.labelled.len() {
                        return Err(format!(
                            "example {j}: {} ids, {} labels (max 64)",
                            enc.ids.len(),
                            enc.labelled.len()
                        ));
                    }
                    if let Example::Text(_) = item {
                        if enc.labelled.iter().any(|&l| !l) {
                            return Err(format!("example {j}: plain text with masked tokens"));
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
            Ok(())
        });
    }
}

#[test]
fn wire_messages() {
    use eva::comm::codec::{Reader, Writer};
    let mut w = Writer::default();
    w.u8(3)
        .u64(1 << 33)
        .f64s(&[1.5, -2.0, 3.25])
        .f32s(&[0.5; 7])
        .bytes(b"a message")
        .bools(&[true, false, true]);
    let spectrum = {
        // A valid spectra message, built as the engine encodes one.
        let mut s = Writer::default();
        s.u64(1)
            .u64(4)
            .f64s(&[3.0, 1.0])
            .u64(3)
            .f64s(&[0.1; 6])
            .f64s(&[1e-9, 1e-8])
            .f64s(&[5.0])
            .u64(42)
            .u8(1)
            .u64(16)
            .f64s(&[0.01, 0.02]);
        s.0
    };
    for (what, bytes) in inputs("wire", &[w.0.clone(), spectrum], 3000, false) {
        let input = bytes.clone();
        run_case(&what, &input, move || {
            let mut r = Reader::new(&bytes);
            let _ = (|| -> eva::Result<()> {
                r.u8()?;
                r.u64()?;
                r.f64s()?;
                r.f32s()?;
                r.bytes()?;
                r.bools()?;
                Ok(())
            })();
            let _ = eva::engine::messages::decode_spectra(&bytes);
            Ok(())
        });
    }
}

#[test]
fn the_mutator_changes_inputs_and_is_deterministic() {
    let valid = std::fs::read(repo().join("examples/tiny-llama/config.json")).unwrap();
    let a = inputs("selfcheck", std::slice::from_ref(&valid), 200, true);
    let b = inputs("selfcheck", std::slice::from_ref(&valid), 200, true);
    assert_eq!(a, b, "same seeds, same inputs");
    let changed = a.iter().filter(|(_, m)| *m != valid).count();
    assert!(
        changed >= 190,
        "only {changed} of 200 mutations changed the input"
    );
    let parse_errors = a
        .iter()
        .filter(|(_, m)| serde_json::from_slice::<serde_json::Value>(m).is_err())
        .count();
    assert!(
        parse_errors > 20 && parse_errors < 190,
        "{parse_errors} of 200 are not JSON: mutations should be both fatal and subtle"
    );
}

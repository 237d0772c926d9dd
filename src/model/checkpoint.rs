//! A HuggingFace checkpoint's tensors: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, memory-mapped; F32, F16 and BF16 decoded to f32 on use.
//! Pickled `pytorch_model.bin` checkpoints are refused with the command that converts them.

use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names of a single-file checkpoint and of the shard index.
pub const SINGLE: &str = "model.safetensors";
/// The shard index (`weight_map`: tensor name -> file).
pub const INDEX: &str = "model.safetensors.index.json";

/// One tensor inside a mapped checkpoint file.
#[derive(Clone)]
pub struct HostTensor {
    /// Key in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// The file's memory map.
    pub map: Arc<memmap2::Mmap>,
    /// Byte range of the data in `map`.
    pub range: Range<usize>,
    /// File index in [`Checkpoint::files`].
    pub file: usize,
}

impl HostTensor {
    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses a tensor holding NaN or infinity, naming it and the first bad element. An OR
    /// over exponent bits (all ones = NaN or infinity) vectorizes: ~memory bandwidth.
    pub fn check_finite(&self) -> Result<()> {
        let b = self.bytes();
        let (width, mask): (usize, u32) = match self.dtype {
            Dtype::F32 => (4, 0x7f80_0000),
            Dtype::F16 => (2, 0x7c00),
            Dtype::BF16 => (2, 0x7f80),
            _ => return Ok(()),
        };
        let word = |c: &[u8]| {
            if width == 4 {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u16::from_le_bytes([c[0], c[1]]) as u32
            }
        };
        let bad = |c: &[u8]| (word(c) & mask == mask) as u32;
        let any = if width == 4 {
            b.chunks_exact(4).fold(0, |a, c| a | bad(c))
        } else {
            b.chunks_exact(2).fold(0, |a, c| a | bad(c))
        };
        if any == 0 {
            return Ok(());
        }
        let i = b
            .chunks_exact(width)
            .position(|c| bad(c) == 1)
            .expect("a non-finite element was seen");
        let v = match self.dtype {
            Dtype::F32 => f32::from_bits(word(&b[i * 4..])),
            Dtype::F16 => half::f16::from_bits(word(&b[i * 2..]) as u16).to_f32(),
            _ => half::bf16::from_bits(word(&b[i * 2..]) as u16).to_f32(),
        };
        let cols = self
            .shape
            .last()
            .copied()
            .filter(|&c| c > 0 && self.shape.len() > 1);
        let at = cols.map_or(format!("element {i}"), |c| {
            format!("row {}, column {}", i / c, i % c)
        });
        Err(Error::data(format!(
            "checkpoint tensor {} ({:?}, shape {:?}): non-finite weight {v} at {at}; the checkpoint is damaged or was saved after a diverged step",
            self.name, self.dtype, self.shape
        )))
    }

    /// Decodes F32 / F16 / BF16 into f32 after [`HostTensor::check_finite`]; any other dtype is
    /// an error naming the tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_finite()?;
        let b = self.bytes();
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            other => {
                return Err(Error::data(format!(
                    "checkpoint tensor {}: dtype {other:?} is not supported (expected F32, F16 or BF16)",
                    self.name
                )))
            }
        })
    }
}

/// All tensors of a checkpoint directory, by key.
pub struct Checkpoint {
    /// The model directory.
    pub dir: PathBuf,
    /// The safetensors files read (one, or the shards).
    pub files: Vec<PathBuf>,
    tensors: HashMap<String, HostTensor>,
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::io("cannot open checkpoint file", path, e))?;
    // SAFETY: read-only private map; the checkpoint must not change while eva runs.
    unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io("cannot map checkpoint file", path, e))
}

/// The refusal for a pickled checkpoint, with the conversion command for its class.
fn pickle_error(dir: &Path, found: &str) -> Error {
    let class = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_else(|| "AutoModel".to_string());
    let d = dir.display();
    Error::data(format!(
        "model directory {d} holds a PyTorch pickle checkpoint ({found}) and no safetensors; eva reads only safetensors \
         (a pickle can run code when loaded). Convert it once with: python -c \"import transformers as t; \
         t.{class}.from_pretrained('{d}').save_pretrained('{d}-safetensors'); \
         t.AutoTokenizer.from_pretrained('{d}').save_pretrained('{d}-safetensors')\" and pass --model {d}-safetensors"
    ))
}

impl Checkpoint {
    /// Finds and maps the checkpoint files of `dir` and indexes their tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::data(format!(
                "model directory {} does not exist or is not a directory (expected config.json, model.safetensors and tokenizer.json)",
                dir.display()
            )));
        }
        let index_path = dir.join(INDEX);
        let (files, weight_map): (Vec<PathBuf>, Option<BTreeMap<String, String>>) = if index_path
            .is_file()
        {
            let bytes = std::fs::read(&index_path)
                .map_err(|e| Error::io("cannot read shard index", &index_path, e))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                Error::data(format!(
                    "shard index {}: not valid JSON: {e}",
                    index_path.display()
                ))
            })?;
            let map: BTreeMap<String, String> = serde_json::from_value(v["weight_map"].clone()).map_err(|e| {
                Error::data(format!(
                    "shard index {}: `weight_map` must be an object of tensor name -> file name: {e}",
                    index_path.display()
                ))
            })?;
            let mut names: Vec<&String> = map.values().collect();
            names.sort();
            names.dedup();
            (names.into_iter().map(|n| dir.join(n)).collect(), Some(map))
        } else if dir.join(SINGLE).is_file() {
            (vec![dir.join(SINGLE)], None)
        } else {
            for pickle in [
                "pytorch_model.bin",
                "pytorch_model.bin.index.json",
                "model.bin",
                "tf_model.h5",
                "model.pt",
            ] {
                if dir.join(pickle).exists() {
                    return Err(pickle_error(dir, pickle));
                }
            }
            return Err(Error::data(format!(
                "model directory {} has neither {SINGLE} nor {INDEX} (expected a HuggingFace safetensors checkpoint)",
                dir.display()
            )));
        };

        let mut tensors = HashMap::new();
        for (f, path) in files.iter().enumerate() {
            if !path.is_file() {
                return Err(Error::data(format!(
                    "checkpoint shard {} is listed in {INDEX} but missing",
                    path.display()
                )));
            }
            let map = Arc::new(map_file(path)?);
            let st = SafeTensors::deserialize(&map).map_err(|e| {
                Error::data(format!(
                    "checkpoint file {}: not a valid safetensors file ({} bytes): {e}",
                    path.display(),
                    map.len()
                ))
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let t = HostTensor {
                    name: name.clone(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    map: map.clone(),
                    range: start..start + view.data().len(),
                    file: f,
                };
                tensors.insert(name, t);
            }
        }
        if let Some(wm) = &weight_map {
            for (name, file) in wm {
                match tensors.get(name) {
                    Some(t)
                        if files[t.file]
                            .file_name()
                            .is_some_and(|n| n == file.as_str()) => {}
                    _ => return Err(Error::data(format!(
                        "checkpoint: {INDEX} maps tensor {name} to {file}, which does not hold it"
                    ))),
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    /// A tensor by key, if present.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// A tensor that must be present, with the expected shape (`None` entries match anything).
    pub fn expect(&self, name: &str, shape: &[Option<usize>]) -> Result<&HostTensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::data(format!(
                "checkpoint in {}: tensor {name} is missing (config.json says it should exist)",
                self.dir.display()
            ))
        })?;
        let ok = t.shape.len() == shape.len()
            && t.shape
                .iter()
                .zip(shape)
                .all(|(&a, b)| b.is_none_or(|b| a == b));
        if !ok {
            let want: Vec<String> = shape
                .iter()
                .map(|d| d.map_or("?".into(), |d| d.to_string()))
                .collect();
            return Err(Error::data(format!(
                "checkpoint tensor {name}: expected shape [{}] from config.json, found {:?}",
                want.join(", "),
                t.shape
            )));
        }
        Ok(t)
    }

    /// Every tensor key, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The prefix in front of `suffix` in the one key that ends with it (`model.` for
    /// `model.embed_tokens.weight`, `` for `embed_tokens.weight`).
    pub fn prefix_of(&self, suffix: &str) -> Option<String> {
        let mut found: Vec<&str> = self
            .tensors
            .keys()
            .filter(|k| {
                k.as_str() == suffix
                    || (k.ends_with(suffix) && k.as_bytes()[k.len() - suffix.len() - 1] == b'.')
            })
            .map(|k| &k[..k.len() - suffix.len()])
            .collect();
        found.sort_unstable_by_key(|p| p.len());
        found.first().map(|p| p.to_string())
    }

    /// Bytes of tensor data in the files, per dtype name.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for t in self.tensors.values() {
            *out.entry(format!("{:?}", t.dtype)).or_insert(0) += t.range.len() as u64;
        }
        out
    }
}

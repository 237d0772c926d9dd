//! A HuggingFace checkpoint's tensors: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, memory-mapped; F32, F16 and BF16 decoded to f32 on use.
//! Pickled `pytorch_model.bin` checkpoints are refused with the command that converts them.

use crate::device::host::HostTensor;
use crate::{Error, Result};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names of a single-file checkpoint and of the shard index.
pub const SINGLE: &str = "model.safetensors";
/// The shard index (`weight_map`: tensor name -> file).
pub const INDEX: &str = "model.safetensors.index.json";

/// A checkpoint directory: which file holds every tensor, and the tensors of the files opened
/// so far. [`Checkpoint::open`] reads the shard index (or the one file's header) without opening
/// a shard; [`Checkpoint::load`] maps only the files that hold the tensors a rank's layer slice
/// needs, so a shard of other blocks is never opened or read.
pub struct Checkpoint {
    /// The model directory.
    pub dir: PathBuf,
    /// Every safetensors file of the checkpoint (one, or the shards of the index).
    pub files: Vec<PathBuf>,
    /// The file (index into `files`) of every tensor key.
    locations: BTreeMap<String, usize>,
    /// Files mapped so far.
    opened: Vec<bool>,
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

/// The tensors of one mapped safetensors file.
fn read_file(path: &Path, f: usize) -> Result<Vec<HostTensor>> {
    let map = Arc::new(map_file(path)?);
    let st = SafeTensors::deserialize(&map).map_err(|e| {
        Error::data(format!(
            "checkpoint file {}: not a valid safetensors file ({} bytes): {e}",
            path.display(),
            map.len()
        ))
    })?;
    let base = map.as_ptr() as usize;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let start = view.data().as_ptr() as usize - base;
            HostTensor {
                name,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                map: map.clone(),
                range: start..start + view.data().len(),
                file: f,
            }
        })
        .collect())
}

impl Checkpoint {
    /// Finds the checkpoint files of `dir` and the file of every tensor. With a shard index no
    /// shard is opened; a single-file checkpoint is mapped and its header read.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::data(format!(
                "model directory {} does not exist or is not a directory (expected config.json, model.safetensors and tokenizer.json)",
                dir.display()
            )));
        }
        let index_path = dir.join(INDEX);
        if index_path.is_file() {
            let bytes = std::fs::read(&index_path)
                .map_err(|e| Error::io("cannot read shard index", &index_path, e))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                Error::data(format!(
                    "shard index {}: not valid JSON: {e}",
                    index_path.display()
                ))
            })?;
            let map: BTreeMap<String, String> = serde_json::from_value(v["weight_map"].clone()).map_err(|e| {
                Error::data(format!("shard index {}: `weight_map` must be an object of tensor name -> file name: {e}", index_path.display()))
            })?;
            let mut names: Vec<&String> = map.values().collect();
            names.sort();
            names.dedup();
            if let Some(bad) = names.iter().find(|n| {
                Path::new(n.as_str())
                    .file_name()
                    .is_none_or(|f| f != n.as_str())
            }) {
                return Err(Error::data(format!(
                    "shard index {}: file name `{bad}` must name a file in the model directory",
                    index_path.display()
                )));
            }
            let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n.as_str())).collect();
            let locations = map
                .iter()
                .map(|(t, f)| (t.clone(), names.binary_search(&f).expect("listed above")))
                .collect();
            return Ok(Checkpoint {
                dir: dir.to_path_buf(),
                opened: vec![false; files.len()],
                files,
                locations,
                tensors: HashMap::new(),
            });
        }
        if dir.join(SINGLE).is_file() {
            let mut c = Checkpoint {
                dir: dir.to_path_buf(),
                files: vec![dir.join(SINGLE)],
                locations: BTreeMap::new(),
                opened: vec![false],
                tensors: HashMap::new(),
            };
            c.open_file(0)?;
            c.locations = c.tensors.keys().map(|k| (k.clone(), 0)).collect();
            return Ok(c);
        }
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
        Err(Error::data(format!("model directory {} has neither {SINGLE} nor {INDEX} (expected a HuggingFace safetensors checkpoint)", dir.display())))
    }

    /// Maps file `f` and indexes its tensors, checking them against the shard index.
    fn open_file(&mut self, f: usize) -> Result<()> {
        let path = &self.files[f];
        if !path.is_file() {
            return Err(Error::data(format!(
                "checkpoint shard {} is listed in {INDEX} but missing",
                path.display()
            )));
        }
        for t in read_file(path, f)? {
            // With an index, a tensor belongs to the file the index names (a stray copy elsewhere is ignored).
            if self.locations.get(&t.name).is_none_or(|&at| at == f) {
                self.tensors.insert(t.name.clone(), t);
            }
        }
        let missing = self
            .locations
            .iter()
            .find(|(name, &at)| at == f && !self.tensors.contains_key(*name));
        if let Some((name, _)) = missing {
            let file = self.files[f]
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            return Err(Error::data(format!(
                "checkpoint: {INDEX} maps tensor {name} to {file}, which does not hold it"
            )));
        }
        self.opened[f] = true;
        Ok(())
    }

    /// Maps the files that hold any tensor `keep` selects, and only those.
    pub fn load(&mut self, keep: impl Fn(&str) -> bool) -> Result<()> {
        let mut wanted = vec![false; self.files.len()];
        for (name, &f) in &self.locations {
            wanted[f] |= keep(name);
        }
        for (f, wanted) in wanted.into_iter().enumerate() {
            if wanted && !self.opened[f] {
                self.open_file(f)?;
            }
        }
        Ok(())
    }

    /// The files mapped so far.
    pub fn opened_files(&self) -> Vec<&Path> {
        self.files
            .iter()
            .zip(&self.opened)
            .filter(|(_, &o)| o)
            .map(|(p, _)| p.as_path())
            .collect()
    }

    /// Whether the checkpoint has a tensor of this key (loaded or not).
    pub fn has(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// A loaded tensor by key, if present.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// A loaded tensor that must be present, with the expected shape (`None` entries match anything).
    pub fn expect(&self, name: &str, shape: &[Option<usize>]) -> Result<&HostTensor> {
        let t = self.tensors.get(name).ok_or_else(|| match self.locations.get(name) {
            Some(&f) => Error::data(format!(
                "checkpoint in {}: tensor {name} (in {}) was not loaded on this rank (its file is outside this rank's layer slice)",
                self.dir.display(),
                self.files[f].display()
            )),
            None => Error::data(format!("checkpoint in {}: tensor {name} is missing (config.json says it should exist)", self.dir.display())),
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

    /// Every tensor key (loaded or not), sorted.
    pub fn names(&self) -> Vec<&str> {
        self.locations.keys().map(String::as_str).collect()
    }

    /// The prefix in front of `suffix` in the one key that ends with it (`model.` for
    /// `model.embed_tokens.weight`, `` for `embed_tokens.weight`).
    pub fn prefix_of(&self, suffix: &str) -> Option<String> {
        let mut found: Vec<&str> = self
            .locations
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

    /// Bytes of tensor data per dtype name, over the tensors `keep` selects among those loaded.
    pub fn bytes_by_dtype(&self, keep: impl Fn(&str) -> bool) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for t in self.tensors.values().filter(|t| keep(&t.name)) {
            *out.entry(format!("{:?}", t.dtype)).or_insert(0) += t.range.len() as u64;
        }
        out
    }
}

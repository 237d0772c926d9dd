//! Serializes the adapter and writes the output directory atomically: files go to a temporary
//! directory beside the target and are renamed into place only when all are complete.

use super::Adapter;
use crate::{Error, Result};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Weights file PEFT reads.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Config file PEFT reads.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// eva's own report.
pub const REPORT_FILE: &str = "eva_report.json";

struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &F32Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `adapter_model.safetensors`: `base_model.model.<path>.lora_A.weight` `[rank, in]` and
/// `...lora_B.weight` `[out, rank]` (zeros), F32, metadata `{"format": "pt"}`.
pub fn safetensors_bytes(adapter: &Adapter) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for l in &adapter.layers {
        let a_bytes: Vec<u8> = l.a.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((
            format!("base_model.model.{}.lora_A.weight", l.name),
            F32Tensor {
                shape: vec![l.rank, l.a.ncols()],
                bytes: a_bytes,
            },
        ));
        tensors.push((
            format!("base_model.model.{}.lora_B.weight", l.name),
            F32Tensor {
                shape: vec![l.out_features, l.rank],
                bytes: vec![0u8; 4 * l.out_features * l.rank],
            },
        ));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta))
        .map_err(|e| Error::data(format!("cannot serialize {WEIGHTS_FILE}: {e}")))
}

/// Refuses an existing `out` unless `force` (checked before any work and again when writing).
pub fn check_target(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Error::usage(format!(
            "output directory {} already exists; pass --force to replace it",
            out.display()
        )));
    }
    if out.exists() && !out.is_dir() {
        return Err(Error::usage(format!(
            "output path {} exists and is not a directory",
            out.display()
        )));
    }
    Ok(())
}

fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| {
        Error::usage(format!(
            "output path {} has no directory name",
            out.display()
        ))
    })?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Writes `files` (name, bytes) into `out` atomically; an existing `out` is replaced only with
/// `force`. On any failure nothing is left behind and an existing `out` is untouched.
pub fn write_dir(out: &Path, force: bool, files: &[(&str, Vec<u8>)]) -> Result<()> {
    check_target(out, force)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io("cannot create parent directory", parent, e))?;
    }
    let tmp = sibling(out, "eva-tmp")?;
    let result = (|| {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| Error::io("cannot remove stale temporary directory", &tmp, e))?;
        }
        std::fs::create_dir(&tmp)
            .map_err(|e| Error::io("cannot create temporary directory", &tmp, e))?;
        for (name, bytes) in files {
            let path = tmp.join(name);
            let mut f =
                std::fs::File::create(&path).map_err(|e| Error::io("cannot create", &path, e))?;
            f.write_all(bytes)
                .map_err(|e| Error::io("cannot write", &path, e))?;
            f.sync_all()
                .map_err(|e| Error::io("cannot sync", &path, e))?;
        }
        if out.exists() {
            let old = sibling(out, "eva-old")?;
            std::fs::rename(out, &old)
                .map_err(|e| Error::io("cannot move aside existing output", out, e))?;
            if let Err(e) = std::fs::rename(&tmp, out) {
                let _ = std::fs::rename(&old, out);
                return Err(Error::io("cannot move output into place", out, e));
            }
            std::fs::remove_dir_all(&old)
                .map_err(|e| Error::io("cannot remove replaced output", &old, e))?;
        } else {
            std::fs::rename(&tmp, out)
                .map_err(|e| Error::io("cannot move output into place", out, e))?;
        }
        Ok(())
    })();
    if result.is_err() && tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

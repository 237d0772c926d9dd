//! Serializes the adapter and writes the output directory atomically: [`prepare`] makes a
//! temporary directory beside `--out` before any work (so an `--out` that cannot be created fails
//! at once) and removes stale ones of dead eva processes; [`Staging::commit`] writes the files into
//! it and renames it into place. [`remove_staged`] is what a signal handler calls.

use super::Adapter;
use crate::owner::Owner;
use crate::{Error, Result};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Weights file PEFT reads.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Config file PEFT reads.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// eva's own report.
pub const REPORT_FILE: &str = "eva_report.json";
/// The report's picture.
pub const SVG_FILE: &str = "eva_report.svg";
/// The model card the Hub reads.
pub const CARD_FILE: &str = "README.md";

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
/// `...lora_B.weight` `[out, rank]` (zeros), F32, metadata `{"format": "pt"}`; a 3-D expert
/// parameter's at its module's path ([`super::tensor_path`]), `[rank · experts, in]` and
/// `[out, rank · experts]`.
pub fn safetensors_bytes(adapter: &Adapter) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for l in &adapter.layers {
        let a_bytes: Vec<u8> = l.a.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = super::tensor_path(&l.name, &adapter.config);
        // A 3-D parameter's lora_A holds `rank` rows per expert.
        let rows = l.a.nrows();
        tensors.push((
            format!("base_model.model.{path}.lora_A.weight"),
            F32Tensor {
                shape: vec![rows, l.a.ncols()],
                bytes: a_bytes,
            },
        ));
        tensors.push((
            format!("base_model.model.{path}.lora_B.weight"),
            F32Tensor {
                shape: vec![l.out_features, rows],
                bytes: vec![0u8; 4 * l.out_features * rows],
            },
        ));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta))
        .map_err(|e| Error::data(format!("cannot serialize {WEIGHTS_FILE}: {e}")))
}

/// Name of the owner marker inside a temporary directory (removed before the rename).
pub const OWNER_FILE: &str = ".eva-owner";

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

fn parent_of(out: &Path) -> &Path {
    out.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn prefix_of(out: &Path, tag: &str) -> Result<String> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::usage(format!("--out {} has no directory name", out.display())))?;
    Ok(format!(".{}.{tag}-", name.to_string_lossy()))
}

fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    Ok(parent_of(out).join(format!("{}{}", prefix_of(out, tag)?, std::process::id())))
}

/// Temporary directories of this process that a signal handler must remove. The lock is held
/// while a staged directory is renamed into place, so a handler never sees half a replacement.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn staged() -> MutexGuard<'static, Vec<PathBuf>> {
    STAGED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temporary output directory this process staged and returns their paths; the
/// registry stays locked (so no commit can start) until the returned guard drops. For signal
/// handlers that exit right after.
pub fn remove_staged() -> (MutexGuard<'static, Vec<PathBuf>>, Vec<PathBuf>) {
    let mut guard = staged();
    let removed: Vec<PathBuf> = guard
        .drain(..)
        .filter(|p| std::fs::remove_dir_all(p).is_ok())
        .collect();
    (guard, removed)
}

/// The first line of a temporary directory's owner marker.
const TITLE: &str = "eva temporary output";

/// Removes `.<name>.eva-tmp-<pid>` directories beside `out` whose marker names a process of this
/// host that no longer runs (or runs no more under that pid). Directories without a readable
/// marker, of other hosts, or of live processes are left alone.
fn remove_stale(out: &Path, me: &Owner) -> Vec<PathBuf> {
    let (Ok(prefix), Ok(entries)) = (prefix_of(out, "eva-tmp"), std::fs::read_dir(parent_of(out)))
    else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|t| Owner::decode(&t, TITLE).map(|(o, _)| o));
        if owner.is_some_and(|o| o.pid == pid && o.is_dead(me))
            && std::fs::remove_dir_all(&path).is_ok()
        {
            removed.push(path);
        }
    }
    removed
}

/// The temporary directory beside `--out` that the adapter is written into. Dropped without
/// [`Staging::commit`], it is removed (with parent directories it created, if still empty).
#[derive(Debug)]
pub struct Staging {
    out: PathBuf,
    tmp: PathBuf,
    force: bool,
    created_parents: Vec<PathBuf>,
    /// Stale temporary directories of dead eva processes that were removed.
    pub removed_stale: Vec<PathBuf>,
}

/// Checks `out` and makes its temporary directory now, before any work: an `--out` that cannot
/// be created (read-only or virtual file system, a parent that is a file) fails here, not after
/// the run. Missing parent directories are created.
pub fn prepare(out: &Path, force: bool) -> Result<Staging> {
    check_target(out, force)?;
    let parent = parent_of(out);
    let mut created_parents = Vec::new();
    let mut p = Some(parent);
    while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        created_parents.push(dir.to_path_buf());
        p = dir.parent();
    }
    if let Some(file) = parent
        .ancestors()
        .find(|a| a.exists())
        .filter(|a| !a.is_dir())
    {
        return Err(Error::usage(format!(
            "--out {}: {} is a file, not a directory",
            out.display(),
            file.display()
        )));
    }
    if !parent.is_dir() {
        if let Err(e) = std::fs::create_dir_all(parent) {
            remove_empty(&created_parents);
            return Err(Error::io(
                "cannot create the parent directory of --out",
                parent,
                e,
            ));
        }
    }
    let tmp = sibling(out, "eva-tmp")?;
    let me = Owner::me();
    let removed_stale = me
        .as_ref()
        .map(|me| remove_stale(out, me))
        .unwrap_or_default();
    let made = (|| {
        if tmp.exists() {
            // Our own pid from an earlier boot or pid cycle: nothing of ours is in it yet.
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| Error::io("cannot remove stale temporary directory", &tmp, e))?;
        }
        std::fs::create_dir(&tmp)
            .map_err(|e| Error::io("cannot create the temporary directory of --out", &tmp, e))?;
        staged().push(tmp.clone());
        if let Some(me) = &me {
            let marker = tmp.join(OWNER_FILE);
            std::fs::write(&marker, me.encode(TITLE))
                .map_err(|e| Error::io("cannot write", &marker, e))?;
        }
        Ok(())
    })();
    let staging = Staging {
        out: out.to_path_buf(),
        tmp,
        force,
        created_parents,
        removed_stale,
    };
    made.map(|_| staging)
}

fn remove_empty(dirs: &[PathBuf]) {
    for d in dirs {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
    }
}

impl Staging {
    /// The temporary directory.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes `files` (name, bytes) into the temporary directory and renames it to `out`; an
    /// `out` that appeared meanwhile is replaced only with `force`. On any failure the temporary
    /// directory is removed and an existing `out` is untouched.
    pub fn commit(self, files: &[(&str, Vec<u8>)]) -> Result<()> {
        check_target(&self.out, self.force)?;
        for (name, bytes) in files {
            let path = self.tmp.join(name);
            let mut f =
                std::fs::File::create(&path).map_err(|e| Error::io("cannot create", &path, e))?;
            f.write_all(bytes)
                .map_err(|e| Error::io("cannot write", &path, e))?;
            f.sync_all()
                .map_err(|e| Error::io("cannot sync", &path, e))?;
        }
        let marker = self.tmp.join(OWNER_FILE);
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(|e| Error::io("cannot remove", &marker, e))?;
        }
        // From here until the rename is complete a signal handler waits.
        let mut registry = staged();
        let (out, tmp) = (&self.out, &self.tmp);
        if out.exists() {
            let old = sibling(out, "eva-old")?;
            std::fs::rename(out, &old)
                .map_err(|e| Error::io("cannot move aside existing output", out, e))?;
            if let Err(e) = std::fs::rename(tmp, out) {
                let _ = std::fs::rename(&old, out);
                return Err(Error::io("cannot move output into place", out, e));
            }
            registry.retain(|p| p != tmp);
            drop(registry);
            std::fs::remove_dir_all(&old)
                .map_err(|e| Error::io("cannot remove replaced output", &old, e))?;
        } else {
            std::fs::rename(tmp, out)
                .map_err(|e| Error::io("cannot move output into place", out, e))?;
            registry.retain(|p| p != tmp);
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let mut registry = staged();
        if registry.contains(&self.tmp) {
            let _ = std::fs::remove_dir_all(&self.tmp);
            registry.retain(|p| p != &self.tmp);
            remove_empty(&self.created_parents);
        }
    }
}

/// Writes `files` into `out` atomically ([`prepare`], then [`Staging::commit`]).
pub fn write_dir(out: &Path, force: bool, files: &[(&str, Vec<u8>)]) -> Result<()> {
    prepare(out, force)?.commit(files)
}

//! What a checkpoint of an `eva init` command line must match: every flag the adapter depends on
//! and the identity of the data and model files (content hashes of the data and configuration
//! files; names, sizes and header hashes of safetensors files, whose headers hold every tensor's
//! name, shape and offset). Output-only flags (`--out`, `--force`, `--base-model`, ...), the
//! thread count and the timeout are left out, so a resumed run may change them.

use super::InitArgs;
use crate::engine::checkpoint::hash_file;
use crate::{Error, Result};
use std::path::Path;

/// `(what, value)` pairs for `args`.
pub fn of(args: &InitArgs) -> Result<Vec<(String, String)>> {
    let mut f: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| f.push((k.to_string(), v));
    put("--rank", args.rank.to_string());
    put("--rank-pattern", format!("{:?}", args.rank_pattern));
    put("--rho", args.rho.to_string());
    put("--tau", args.tau.to_string());
    put("--alpha", args.alpha.to_string());
    put("--whiten", args.whiten.to_string());
    put("--no-adjust-alpha", args.no_adjust_alpha.to_string());
    put("--no-label-mask", args.no_label_mask.to_string());
    put("--lora-dropout", args.lora_dropout.to_string());
    put("--batch-size", args.batch_size.to_string());
    put("--max-steps", format!("{:?}", args.max_steps));
    put("--no-early-stop", args.no_early_stop.to_string());
    put("--refine-converged", args.refine_converged.to_string());
    put("--estimator", format!("{:?}", args.estimator));
    put("--sketch-size", format!("{:?}", args.sketch_size));
    put("--stats-memory", args.stats_memory.to_string());
    put("--seed", args.seed.to_string());
    put("--targets", format!("{:?}", args.targets));
    put("--max-seq-len", args.max_seq_len.to_string());
    put("--text-field", format!("{:?}", args.text_field));
    put("--device", format!("{:?}", args.device));
    put("--dtype", format!("{:?}", args.dtype));
    put("--pp-split", format!("{:?}", args.pp_split));
    if let Some(spec) = &args.synthetic {
        put("--synthetic", spec.to_string());
    }
    if let Some(data) = &args.data {
        put("--data", hash_file(data)?);
    }
    if let Some(dir) = &args.model {
        for name in ["config.json", "tokenizer.json"] {
            let p = dir.join(name);
            if p.is_file() {
                put(&format!("--model {name}"), hash_file(&p)?);
            }
        }
        for (name, id) in safetensors_files(dir)? {
            put(&format!("--model {name}"), id);
        }
    }
    if let Some(dir) = &args.activations {
        for (name, id) in safetensors_files(dir)? {
            put(&format!("--activations {name}"), id);
        }
    }
    Ok(f)
}

/// What every rank of one job must agree on before any work ([`crate::comm::unanimous`]): the
/// checkpoint fingerprint ([`of`]) and the flags that shape the grid and the collectives
/// (`--pp`, checkpointing), but not output-only flags, which only rank 0 reads.
pub fn startup(args: &InitArgs, fingerprint: &[(String, String)]) -> Vec<(String, String)> {
    let mut f = fingerprint.to_vec();
    f.push(("--pp".into(), args.pp.to_string()));
    f.push(("--checkpoint".into(), args.checkpoint.is_some().to_string()));
    if args.checkpoint.is_some() {
        f.push((
            "--checkpoint-every".into(),
            args.checkpoint_every.to_string(),
        ));
        f.push(("--resume".into(), args.resume.to_string()));
    }
    f
}

/// A 64-bit hash of a fingerprint, for the checkpoint directory's owner marker.
pub fn hash(fingerprint: &[(String, String)]) -> String {
    let mut sum = crate::engine::checkpoint::codec::Checksum::new();
    for (k, v) in fingerprint {
        sum.update(format!("{k}={v}\n").as_bytes());
    }
    format!("{:016x}", sum.finish())
}

/// Every `*.safetensors` file of `dir`, in name order, with its size and header hash.
fn safetensors_files(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", dir, e))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let id = header_id(&dir.join(&n))?;
            Ok((n, id))
        })
        .collect()
}

/// `N bytes, header hash H` for a safetensors file (its header is at most 100 MB by the format).
fn header_id(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("reading the size of", path, e))?
        .len();
    let mut len = [0u8; 8];
    let n = u64::from_le_bytes(if size >= 8 {
        file.read_exact(&mut len)
            .map_err(|e| Error::io("reading", path, e))?;
        len
    } else {
        [0; 8]
    });
    let mut header = vec![0u8; n.min(size.saturating_sub(8)).min(100 << 20) as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io("reading", path, e))?;
    let mut sum = crate::engine::checkpoint::codec::Checksum::new();
    sum.update(&header);
    Ok(format!("{size} bytes, header hash {:016x}", sum.finish()))
}

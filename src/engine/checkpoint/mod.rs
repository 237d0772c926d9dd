//! Checkpoints of the step loop (`--checkpoint DIR`): every rank writes its own state after a
//! step, so that a preempted or killed run continues with `--resume` and writes bitwise the
//! adapter the uninterrupted run would have written.
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `DIR/step-SSSSSSSS/rank-RRRRR.ckpt` | world rank R | the run's fingerprint, the step, the decision, the statistics of R's stage inputs (its own Grams, which never move, and the all-reduced parts), warm starts; the stage leader's previous estimates; the global leader's state on rank 0 |
//! | `DIR/.eva-owner` | world rank 0, while the run lasts | the holder's pid, host, boot id, start time, run fingerprint hash ([`owner`]) |
//!
//! A file appears complete or not at all (written beside, synced, renamed). A step's checkpoint
//! is complete when every rank's file is there; after every rank has written step S, each rank
//! removes its files of earlier steps, so the last complete checkpoint survives a kill at any
//! moment, on a shared file system or on node-local disks alike. On resume the ranks agree on the
//! latest step every one of them holds ([`codec`] has the encoding, [`state`] what is saved).
//! A write that fails removes what it started ([`discard_step`]). One run at a time holds a
//! directory: rank 0 takes `DIR/.eva-owner` ([`owner`]) before anything is written there.

pub mod codec;
pub mod owner;
pub mod state;
pub mod sync;

pub use sync::Written;

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// Seconds a signalled rank waits for the step under way to end and its checkpoint to be written
/// before it exits anyway (a second signal exits at once).
pub const SIGNAL_GRACE: Duration = Duration::from_secs(120);

static ARMED: AtomicBool = AtomicBool::new(false);
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Tells the signal handler that a run with checkpoints is under way: a signal then asks for a
/// checkpoint at the end of the step instead of exiting at once.
pub fn arm() {
    ARMED.store(true, Ordering::SeqCst);
}

/// Whether [`arm`] was called.
pub fn armed() -> bool {
    ARMED.load(Ordering::SeqCst)
}

/// Asks the step loop to write a checkpoint after the step under way and stop (signal `sig`).
pub fn request_stop(sig: i32) {
    REQUESTED.store(sig, Ordering::SeqCst);
}

/// The signal that asked the loop to stop, if one did.
pub fn stop_requested() -> Option<i32> {
    Some(REQUESTED.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// The directory of step `step`'s checkpoint.
pub fn step_dir(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}

/// World rank `rank`'s file of step `step`.
pub fn rank_file(dir: &Path, step: usize, rank: usize) -> PathBuf {
    step_dir(dir, step).join(format!("rank-{rank:05}.ckpt"))
}

/// The file a rank writes before renaming it to [`rank_file`].
fn partial_file(dir: &Path, step: usize, rank: usize) -> PathBuf {
    step_dir(dir, step).join(format!(".rank-{rank:05}.ckpt.partial"))
}

/// The steps of the step directories in `dir`, complete or not, in no particular order.
fn step_dirs(dir: &Path) -> impl Iterator<Item = usize> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
}

/// The steps in `dir` for which `rank`'s file is complete, ascending.
pub fn complete_steps(dir: &Path, rank: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = step_dirs(dir)
        .filter(|&step| rank_file(dir, step, rank).is_file())
        .collect();
    steps.sort_unstable();
    steps
}

/// Directories [`check_writable`] created for the checkpoint directory; dropped without
/// [`Created::keep`], they are removed again (deepest first, as long as they are empty), so that
/// a run that stops before it writes anything leaves nothing behind.
#[derive(Debug, Default)]
pub struct Created(Vec<PathBuf>);

impl Created {
    /// The run went on to use the directory: keep it.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for d in &self.0 {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

/// Fails fast, before the data is read, unless `dir` can hold this rank's checkpoints: creates
/// it (and missing parents) and writes and removes a probe file named after this rank and
/// process, which no other run's file can be. Touches nothing else in `dir`: another run may
/// hold it ([`owner`]).
pub fn check_writable(dir: &Path, rank: usize) -> Result<Created> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating checkpoint directory", dir, e))?;
    let created = Created(missing);
    let probe = dir.join(format!(".probe-rank-{rank:05}-{}", std::process::id()));
    std::fs::write(&probe, b"eva")
        .map_err(|e| Error::io("writing to the checkpoint directory", &probe, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io("removing", &probe, e))?;
    Ok(created)
}

/// Once this run holds `dir` ([`owner::claim`]): checks it as [`check_writable`] does and
/// removes this rank's partial files of an interrupted write.
pub fn prepare(dir: &Path, rank: usize) -> Result<()> {
    check_writable(dir, rank)?.keep();
    for step in step_dirs(dir) {
        let partial = partial_file(dir, step, rank);
        if partial.exists() {
            std::fs::remove_file(&partial).map_err(|e| Error::io("removing", &partial, e))?;
        }
    }
    Ok(())
}

/// Writes this rank's file of `step` through `fill` (beside, synced, renamed into place, the
/// directory synced); returns its size in bytes. A write that fails (a full disk, a file size
/// limit, an I/O error) removes its partial file and the step directory if that is left empty,
/// so nothing of it stays behind.
pub fn write_rank_file(
    dir: &Path,
    step: usize,
    rank: usize,
    fill: impl FnOnce(&mut codec::Encoder<std::io::BufWriter<std::fs::File>>) -> Result<()>,
) -> Result<u64> {
    let sdir = step_dir(dir, step);
    let (partial, done) = (partial_file(dir, step, rank), rank_file(dir, step, rank));
    let written = (|| {
        std::fs::create_dir_all(&sdir)
            .map_err(|e| Error::io("creating checkpoint directory", &sdir, e))?;
        let file =
            std::fs::File::create(&partial).map_err(|e| Error::io("creating", &partial, e))?;
        let mut enc =
            codec::Encoder::new(std::io::BufWriter::with_capacity(1 << 20, file), &partial)?;
        fill(&mut enc)?;
        let file = enc
            .finish()?
            .into_inner()
            .map_err(|e| Error::io("writing checkpoint", &partial, e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io("syncing checkpoint", &partial, e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("reading the size of", &partial, e))?
            .len();
        drop(file);
        std::fs::rename(&partial, &done)
            .map_err(|e| Error::io("renaming checkpoint", &partial, e))?;
        Ok(size)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
        // Empty unless another rank's file of this step is in it.
        let _ = std::fs::remove_dir(&sdir);
        return written;
    }
    if let Ok(d) = std::fs::File::open(&sdir) {
        let _ = d.sync_all();
    }
    written
}

/// After a checkpoint of `step` failed on some rank: removes this rank's files of it (complete
/// or partial) and the step directory once it is empty, so that the incomplete step leaves
/// nothing behind and the previous complete checkpoint stays the latest. Every rank calls it;
/// the last one to remove its file removes the directory.
pub fn discard_step(dir: &Path, step: usize, rank: usize) {
    for f in [rank_file(dir, step, rank), partial_file(dir, step, rank)] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir(step_dir(dir, step));
}

/// The error of a checkpoint of `step` that failed (`cause`, this rank's own or another's):
/// what was removed, and which step of `dir` remains resumable (`previous`, the latest
/// checkpoint complete on every rank that this run wrote or resumed from).
pub fn write_failed(dir: &Path, step: usize, previous: Option<usize>, cause: Error) -> Error {
    let remains = match previous {
        Some(p) => format!(
            "the checkpoint of step {p} ({}) is complete and stays: the same command with --resume continues from it",
            step_dir(dir, p).display()
        ),
        None => format!(
            "this run has no earlier complete checkpoint in {}: --resume would start afresh",
            dir.display()
        ),
    };
    let what = format!(
        "writing the checkpoint of step {step} failed, and its files and {} were removed; {remains}",
        step_dir(dir, step).display()
    );
    Error::Data(format!("{cause}; {what}"))
}

/// Opens this rank's file of `step` for reading.
pub fn read_rank_file(
    dir: &Path,
    step: usize,
    rank: usize,
) -> Result<codec::Decoder<std::io::BufReader<std::fs::File>>> {
    let path = rank_file(dir, step, rank);
    let file = std::fs::File::open(&path).map_err(|e| Error::io("opening checkpoint", &path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("reading the size of", &path, e))?
        .len();
    codec::Decoder::new(std::io::BufReader::with_capacity(1 << 20, file), len, &path)
}

/// Removes this rank's files of every step but `keep`, and step directories left empty: also
/// those a kill left empty between removing a file and its directory, so none outlives a resume.
pub fn prune(dir: &Path, rank: usize, keep: usize) -> Result<()> {
    for step in step_dirs(dir).filter(|&s| s != keep) {
        let f = rank_file(dir, step, rank);
        if f.is_file() {
            std::fs::remove_file(&f).map_err(|e| Error::io("removing old checkpoint", &f, e))?;
        }
        // Empty once every rank removed its file; another rank may still be removing its own.
        let _ = std::fs::remove_dir(step_dir(dir, step));
    }
    Ok(())
}

/// The differences between a checkpoint's fingerprint and this run's, one phrase each (empty
/// when they are the same run).
pub fn differences(saved: &[(String, String)], here: &[(String, String)]) -> Vec<String> {
    let find = |list: &[(String, String)], k: &str| {
        list.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let mut keys: Vec<&str> = here.iter().map(|(k, _)| k.as_str()).collect();
    keys.extend(
        saved
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !here.iter().any(|(h, _)| h == k)),
    );
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (find(saved, k), find(here, k));
            (a != b).then(|| {
                format!(
                    "{k}: {} in the checkpoint, {} now",
                    a.as_deref().unwrap_or("(absent)"),
                    b.as_deref().unwrap_or("(absent)")
                )
            })
        })
        .collect()
}

/// A 64-bit content hash of a file (the checksum of [`codec`]), for fingerprints of data files.
pub fn hash_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut sum = codec::Checksum::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        sum.update(&buf[..n]);
    }
    Ok(format!("{total} bytes, hash {:016x}", sum.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_changed_flag() {
        let a = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let saved = a(&[("--rank", "8"), ("--data", "x"), ("old", "1")]);
        let here = a(&[("--rank", "4"), ("--data", "x")]);
        assert_eq!(
            differences(&saved, &here),
            vec![
                "--rank: 8 in the checkpoint, 4 now",
                "old: 1 in the checkpoint, (absent) now"
            ]
        );
        assert!(differences(&here, &here).is_empty());
    }

    #[test]
    fn files_appear_whole_and_old_steps_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ck");
        prepare(&d, 0).unwrap();
        for step in [2, 4] {
            write_rank_file(&d, step, 0, |e| e.u64(step as u64)).unwrap();
        }
        // A write that fails half-way removes its partial file and its step directory.
        let failed = write_rank_file(&d, 6, 0, |e| {
            e.u64(1)?;
            Err(Error::data("disk full"))
        });
        assert!(failed.is_err());
        assert!(!partial_file(&d, 6, 0).exists() && !step_dir(&d, 6).exists());
        assert_eq!(complete_steps(&d, 0), vec![2, 4]);
        assert!(complete_steps(&d, 1).is_empty());
        // A kill half-way leaves a partial file, which is not a checkpoint: the next start
        // removes it.
        std::fs::create_dir(step_dir(&d, 6)).unwrap();
        std::fs::write(partial_file(&d, 6, 0), b"half").unwrap();
        assert_eq!(complete_steps(&d, 0), vec![2, 4]);
        prepare(&d, 0).unwrap();
        assert!(!partial_file(&d, 6, 0).exists());
        // A kill between removing a file and its directory leaves an empty step directory.
        std::fs::create_dir(step_dir(&d, 1)).unwrap();
        prune(&d, 0, 4).unwrap();
        assert_eq!(complete_steps(&d, 0), vec![4]);
        for gone in [1, 2, 6] {
            assert!(!step_dir(&d, gone).exists(), "step {gone}");
        }
        let mut r = read_rank_file(&d, 4, 0).unwrap();
        assert_eq!(r.u64().unwrap(), 4);
        r.finish().unwrap();
    }
}

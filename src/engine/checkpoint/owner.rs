//! One run per checkpoint directory. Rank 0 takes `DIR/.eva-owner` before anything is written
//! there and releases it when the run ends (on errors too, and from the signal handler and the
//! collective watchdog, which exit without unwinding): a second run given the same `DIR` is
//! refused, naming the holder, instead of overwriting and pruning the first run's files.
//!
//! | function | what |
//! |---|---|
//! | [`claim`] | takes the marker atomically (written beside, then `link`ed to its name, which fails if one exists), or refuses, or takes over a dead holder's |
//! | [`Claim`] | the taken marker; dropping it removes the marker if it is still this run's |
//! | [`release_claimed`] | removes every marker this process holds (for paths that `_exit`) |
//!
//! The marker holds the holder's identity ([`crate::owner::Owner`]: pid, host, boot id, start
//! time — the same identification as `--out`'s temporary directories), its wall-clock start, the
//! run's fingerprint hash and, under Slurm, the job id and restart count. A marker is taken over
//! when its holder certainly no longer runs: a process of this host that is gone (another boot,
//! or no process with its pid and start time), or an earlier attempt of this same Slurm job
//! (a requeued job keeps its id and counts its restarts; Slurm ended the earlier attempt). A
//! holder on another host cannot be checked from here: it is never taken over silently, only
//! with `--checkpoint-takeover`. A live holder on this host is never taken over.

use crate::owner::Owner;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// The marker's name inside the checkpoint directory.
pub const MARKER: &str = ".eva-owner";

/// Its first line.
const TITLE: &str = "eva checkpoint owner";

/// Markers this process holds, with their contents (for [`release_claimed`]).
static CLAIMED: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

fn claimed() -> MutexGuard<'static, Vec<(PathBuf, String)>> {
    CLAIMED.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a marker says.
#[derive(Clone, Debug, PartialEq)]
struct Holder {
    owner: Owner,
    /// Seconds since the Unix epoch when it took the directory.
    started: u64,
    /// The hash of its run's fingerprint.
    fingerprint: String,
    /// `SLURM_JOB_ID` and `SLURM_RESTART_COUNT`, under Slurm.
    slurm: Option<(String, u64)>,
}

impl Holder {
    fn encode(&self) -> String {
        let slurm = match &self.slurm {
            Some((job, restart)) => format!("{job} {restart}"),
            None => "none".into(),
        };
        format!(
            "{}started {}\nfingerprint {}\nslurm {slurm}\n",
            self.owner.encode(TITLE),
            self.started,
            self.fingerprint
        )
    }

    fn decode(text: &str) -> Option<Holder> {
        let (owner, mut lines) = Owner::decode(text, TITLE)?;
        let mut field = |key: &str| lines.next()?.strip_prefix(key)?.strip_prefix(' ');
        let started = field("started")?.parse().ok()?;
        let fingerprint = field("fingerprint")?.to_string();
        let slurm = match field("slurm")? {
            "none" => None,
            s => {
                let (job, restart) = s.split_once(' ')?;
                Some((job.to_string(), restart.parse().ok()?))
            }
        };
        Some(Holder {
            owner,
            started,
            fingerprint,
            slurm,
        })
    }

    /// `pid P on host H, started 3 min ago, with the same command line and files`.
    fn describe(&self, fingerprint: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let same = if self.fingerprint == fingerprint {
            "the same command line and files as this run"
        } else {
            "another command line or other files than this run"
        };
        format!(
            "pid {} on host {}, started {} ago, with {same}",
            self.owner.pid,
            self.owner.host,
            age(now.saturating_sub(self.started))
        )
    }
}

/// `42 s`, `3 min`, `5.2 h`, `2.0 days`.
fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{:.1} h", s as f64 / 3600.0),
        _ => format!("{:.1} days", s as f64 / 86400.0),
    }
}

/// `SLURM_JOB_ID` and `SLURM_RESTART_COUNT` (0 when unset) of this process, under Slurm.
fn slurm() -> Option<(String, u64)> {
    let job = std::env::var("SLURM_JOB_ID")
        .ok()
        .filter(|j| !j.is_empty() && !j.contains(char::is_whitespace))?;
    let restart = std::env::var("SLURM_RESTART_COUNT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Some((job, restart))
}

/// This run's hold on a checkpoint directory; dropping it releases the marker (only if it is
/// still this run's: `--checkpoint-takeover` elsewhere may have taken it).
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    text: String,
    /// What was taken over, to tell the user (`None` when the directory was free).
    pub note: Option<String>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut registry = claimed();
        release(&self.path, &self.text);
        registry.retain(|(p, _)| p != &self.path);
    }
}

/// Removes the marker at `path` if it holds `text`.
fn release(path: &Path, text: &str) {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes every checkpoint marker this process holds (the signal handler and the watchdog,
/// which end the process without running destructors, call it).
pub fn release_claimed() {
    for (path, text) in claimed().drain(..) {
        release(&path, &text);
    }
}

/// Whether a marker of Slurm job attempt `holder` belongs to an earlier attempt of this
/// process's job `ours`: Slurm ended it before it started this one.
fn earlier_attempt(holder: &Option<(String, u64)>, ours: &Option<(String, u64)>) -> bool {
    matches!((holder, ours), (Some((job, before)), Some((this, now))) if job == this && before < now)
}

/// Why a marker may be taken over, or the error that refuses it. `me` and `job` are this
/// process's identity and Slurm job attempt.
fn verdict(
    dir: &Path,
    marker: &Path,
    text: &str,
    (me, job): (Option<&Owner>, &Option<(String, u64)>),
    fingerprint: &str,
    takeover: bool,
) -> Result<String> {
    let Some(holder) = Holder::decode(text) else {
        return if takeover {
            Ok(format!(
                "--checkpoint-takeover: replaced the unreadable owner marker {}",
                marker.display()
            ))
        } else {
            Err(Error::usage(format!(
                "checkpoint directory {} has an owner marker {} that eva cannot read (damaged, or not eva's); if no eva run uses {}, remove the file or pass --checkpoint-takeover",
                dir.display(),
                marker.display(),
                dir.display()
            )))
        };
    };
    let who = holder.describe(fingerprint);
    let here = me.is_some_and(|me| holder.owner.host == me.host);
    if let Some(me) = me.filter(|_| here) {
        if holder.owner.runs(me) {
            let this = if holder.owner == *me {
                " (this process)"
            } else {
                ""
            };
            let hint = if takeover {
                format!("; --checkpoint-takeover does not take a directory from a process that still runs on this host: stop it first (kill {})", holder.owner.pid)
            } else {
                String::new()
            };
            return Err(Error::usage(format!(
                "checkpoint directory {} is in use by another eva run{this}: {who}, which still runs; wait for it to end, or give this run another --checkpoint directory{hint}",
                dir.display()
            )));
        }
        return Ok(format!(
            "took over checkpoint directory {} from an eva run that no longer runs ({who})",
            dir.display()
        ));
    }
    if earlier_attempt(&holder.slurm, job) {
        let (id, before) = holder.slurm.as_ref().expect("an attempt");
        return Ok(format!(
            "took over checkpoint directory {} from attempt {before} of this Slurm job {id}, which Slurm ended ({who})",
            dir.display()
        ));
    }
    if takeover {
        return Ok(format!(
            "--checkpoint-takeover: took over checkpoint directory {} from {who}",
            dir.display()
        ));
    }
    Err(Error::usage(format!(
        "checkpoint directory {} is held by an eva run on another host: {who}; this host ({}) cannot tell whether it still runs. If it does not (its node failed), pass --checkpoint-takeover to take the directory over: two runs writing one checkpoint directory overwrite and prune each other's files ({} names the holder)",
        dir.display(),
        me.map_or("unknown", |m| m.host.as_str()),
        marker.display()
    )))
}

/// Takes `dir` for this run (rank 0, before anything is written there): creates it, then the
/// marker, atomically. An existing marker is refused, or taken over when its holder certainly
/// no longer runs, or with `takeover` (see the module doc). `fingerprint` is the hash of the
/// run's fingerprint.
pub fn claim(dir: &Path, fingerprint: &str, takeover: bool) -> Result<Claim> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating checkpoint directory", dir, e))?;
    let (me, job) = (Owner::me(), slurm());
    let owner = me.clone().unwrap_or_else(|| Owner {
        pid: std::process::id(),
        host: "unknown".into(),
        boot: "unknown".into(),
        start: 0,
    });
    let text = Holder {
        owner,
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        fingerprint: fingerprint.to_string(),
        slurm: job.clone(),
    }
    .encode();
    let marker = dir.join(MARKER);
    let pid = std::process::id();
    let tmp = dir.join(format!("{MARKER}.{pid}.tmp"));
    let stale = dir.join(format!("{MARKER}.{pid}.stale"));
    std::fs::write(&tmp, &text)
        .map_err(|e| Error::io("writing to the checkpoint directory", &tmp, e))?;
    let result = take(
        dir,
        (&marker, &tmp, &stale),
        (me.as_ref(), &job),
        fingerprint,
        takeover,
    );
    let _ = std::fs::remove_file(&tmp);
    let note = result?;
    claimed().push((marker.clone(), text.clone()));
    Ok(Claim {
        path: marker,
        text,
        note,
    })
}

/// Links `tmp` to `marker`; on a marker that is there, decides and, to take it over, moves it
/// aside to `stale` (a rename: of two runs taking over at once, one gets it), checks that it is
/// still the one judged, and tries again. Returns what was taken over.
fn take(
    dir: &Path,
    (marker, tmp, stale): (&Path, &Path, &Path),
    who: (Option<&Owner>, &Option<(String, u64)>),
    fingerprint: &str,
    takeover: bool,
) -> Result<Option<String>> {
    let mut note = None;
    for _ in 0..5 {
        match std::fs::hard_link(tmp, marker) {
            Ok(()) => return Ok(note),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => {
                // A file system without hard links: an exclusive create (the marker may be seen
                // empty for an instant; a reader then finds it unreadable and refuses).
                let text = std::fs::read(tmp).map_err(|e| Error::io("reading", tmp, e))?;
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(marker)
                {
                    Ok(mut f) => {
                        use std::io::Write;
                        f.write_all(&text)
                            .and_then(|_| f.sync_all())
                            .map_err(|e| Error::io("writing", marker, e))?;
                        return Ok(note);
                    }
                    Err(e2) if e2.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e2) => return Err(Error::io("creating the owner marker", marker, e2)),
                }
            }
        }
        let text = match std::fs::read_to_string(marker) {
            Ok(t) => t,
            // Released meanwhile: try again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("reading the owner marker", marker, e)),
        };
        let why = verdict(dir, marker, &text, who, fingerprint, takeover)?;
        match std::fs::rename(marker, stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("moving aside the owner marker", marker, e)),
        }
        let moved = std::fs::read_to_string(stale).unwrap_or_default();
        if moved != text {
            // Another run replaced the marker between the read and the rename: put its marker
            // back and judge it again.
            let _ = std::fs::hard_link(stale, marker);
            let _ = std::fs::remove_file(stale);
            continue;
        }
        let _ = std::fs::remove_file(stale);
        note = Some(why);
    }
    Err(Error::data(format!(
        "could not take the owner marker {}: other runs are taking it at the same time",
        marker.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that claim run one at a time: `release_claimed` releases every claim of the
    /// process.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn marker_of(dir: &Path, holder: &Holder) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(MARKER), holder.encode()).unwrap();
    }

    fn me() -> Owner {
        Owner::me().expect("/proc is readable on Linux")
    }

    fn holder(owner: Owner) -> Holder {
        Holder {
            owner,
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 200,
            fingerprint: "00000000000000aa".into(),
            slurm: None,
        }
    }

    #[test]
    fn markers_round_trip() {
        let mut h = holder(me());
        assert_eq!(Holder::decode(&h.encode()), Some(h.clone()));
        h.slurm = Some(("1234".into(), 2));
        assert_eq!(Holder::decode(&h.encode()), Some(h.clone()));
        assert_eq!(Holder::decode("eva temporary output\npid 1\n"), None);
    }

    #[test]
    fn a_second_claim_is_refused_until_the_first_is_released() {
        let _serial = serial();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let first = claim(&dir, "00000000000000aa", false).unwrap();
        assert!(first.note.is_none());
        let marker = std::fs::read_to_string(dir.join(MARKER)).unwrap();
        assert!(marker.starts_with(TITLE), "{marker}");
        for takeover in [false, true] {
            let e = claim(&dir, "00000000000000bb", takeover).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("is in use by another eva run (this process)")
                    && e.contains(&format!("pid {}", std::process::id()))
                    && e.contains("another command line or other files")
                    && e.contains("which still runs"),
                "{e}"
            );
            assert_eq!(e.contains("does not take a directory"), takeover, "{e}");
        }
        // The refused claims left the marker and nothing else.
        assert_eq!(std::fs::read_to_string(dir.join(MARKER)).unwrap(), marker);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        drop(first);
        assert!(!dir.join(MARKER).exists());
        let again = claim(&dir, "00000000000000aa", false).unwrap();
        assert!(again.note.is_none());
        // Released by the signal path too.
        release_claimed();
        assert!(!dir.join(MARKER).exists());
        drop(again);
    }

    #[test]
    fn a_dead_holder_on_this_host_is_taken_over_another_host_only_when_asked() {
        let _serial = serial();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        // A process of this host that is gone: a reused pid (another start time).
        let gone = Owner {
            start: me().start + 1,
            ..me()
        };
        marker_of(&dir, &holder(gone));
        let c = claim(&dir, "00000000000000aa", false).unwrap();
        let note = c.note.clone().unwrap();
        assert!(
            note.contains("from an eva run that no longer runs")
                && note.contains("the same command line and files")
                && note.contains("started 3 min ago"),
            "{note}"
        );
        drop(c);
        // Another host: refused, saying how to force it; taken with the flag.
        let far = Owner {
            host: "node-far".into(),
            ..me()
        };
        marker_of(&dir, &holder(far.clone()));
        let e = claim(&dir, "00000000000000aa", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is held by an eva run on another host: pid")
                && e.contains("on host node-far")
                && e.contains("pass --checkpoint-takeover"),
            "{e}"
        );
        let c = claim(&dir, "00000000000000aa", true).unwrap();
        assert!(c
            .note
            .as_ref()
            .unwrap()
            .contains("--checkpoint-takeover: took over"));
        let now = Holder::decode(&std::fs::read_to_string(dir.join(MARKER)).unwrap()).unwrap();
        assert_eq!(now.owner, me());
        drop(c);
        // An unreadable marker: refused, or replaced with the flag.
        std::fs::write(dir.join(MARKER), "garbage").unwrap();
        let e = claim(&dir, "00000000000000aa", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eva cannot read"), "{e}");
        claim(&dir, "00000000000000aa", true).unwrap();
        // Only the marker was ever left (no temporary or stale files).
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
    }

    #[test]
    fn an_earlier_attempt_of_the_same_slurm_job_is_taken_over() {
        let far = Owner {
            host: "node-far".into(),
            ..me()
        };
        let h = Holder {
            slurm: Some(("777".into(), 0)),
            ..holder(far)
        };
        let (dir, text) = (Path::new("ck"), h.encode());
        let marker = dir.join(MARKER);
        let judge = |job: Option<(&str, u64)>| {
            let job = job.map(|(j, r)| (j.to_string(), r));
            verdict(dir, &marker, &text, (Some(&me()), &job), "x", false)
        };
        // Attempt 1 of job 777 takes over attempt 0's marker, even from another host.
        let note = judge(Some(("777", 1))).unwrap();
        assert!(
            note.contains("from attempt 0 of this Slurm job 777"),
            "{note}"
        );
        // The same attempt, another job, or no Slurm: another host's live run, refused.
        for job in [Some(("777", 0)), Some(("778", 3)), None] {
            let e = judge(job).unwrap_err().to_string();
            assert!(e.contains("on another host"), "{job:?}: {e}");
        }
    }
}

//! Checks that every rank holds the same `(key, value)` list — how it was started: flags and
//! the identity of its files — before any work, so that ranks started with different command
//! lines fail at once on every rank instead of computing (and writing) something of neither.
//!
//! The common case costs one all-reduce of two `f64` per rank: every rank puts a 64-bit hash of
//! its whole list into its own slots, and each learns every rank's hash. Only when some differ,
//! rank 0's list is broadcast, each rank compares its own with it key by key, and one more
//! all-reduce of per-key flags tells every rank which keys differ, so that every rank's error
//! names the keys and the ranks that disagree (and, on a disagreeing rank, both values).

use super::codec::{Reader, Writer};
use super::Communicator;
use crate::{Error, Result};

/// The 64-bit hash (FNV-1a, [`crate::rng::name_key`]) of a list: keys and values, each after
/// its length, so that no two lists collide by concatenation.
fn hash(items: &[(String, String)]) -> u64 {
    let mut text = String::new();
    for (k, v) in items {
        for s in [k, v] {
            text.push_str(&format!("{}:", s.len()));
            text.push_str(s);
        }
    }
    crate::rng::name_key(&text)
}

/// Most keys named in the error before the rest are counted.
const MAX_NAMED: usize = 8;

/// Fails on every rank unless every rank's `items` equal rank 0's. `what` says what the items
/// describe, for the error (e.g. "command line and files"). Collective.
pub fn check(comm: &dyn Communicator, what: &str, items: &[(String, String)]) -> Result<()> {
    let (rank, size) = (comm.rank(), comm.size());
    if size == 1 {
        return Ok(());
    }
    let h = hash(items);
    let mut slots = vec![0.0; 2 * size];
    // Two 32-bit halves, each exact in an f64 and summed with zeros only.
    slots[2 * rank] = (h >> 32) as f64;
    slots[2 * rank + 1] = (h & 0xffff_ffff) as f64;
    comm.all_reduce_sum(&mut slots)?;
    let differing: Vec<usize> = (1..size)
        .filter(|&r| slots[2 * r..2 * r + 2] != slots[..2])
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    // Rank 0's list, to compare key by key.
    let mut buf = Vec::new();
    if rank == 0 {
        let mut w = Writer::default();
        w.u64(items.len() as u64);
        for (k, v) in items {
            w.bytes(k.as_bytes()).bytes(v.as_bytes());
        }
        buf = w.0;
    }
    comm.broadcast(&mut buf, 0)?;
    let mut r = Reader::new(&buf);
    let n = r.u64()? as usize;
    let mut theirs = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let k = String::from_utf8_lossy(r.bytes()?).to_string();
        let v = String::from_utf8_lossy(r.bytes()?).to_string();
        theirs.push((k, v));
    }
    // Per key of rank 0: this rank differs; one more slot: this rank has keys rank 0 lacks.
    let mine = |k: &str| items.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let mut flags: Vec<f64> = theirs
        .iter()
        .map(|(k, v)| (mine(k) != Some(v)) as u8 as f64)
        .collect();
    let extra: Vec<&str> = items
        .iter()
        .filter(|(k, _)| !theirs.iter().any(|(t, _)| t == k))
        .map(|(k, _)| k.as_str())
        .collect();
    flags.push(!extra.is_empty() as u8 as f64);
    comm.all_reduce_sum(&mut flags)?;
    let mut keys: Vec<String> = theirs
        .iter()
        .zip(&flags)
        .filter(|(_, &f)| f > 0.0)
        .map(|((k, _), _)| k.clone())
        .collect();
    if flags[n] > 0.0 {
        keys.push("settings that rank 0 does not have".into());
    }
    let named = match keys.len() {
        0 => "the order of their settings".to_string(),
        k if k > MAX_NAMED => format!(
            "{} and {} more",
            keys[..MAX_NAMED].join(", "),
            k - MAX_NAMED
        ),
        _ => keys.join(", "),
    };
    let ranks = differing
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let here = if differing.contains(&rank) {
        let mut d: Vec<String> = theirs
            .iter()
            .filter(|(k, v)| mine(k) != Some(v))
            .take(MAX_NAMED)
            .map(|(k, v)| match mine(k) {
                Some(m) => format!("{k}: {m} here, {v} on rank 0"),
                None => format!("{k}: absent here, {v} on rank 0"),
            })
            .collect();
        d.extend(
            extra
                .iter()
                .take(MAX_NAMED)
                .map(|k| format!("{k}: {} here, absent on rank 0", mine(k).expect("own key"))),
        );
        format!(" (rank {rank}: {})", d.join("; "))
    } else {
        String::new()
    };
    Err(Error::usage(format!(
        "the ranks were not started with the same {what}: rank(s) {ranks} differ from rank 0 in {named}{here}; start every rank with the same command line and the same files (nothing was written)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::threads::run_world;

    fn items(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equal_lists_pass_and_every_rank_names_what_differs() {
        let same = items(&[("--rank", "8"), ("--data", "100 bytes, hash 1")]);
        for r in run_world(3, |w| check(w, "command line", &same)) {
            r.unwrap();
        }
        // Rank 1 has another --rank; rank 2 another data file of the same length.
        let out = run_world(4, |w| {
            let list = match w.rank() {
                1 => items(&[("--rank", "4"), ("--data", "100 bytes, hash 1")]),
                2 => items(&[("--rank", "8"), ("--data", "100 bytes, hash 2")]),
                _ => same.clone(),
            };
            check(w, "command line and files", &list).unwrap_err()
        });
        for (rank, e) in out.iter().enumerate() {
            let e = e.to_string();
            assert_eq!(
                out[rank].exit_code(),
                2,
                "rank {rank}: a usage error, exit 2"
            );
            assert!(
                e.contains("same command line and files: rank(s) 1, 2 differ from rank 0 in --rank, --data"),
                "rank {rank}: {e}"
            );
        }
        assert!(out[1]
            .to_string()
            .contains("(rank 1: --rank: 4 here, 8 on rank 0)"));
        assert!(out[2]
            .to_string()
            .contains("(rank 2: --data: 100 bytes, hash 2 here, 100 bytes, hash 1 on rank 0)"));
        assert!(!out[3].to_string().contains("(rank 3"));
        // A key only one rank has (a --synthetic spec against --data, a model file more).
        let out = run_world(2, |w| {
            let mut list = same.clone();
            if w.rank() == 1 {
                list.push(("--model extra.safetensors".into(), "9 bytes".into()));
            }
            check(w, "command line", &list).unwrap_err().to_string()
        });
        assert!(
            out[0].contains("differ from rank 0 in settings that rank 0 does not have"),
            "{}",
            out[0]
        );
        assert!(
            out[1].contains("--model extra.safetensors: 9 bytes here, absent on rank 0"),
            "{}",
            out[1]
        );
    }
}

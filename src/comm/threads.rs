//! An in-process world: N ranks as threads sharing one rendezvous. Every collective is an
//! all-gather of bytes; sums run in rank order, so results are identical on every rank and
//! independent of thread timing. Point-to-point messages go through one queue per (sender,
//! receiver) pair; `send` never blocks. A rank that panics or leaves aborts the others' collectives
//! with an error instead of a hang, and so does a collective that outlasts the
//! [`collective_timeout`](super::collective_timeout) (naming the ranks that did not arrive).

use super::watchdog::{collective_timeout, timeout_message};
use super::Communicator;
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

#[derive(Default)]
struct State {
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    result: Option<Arc<Vec<Vec<u8>>>>,
    departed: usize,
    aborted: Option<String>,
    splits: HashMap<(u64, usize), Arc<Shared>>,
    /// Point-to-point messages in flight, by (sender, receiver).
    mail: HashMap<(usize, usize), VecDeque<Vec<u8>>>,
}

struct Shared {
    size: usize,
    timeout: Option<std::time::Duration>,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn new(size: usize, timeout: Option<std::time::Duration>) -> Arc<Self> {
        Arc::new(Shared {
            size,
            timeout,
            state: Mutex::new(State {
                slots: vec![None; size],
                ..State::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn abort(&self, why: String) {
        let mut st = self.lock();
        st.aborted.get_or_insert(why);
        self.cv.notify_all();
    }
}

/// One rank of an in-process world.
pub struct ThreadWorld {
    rank: usize,
    shared: Arc<Shared>,
    splits: std::cell::Cell<u64>,
}

impl ThreadWorld {
    /// A world of `size` ranks with the process's collective timeout; hand each element to its
    /// own thread.
    pub fn create(size: usize) -> Vec<ThreadWorld> {
        Self::create_with_timeout(size, collective_timeout())
    }

    /// A world of `size` ranks whose collectives give up after `timeout` (`None`: never).
    pub fn create_with_timeout(
        size: usize,
        timeout: Option<std::time::Duration>,
    ) -> Vec<ThreadWorld> {
        let shared = Shared::new(size.max(1), timeout);
        (0..size.max(1))
            .map(|rank| ThreadWorld {
                rank,
                shared: shared.clone(),
                splits: std::cell::Cell::new(0),
            })
            .collect()
    }

    /// All-gather of bytes: every rank receives every rank's contribution, in rank order.
    /// `op` names the collective in a timeout's message.
    fn exchange(&self, op: &str, mine: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let sh = &*self.shared;
        let aborted = |st: &State| {
            st.aborted
                .clone()
                .map(|why| Error::Comm(format!("thread world aborted: {why}")))
        };
        let started = Instant::now();
        let deadline = sh.timeout.map(|t| started + t);
        // Waits on the condition variable until notified or past the deadline; past it, aborts
        // the world with a message naming the ranks whose slots are still empty.
        let mut st = sh.lock();
        // Wait for the previous round to drain.
        while st.result.is_some() {
            if let Some(e) = aborted(&st) {
                return Err(e);
            }
            st = self.wait(st, op, started, deadline, None)?;
        }
        if let Some(e) = aborted(&st) {
            return Err(e);
        }
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == sh.size {
            let all = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.result = Some(Arc::new(all));
            st.arrived = 0;
            sh.cv.notify_all();
        }
        while st.result.is_none() || st.slots[self.rank].is_some() {
            if let Some(e) = aborted(&st) {
                return Err(e);
            }
            let missing: Vec<usize> = (0..sh.size)
                .filter(|&r| st.result.is_none() && st.slots[r].is_none())
                .collect();
            st = self.wait(st, op, started, deadline, Some(missing))?;
        }
        let out = st.result.clone().expect("result published");
        st.departed += 1;
        if st.departed == sh.size {
            st.departed = 0;
            st.result = None;
            sh.cv.notify_all();
        }
        Ok(out)
    }

    /// One wait on the condition variable, bounded by `deadline`; past it, aborts the world with
    /// a message naming `missing` (the ranks that did not arrive, when known).
    fn wait<'g>(
        &self,
        st: MutexGuard<'g, State>,
        op: &str,
        started: Instant,
        deadline: Option<Instant>,
        missing: Option<Vec<usize>>,
    ) -> Result<MutexGuard<'g, State>> {
        let sh = &*self.shared;
        let Some(deadline) = deadline else {
            return Ok(sh.cv.wait(st).unwrap_or_else(|p| p.into_inner()));
        };
        let now = Instant::now();
        if now >= deadline {
            let msg = timeout_message(
                op,
                self.rank,
                sh.size,
                started.elapsed(),
                missing.as_deref(),
            );
            drop(st);
            sh.abort(format!("rank {}: {msg}", self.rank));
            return Err(Error::Comm(msg));
        }
        Ok(sh
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0)
    }
    /// [`Communicator::split`] as a thread world (the NCCL backend builds its own split on it).
    pub(super) fn split_world(&self, color: usize, key: usize) -> Result<ThreadWorld> {
        let mine = [color as u64, key as u64]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let all = self.exchange("split", mine)?;
        let parse = |b: &Vec<u8>| {
            (
                u64::from_le_bytes(b[..8].try_into().expect("8")) as usize,
                u64::from_le_bytes(b[8..16].try_into().expect("8")) as usize,
            )
        };
        let mut members: Vec<(usize, usize)> = all
            .iter()
            .enumerate()
            .map(|(r, b)| (parse(b), r))
            .filter(|((c, _), _)| *c == color)
            .map(|((_, k), r)| (k, r))
            .collect();
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .expect("this rank is a member");
        let seq = self.splits.get();
        self.splits.set(seq + 1);
        let shared = self
            .shared
            .lock()
            .splits
            .entry((seq, color))
            .or_insert_with(|| Shared::new(members.len(), self.shared.timeout))
            .clone();
        Ok(ThreadWorld {
            rank,
            shared,
            splits: std::cell::Cell::new(0),
        })
    }

    /// Why the world was aborted, if it was (a rank left, panicked or timed out).
    #[cfg_attr(not(any(feature = "nccl", feature = "cuda-emu")), allow(dead_code))]
    pub(super) fn aborted(&self) -> Option<String> {
        self.shared.lock().aborted.clone()
    }

    /// Ends a wait outside the world's own collectives (an NCCL call) that outlasted the
    /// timeout: aborts the world, so that every rank's next collective fails instead of waiting,
    /// and returns the message naming `op`.
    #[cfg_attr(not(any(feature = "nccl", feature = "cuda-emu")), allow(dead_code))]
    pub(super) fn time_out(&self, op: &str, waited: std::time::Duration) -> Error {
        let msg = timeout_message(op, self.rank, self.shared.size, waited, None);
        self.shared.abort(format!("rank {}: {msg}", self.rank));
        Error::Comm(msg)
    }
}

impl Drop for ThreadWorld {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            format!("rank {} panicked", self.rank)
        } else {
            format!("rank {} left the world", self.rank)
        };
        // Leaving is only an error for ranks still waiting in (or later entering) a collective;
        // at a normal end no rank calls another one.
        self.shared.abort(why);
    }
}

impl Communicator for ThreadWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        let mine = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.exchange("all-reduce", mine)?;
        buf.iter_mut().for_each(|v| *v = 0.0);
        for (r, part) in all.iter().enumerate() {
            if part.len() != buf.len() * 8 {
                return Err(Error::Comm(format!(
                    "all-reduce length mismatch: rank {} sent {} values, rank {} {}",
                    r,
                    part.len() / 8,
                    self.rank,
                    buf.len()
                )));
            }
            for (v, b) in buf.iter_mut().zip(part.chunks_exact(8)) {
                *v += f64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let mine = if self.rank == root {
            std::mem::take(buf)
        } else {
            Vec::new()
        };
        let all = self.exchange(&format!("broadcast from rank {root}"), mine)?;
        *buf = all[root].clone();
        Ok(())
    }

    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.exchange(&format!("gather to rank {root}"), send.to_vec())?;
        Ok((self.rank == root).then(|| all.as_ref().clone()))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.split_world(color, key)?))
    }

    fn send(&self, buf: &[u8], dest: usize) -> Result<()> {
        let sh = &*self.shared;
        if dest >= sh.size {
            return Err(Error::Comm(format!(
                "send to rank {dest} in a world of {}",
                sh.size
            )));
        }
        let mut st = sh.lock();
        if let Some(why) = &st.aborted {
            return Err(Error::Comm(format!("thread world aborted: {why}")));
        }
        st.mail
            .entry((self.rank, dest))
            .or_default()
            .push_back(buf.to_vec());
        sh.cv.notify_all();
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        let sh = &*self.shared;
        if src >= sh.size {
            return Err(Error::Comm(format!(
                "receive from rank {src} in a world of {}",
                sh.size
            )));
        }
        let started = Instant::now();
        let deadline = sh.timeout.map(|t| started + t);
        let op = format!("receive from rank {src}");
        let mut st = sh.lock();
        loop {
            // A message already sent is delivered even if its sender has left since.
            if let Some(msg) = st
                .mail
                .get_mut(&(src, self.rank))
                .and_then(VecDeque::pop_front)
            {
                return Ok(msg);
            }
            if let Some(why) = &st.aborted {
                return Err(Error::Comm(format!("thread world aborted while rank {} waited for a message from rank {src}: {why}", self.rank)));
            }
            st = self.wait(st, &op, started, deadline, Some(vec![src]))?;
        }
    }

    fn backend(&self) -> &'static str {
        "threads"
    }
}

/// Runs `f` on every rank of an `n`-rank thread world and returns the ranks' results in rank
/// order (tests).
#[cfg(test)]
pub(crate) fn run_world<T: Send>(n: usize, f: impl Fn(&ThreadWorld) -> T + Sync) -> Vec<T> {
    let worlds = ThreadWorld::create(n);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = worlds.into_iter().map(|w| s.spawn(move || f(&w))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms_hold_for_every_world_size() {
        for n in [1, 2, 3, 4, 7] {
            for r in run_world(n, |w| crate::comm::selftest(w)) {
                r.unwrap();
            }
        }
    }

    #[test]
    fn messages_between_a_pair_arrive_in_order_and_a_leaver_fails_the_receiver() {
        let out = run_world(3, |w| {
            let got = if w.rank() == 0 {
                for i in 0..50u8 {
                    w.send(&[i], 2).unwrap();
                }
                Vec::new()
            } else if w.rank() == 2 {
                (0..50).map(|_| w.recv(0).unwrap()[0]).collect()
            } else {
                Vec::new()
            };
            // No rank leaves (which aborts the world) before the others are done.
            w.barrier().unwrap();
            got
        });
        assert_eq!(out[2], (0..50u8).collect::<Vec<_>>());
        let mut it = ThreadWorld::create(2).into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        drop(b);
        let err = a.recv(1).unwrap_err().to_string();
        assert!(
            err.contains("waited for a message from rank 1") && err.contains("rank 1 left"),
            "{err}"
        );
    }

    #[test]
    fn many_rounds_keep_their_order() {
        let out = run_world(3, |w| {
            let mut total = 0.0;
            for i in 0..200 {
                let mut v = [(w.rank() * 1000 + i) as f64];
                w.all_reduce_sum(&mut v).unwrap();
                total += v[0];
            }
            total
        });
        assert!(out.iter().all(|&t| t == out[0]));
    }

    #[test]
    fn a_rank_that_leaves_early_fails_the_others_instead_of_hanging() {
        let worlds = ThreadWorld::create(2);
        let mut it = worlds.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        drop(b);
        let mut v = [1.0];
        let err = a.all_reduce_sum(&mut v).unwrap_err().to_string();
        assert!(err.contains("rank 1 left"), "{err}");
    }

    #[test]
    fn a_rank_that_does_not_arrive_times_out_the_others_with_its_number() {
        let worlds =
            ThreadWorld::create_with_timeout(3, Some(std::time::Duration::from_millis(300)));
        let t = Instant::now();
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| {
                    s.spawn(move || {
                        let _ctx = crate::comm::context("step 7: fused all-reduce");
                        if w.rank() == 2 {
                            // Arrives far too late; by then the world has been aborted.
                            std::thread::sleep(std::time::Duration::from_millis(900));
                        }
                        w.all_reduce_sum(&mut [1.0])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        for r in &results {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(
                e.contains("all-reduce (step 7: fused all-reduce)")
                    || e.contains("thread world aborted"),
                "{e}"
            );
        }
        let e = results[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("ranks that did not arrive: 2"), "{e}");
    }

    #[test]
    fn a_panicking_rank_aborts_the_world() {
        let worlds = ThreadWorld::create(2);
        let results: Vec<std::thread::Result<Result<()>>> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| {
                    s.spawn(move || {
                        if w.rank() == 1 {
                            panic!("boom");
                        }
                        w.barrier()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        assert!(results[1].is_err());
        let err = results[0]
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1"), "{err}");
    }
}

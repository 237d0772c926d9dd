//! The distributed Gram products: a stage leader's `Σ_r G_r·Q` ([`Leader::apply`]) and summed
//! Gram ([`Leader::gram`]) over Grams that stay on their ranks, each rank multiplying its own (on
//! the host, or on its GPU with an all-reduce there); the stage's other ranks [`serve`] the
//! leader's commands ([`super::messages`]).
//!
//! Every rank's part of a product is agreed on before the parts are summed: a part that fails on
//! one rank (its GPU out of memory, statistics it does not hold) ends the product on every rank of
//! the stage at once, with that rank's error, instead of leaving the others in an all-reduce it
//! never joins until the collective timeout. The servers stop there; the leader then sends no
//! `Abort` ([`Leader::finish`]).

use super::accounting::Wire;
use super::messages::{send, Command};
use crate::stats::exact::{pack_upper, unpack_upper};
use crate::stats::{InputStats, Packed};
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};
use std::cell::Cell;

/// This rank's part of `Σ_r G_r·Q` for `input` (`d x m`, row-major): host Grams by `dsymm`,
/// Grams on a GPU by cuBLAS `dsymm` there, the products left in GPU memory.
fn product_part(stats: &[Option<InputStats>], input: usize, q: ArrayView2<f64>) -> Result<Packed> {
    match stats.get(input) {
        Some(Some(InputStats::Exact(e))) => {
            let z = e.gram_apply(q)?;
            assert!(
                z.is_standard_layout(),
                "gram_apply returns a row-major array"
            );
            Ok(Packed::Host(z.into_raw_vec_and_offset().0))
        }
        Some(Some(InputStats::Device(x))) if x.sketch().is_none() => {
            Ok(Packed::Device(x.gram_apply(q)?))
        }
        _ => Err(not_exact(input)),
    }
}

/// This rank's Gram of `input`, its upper triangle packed row by row (on the GPU for device
/// statistics).
fn gram_part(stats: &[Option<InputStats>], input: usize) -> Result<Packed> {
    match stats.get(input) {
        Some(Some(InputStats::Exact(e))) => {
            let mut packed = Vec::new();
            pack_upper(e.gram(), e.dim(), &mut packed);
            Ok(Packed::Host(packed))
        }
        Some(Some(InputStats::Device(x))) if x.sketch().is_none() => {
            Ok(Packed::Device(x.packed_gram()?))
        }
        _ => Err(not_exact(input)),
    }
}

fn not_exact(input: usize) -> Error {
    Error::Comm(format!("the stage leader asked for Gram products of input {input}, which has no exact statistics on this rank"))
}

/// The stage leader's end of the products: it sends each command and takes its own part, and
/// at the end tells the serving ranks to stop.
pub struct Leader<'a> {
    stage: &'a Wire<'a>,
    stats: &'a [Option<InputStats>],
    /// A part failed at an agreement, which every rank of the stage saw: the servers have
    /// stopped with that error.
    stage_failed: Cell<bool>,
}

impl<'a> Leader<'a> {
    pub fn new(stage: &'a Wire<'a>, stats: &'a [Option<InputStats>]) -> Self {
        Leader {
            stage,
            stats,
            stage_failed: Cell::new(false),
        }
    }

    /// [`Wire::agree`] on this rank's part, remembering a failure the stage saw.
    fn agree(&self, part: Result<Packed>) -> Result<Packed> {
        let agreed = self.stage.agree(part);
        if agreed.is_err() {
            self.stage_failed.set(true);
        }
        agreed
    }

    /// `Σ_r G_r·Q` for `input` over the stage, every rank multiplying its own Gram.
    pub fn apply(&self, input: usize, q: ArrayView2<f64>) -> Result<Array2<f64>> {
        if self.stage.comm.size() > 1 {
            let command = Command::Apply {
                input,
                q: q.to_owned(),
            };
            send(self.stage, &command)?;
        }
        let part = self.agree(product_part(self.stats, input, q))?;
        let sum = self.stage.sum_packed(part)?;
        Ok(Array2::from_shape_vec(q.dim(), sum).expect("d x m products"))
    }

    /// The summed Gram (upper triangle) of `input`, as a full row-major `d x d` matrix.
    pub fn gram(&self, input: usize) -> Result<Vec<f64>> {
        if self.stage.comm.size() > 1 {
            send(self.stage, &Command::Gram { input })?;
        }
        let d = self
            .stats
            .get(input)
            .and_then(|s| s.as_ref())
            .map_or(0, |s| s.dim());
        let part = self.agree(gram_part(self.stats, input))?;
        let packed = self.stage.sum_packed(part)?;
        let mut g = vec![0.0; d * d];
        unpack_upper(&packed, d, &mut g);
        Ok(g)
    }

    /// Ends the products on the stage: `Done`, or `Abort` with the leader's own error, unless
    /// the stage already failed together at an agreement. Returns `result`.
    pub fn finish<T>(self, result: Result<T>) -> Result<T> {
        if self.stage.comm.size() > 1 && !self.stage_failed.get() {
            let command = match &result {
                Ok(_) => Command::Done,
                Err(e) => Command::Abort(e.to_string()),
            };
            send(self.stage, &command)?;
        }
        result
    }
}

/// The stage's other ranks: serve the stage leader's products until `Done`, an `Abort`, or a
/// part that failed on some rank (every rank of the stage stops at that agreement). Their sums
/// stay where they were made: only the leader reads them.
pub fn serve(stage: &Wire, stats: &[Option<InputStats>]) -> Result<()> {
    loop {
        let mut buf = Vec::new();
        stage.broadcast(&mut buf, 0)?;
        match Command::decode(&buf)? {
            Command::Apply { input, q } => {
                let mut part = stage.agree(product_part(stats, input, q.view()))?;
                stage.all_reduce_in_place(&mut part)?;
            }
            Command::Gram { input } => {
                let mut part = stage.agree(gram_part(stats, input))?;
                stage.all_reduce_in_place(&mut part)?;
            }
            Command::Done => return Ok(()),
            Command::Abort(msg) => {
                return Err(Error::Comm(format!("the stage leader failed: {msg}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::threads::ThreadWorld;
    use crate::comm::Communicator;
    use crate::engine::accounting::Accounting;
    use crate::stats::exact::ExactStats;
    use std::time::{Duration, Instant};

    /// Exact statistics of 40 rows of dimension 6, different on each rank.
    fn exact(rank: usize) -> InputStats {
        let x = Array2::from_shape_fn((40, 6), |(i, j)| {
            ((i * 7 + j * 3 + rank * 5) % 11) as f32 - 5.0
        });
        let mut e = ExactStats::new(vec![0.5; 6]);
        e.accumulate(x.view(), &mut crate::stats::Workspace::default())
            .unwrap();
        InputStats::Exact(e)
    }

    /// A stage of two thread ranks whose collectives give up after 20 s: the leader (rank 0)
    /// runs `lead`, rank 1 serves; `holds[r]` says whether rank r holds the input's statistics.
    /// Returns both ranks' results as text and how long the stage took.
    fn stage(
        holds: [bool; 2],
        lead: impl Fn(&Leader) -> Result<Vec<f64>> + Sync,
    ) -> ([std::result::Result<Vec<f64>, String>; 2], Duration) {
        let worlds = ThreadWorld::create_with_timeout(2, Some(Duration::from_secs(20)));
        let started = Instant::now();
        let out: Vec<_> = std::thread::scope(|s| {
            let lead = &lead;
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| {
                    s.spawn(move || {
                        let r = w.rank();
                        let stats = vec![holds[r].then(|| exact(r))];
                        let acct = Accounting::default();
                        let wire = Wire::new(&w, &acct);
                        let result = if r == 0 {
                            let leader = Leader::new(&wire, &stats);
                            let result = lead(&leader);
                            leader.finish(result)
                        } else {
                            serve(&wire, &stats).map(|()| Vec::new())
                        };
                        result.map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        ([out[0].clone(), out[1].clone()], started.elapsed())
    }

    fn q() -> Array2<f64> {
        Array2::from_shape_fn((6, 2), |(i, j)| (i + 2 * j) as f64 * 0.25 - 1.0)
    }

    #[test]
    fn products_sum_every_ranks_part_and_the_servers_stop_at_done() {
        let ([leader, server], _) = stage([true, true], |l| {
            let mut out = l.apply(0, q().view())?.into_raw_vec_and_offset().0;
            out.extend(l.gram(0)?);
            Ok(out)
        });
        let (e0, e1) = match (exact(0), exact(1)) {
            (InputStats::Exact(a), InputStats::Exact(b)) => (a, b),
            _ => unreachable!(),
        };
        let mut expected = (e0.gram_apply(q().view()).unwrap()
            + e1.gram_apply(q().view()).unwrap())
        .into_raw_vec_and_offset()
        .0;
        let mut sum = vec![0.0; 36];
        for e in [&e0, &e1] {
            let mut full = vec![0.0; 36];
            let mut packed = Vec::new();
            pack_upper(e.gram(), 6, &mut packed);
            unpack_upper(&packed, 6, &mut full);
            sum.iter_mut().zip(full).for_each(|(s, v)| *s += v);
        }
        expected.extend(sum);
        assert_eq!(leader.unwrap(), expected);
        assert_eq!(server.unwrap(), Vec::<f64>::new());
    }

    /// A part that fails on one rank ends the product on both at once, each naming the cause,
    /// whichever rank it is. Without the agreement the other rank learned only that its peer
    /// left (thread ranks: "thread world aborted"), or waited in the all-reduce until the
    /// collective timeout (MPI, NCCL).
    #[test]
    fn a_part_failing_on_one_rank_ends_the_product_on_every_rank_at_once() {
        for failing in [1, 0] {
            let mut holds = [true, true];
            holds[failing] = false;
            for gram in [false, true] {
                let ([leader, server], took) = stage(holds, |l| {
                    if gram {
                        l.gram(0)
                    } else {
                        l.apply(0, q().view())
                            .map(|z| z.into_raw_vec_and_offset().0)
                    }
                });
                let (leader, server) = (leader.unwrap_err(), server.unwrap_err());
                for e in [&leader, &server] {
                    assert!(
                        e.contains("no exact statistics on this rank") && !e.contains("timed out"),
                        "rank {failing} failing (gram {gram}): {e}"
                    );
                }
                let other = if failing == 0 { &server } else { &leader };
                assert!(other.contains(&format!("rank {failing} failed")), "{other}");
                assert!(took < Duration::from_secs(10), "took {took:?}");
            }
        }
    }
}

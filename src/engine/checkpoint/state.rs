//! What a rank saves and restores: the step, the leader's decision, this rank's statistics and
//! warm starts, the stage leader's previous estimates and (world rank 0) the global leader.
//! Restoring checks every shape against the run that was set up from the command line, and the
//! reference vectors (unit 0's means, recomputed at start) bitwise, so a checkpoint of other data
//! is refused even where the fingerprint could not tell.

use super::codec::{Decoder, Encoder};
use crate::engine::Engine;
use crate::leader::{Decision, InputState};
use crate::stats::{exact, InputStats, Moments};
use crate::Result;
use ndarray::Array2;
use std::io::{Read, Write};

/// The fingerprint as one text field: `what=value` lines.
pub fn encode_fingerprint(f: &[(String, String)]) -> String {
    f.iter()
        .map(|(k, v)| format!("{k}={}", v.replace('\n', " ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The inverse of [`encode_fingerprint`].
pub fn decode_fingerprint(s: &str) -> Vec<(String, String)> {
    s.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The header every file starts with, read first so that a foreign checkpoint is refused before
/// its statistics are read.
pub struct Header {
    pub fingerprint: Vec<(String, String)>,
    pub rank: usize,
    pub size: usize,
    pub step: usize,
}

fn put_moments<W: Write>(e: &mut Encoder<W>, m: &Moments) -> Result<()> {
    e.u64(m.n)?;
    e.f64s(&m.sum)?;
    e.f64s(&m.sum_sq)
}

fn get_moments<R: Read>(d: &mut Decoder<R>, dim: usize) -> Result<Moments> {
    let n = d.u64()?;
    let (sum, sum_sq) = (d.f64s()?, d.f64s()?);
    if sum.len() != dim || sum_sq.len() != dim {
        return Err(d.damaged(format!(
            "moments of dimension {} where the input has {dim}",
            sum.len()
        )));
    }
    Ok(Moments { n, sum, sum_sq })
}

fn put_matrix<W: Write>(e: &mut Encoder<W>, m: Option<&Array2<f64>>) -> Result<()> {
    e.bool(m.is_some())?;
    if let Some(m) = m {
        e.u64(m.nrows() as u64)?;
        e.u64(m.ncols() as u64)?;
        e.f64s(&m.as_standard_layout().iter().copied().collect::<Vec<_>>())?;
    }
    Ok(())
}

/// A matrix with `rows` rows (any number of columns up to `rows` when `cols` is `None`).
fn get_matrix<R: Read>(
    d: &mut Decoder<R>,
    rows: usize,
    cols: Option<usize>,
) -> Result<Option<Array2<f64>>> {
    if !d.bool()? {
        return Ok(None);
    }
    let (r, c) = (d.u64()?, d.u64()?);
    let v = d.f64s()?;
    let fits = r == rows as u64 && cols.map_or(c <= rows as u64, |k| c == k as u64);
    if !fits || v.len() as u64 != r * c {
        return Err(d.damaged(format!(
            "a {r} x {c} matrix with {} values where {rows} rows are expected",
            v.len()
        )));
    }
    Ok(Some(
        Array2::from_shape_vec((r as usize, c as usize), v).expect("checked shape"),
    ))
}

/// A per-input list whose length must be the catalog's.
fn get_count<R: Read>(d: &mut Decoder<R>, inputs: usize) -> Result<()> {
    let n = d.u64()?;
    if n != inputs as u64 {
        return Err(d.damaged(format!("it has {n} inputs where the run has {inputs}")));
    }
    Ok(())
}

impl Engine {
    /// Writes the header and this rank's state.
    pub(crate) fn save_state<W: Write>(
        &self,
        e: &mut Encoder<W>,
        fingerprint: &[(String, String)],
    ) -> Result<()> {
        e.str(&encode_fingerprint(fingerprint))?;
        e.u64(self.topo.world.rank() as u64)?;
        e.u64(self.topo.world.size() as u64)?;
        e.u64(self.step as u64)?;
        e.seal()?;
        let dec = &self.decision;
        e.bools(&dec.accumulate)?;
        e.bools(&dec.test)?;
        e.bool(dec.all_done)?;
        let leader = self.topo.world.is_leader();
        e.bool(leader)?;
        if leader {
            e.u64(self.leader.states.len() as u64)?;
            for s in &self.leader.states {
                e.bool(s.ratios.is_some())?;
                e.f64s(s.ratios.as_deref().unwrap_or(&[]))?;
                e.u64(s.tokens)?;
                e.bools(&s.converged)?;
                e.bool(s.done)?;
                e.u64(s.converged_step.map_or(0, |s| s as u64 + 1))?;
            }
            e.u64s(
                &self
                    .leader
                    .ranks
                    .iter()
                    .map(|&r| r as u64)
                    .collect::<Vec<_>>(),
            )?;
        }
        let previous = self.tracker.previous();
        e.u64(previous.len() as u64)?;
        for p in previous {
            put_matrix(e, p.as_ref())?;
        }
        e.u64(self.stats.local.len() as u64)?;
        for (local, shared) in self.stats.local.iter().zip(&self.stats.shared) {
            // Statistics on a GPU are written as the host ones they copy to.
            let copy;
            let host = match local {
                Some(InputStats::Device(dev)) => {
                    copy = dev.to_host()?;
                    Some(&copy)
                }
                other => other.as_ref(),
            };
            match host {
                None => e.u8(0)?,
                Some(InputStats::Exact(x)) => {
                    e.u8(1)?;
                    e.f32s(x.reference())?;
                    put_moments(e, &x.moments)?;
                    let mut packed = Vec::new();
                    exact::pack_upper(x.gram(), x.dim(), &mut packed);
                    e.f64s(&packed)?;
                }
                Some(InputStats::Sketch(s)) => {
                    e.u8(2)?;
                    e.f32s(s.reference())?;
                    put_moments(e, &s.moments)?;
                    e.u64(s.size() as u64)?;
                    put_matrix(e, Some(s.sketch()))?;
                }
                Some(InputStats::Device(_)) => unreachable!("copied to the host above"),
            }
            e.bool(shared.is_some())?;
            if let Some(sh) = shared {
                put_moments(e, &sh.moments)?;
                put_matrix(e, sh.sketch.as_ref())?;
                e.bool(sh.gram.is_some())?;
                if let Some(g) = &sh.gram {
                    let mut packed = Vec::new();
                    exact::pack_upper(g, sh.moments.sum.len(), &mut packed);
                    e.f64s(&packed)?;
                }
            }
        }
        e.u64(self.stats.warm.len() as u64)?;
        for w in &self.stats.warm {
            put_matrix(e, w.as_ref())?;
        }
        e.u64s(&self.step_bytes)?;
        e.u64s(&self.step_hidden)?;
        let t = &self.times;
        let communication = self.acct.time().as_secs_f64();
        e.f64s(&[t.forward, t.statistics, communication, t.leader])
    }

    /// Reads what [`Engine::save_state`] wrote after the header of step `step`'s file into this
    /// engine, checking every part against the run set up from the command line. The statistics
    /// are read into their buffers in place (no second copy of the Grams); on an error the
    /// engine is left half-restored and must not be used (the run ends with that error).
    pub(crate) fn load_state<R: Read>(&mut self, d: &mut Decoder<R>, step: usize) -> Result<()> {
        let n = self.catalog.inputs.len();
        let dims: Vec<usize> = self.catalog.inputs.iter().map(|i| i.dim).collect();
        let (accumulate, test, all_done) = (d.bools()?, d.bools()?, d.bool()?);
        if accumulate.len() != n || test.len() != n {
            return Err(d.damaged(format!(
                "its decision names {} inputs where the run has {n}",
                accumulate.len()
            )));
        }
        self.decision = Decision {
            accumulate,
            test,
            all_done,
        };
        if d.bool()? != self.topo.world.is_leader() {
            return Err(d.damaged("the global leader's state is on another rank".into()));
        }
        if self.topo.world.is_leader() {
            self.load_leader(d)?;
        }
        get_count(d, n)?;
        let previous = (0..n)
            .map(|g| get_matrix(d, dims[g], Some(self.kmax(g))))
            .collect::<Result<Vec<_>>>()?;
        self.tracker.restore(previous);
        get_count(d, n)?;
        for g in 0..n {
            let kind = d.u8()?;
            self.load_local(d, g, kind)?;
            let saved_shared = d.bool()?;
            if saved_shared != self.stats.shared[g].is_some() {
                return Err(d.damaged(format!("input {g} has its shared part on another stage")));
            }
            if saved_shared {
                self.load_shared(d, g)?;
            }
        }
        get_count(d, n)?;
        self.stats.warm = (0..n)
            .map(|g| get_matrix(d, dims[g], None))
            .collect::<Result<Vec<_>>>()?;
        self.step_bytes = d.u64s()?;
        self.step_hidden = d.u64s()?;
        let t = d.f64s()?;
        let [forward, statistics, communication, leader]: [f64; 4] = t
            .try_into()
            .map_err(|t: Vec<f64>| d.damaged(format!("{} times where 4 are expected", t.len())))?;
        self.times.forward = forward;
        self.times.statistics = statistics;
        self.times.leader = leader;
        self.acct.restore(
            self.step_bytes.iter().sum(),
            self.step_hidden.iter().sum(),
            std::time::Duration::from_secs_f64(communication.max(0.0)),
        );
        self.step = step;
        Ok(())
    }

    /// The global leader's per-input states and ranks.
    fn load_leader<R: Read>(&mut self, d: &mut Decoder<R>) -> Result<()> {
        let n = self.catalog.inputs.len();
        get_count(d, n)?;
        let mut states = Vec::with_capacity(n);
        for g in 0..n {
            let has = d.bool()?;
            let ratios = d.f64s()?;
            let tokens = d.u64()?;
            let converged = d.bools()?;
            let kmax = self.leader.kmax(g);
            if (has && ratios.len() != kmax) || converged.len() > kmax {
                return Err(d.damaged(format!(
                    "input {g} has {} ratios and {} convergence flags where it has {kmax} candidate components",
                    ratios.len(),
                    converged.len()
                )));
            }
            let done = d.bool()?;
            let step = d.u64()?;
            states.push(InputState {
                ratios: has.then_some(ratios),
                tokens,
                converged,
                done,
                converged_step: step.checked_sub(1).map(|s| s as usize),
                // Re-estimated before the next decision (degenerate inputs are never done).
                degenerate: false,
            });
        }
        let ranks = d.u64s()?;
        if ranks.len() != self.catalog.layers.len() {
            return Err(d.damaged(format!(
                "ranks for {} layers where the run has {}",
                ranks.len(),
                self.catalog.layers.len()
            )));
        }
        self.leader.states = states;
        self.leader.ranks = ranks.into_iter().map(|r| r as usize).collect();
        Ok(())
    }

    /// This rank's statistics of input `g` as saved (`kind` 0: none, 1: exact, 2: sketch), which
    /// must be what this run set up for it, around the same reference vector.
    fn load_local<R: Read>(&mut self, d: &mut Decoder<R>, g: usize, kind: u8) -> Result<()> {
        let name = self.catalog.layers[self.catalog.representative(g)]
            .name
            .clone();
        let dim = self.catalog.inputs[g].dim;
        // Statistics on a GPU are restored on the host, then uploaded again.
        let gpu = match &self.stats.local[g] {
            Some(InputStats::Device(dev)) => Some(dev.gpu().clone()),
            _ => None,
        };
        let mut copy = match (&gpu, &self.stats.local[g]) {
            (Some(_), Some(dev)) => Some(dev.to_host()?),
            _ => None,
        };
        let slot = self.stats.local[g].as_mut();
        let here = match copy.as_mut() {
            Some(host) => Some(host),
            None => slot,
        };
        let expected = match &here {
            None => 0,
            Some(InputStats::Exact(_)) => 1,
            Some(InputStats::Sketch(_)) => 2,
            Some(InputStats::Device(_)) => unreachable!("copied to the host above"),
        };
        if kind != expected {
            let what = |k: u8| match k {
                0 => "no statistics",
                1 => "exact statistics",
                2 => "a sketch",
                _ => "an unknown statistic",
            };
            return Err(d.damaged(format!(
                "it holds {} of input {g} ({name}) where this run keeps {} on this rank",
                what(kind),
                what(expected)
            )));
        }
        let Some(here) = here else {
            return Ok(());
        };
        let reference = d.f32s()?;
        let theirs = match &*here {
            InputStats::Exact(x) => x.reference(),
            InputStats::Sketch(s) => s.reference(),
            InputStats::Device(_) => unreachable!("copied to the host above"),
        };
        let same = reference.len() == theirs.len()
            && reference
                .iter()
                .zip(theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            return Err(crate::Error::data(format!(
                "the checkpoint was taken on other data or another model: the mean of the first unit at input {g} ({name}) differs from this run's"
            )));
        }
        let moments = get_moments(d, dim)?;
        match here {
            InputStats::Exact(x) => {
                let packed = d.f64s()?;
                if packed.len() != dim * (dim + 1) / 2 {
                    return Err(d.damaged(format!(
                        "a Gram triangle of {} values at input {g}, d = {dim}",
                        packed.len()
                    )));
                }
                x.restore(moments, &packed);
            }
            InputStats::Sketch(s) => {
                let k = d.u64()?;
                if k != s.size() as u64 {
                    return Err(d.damaged(format!(
                        "a sketch of {k} columns at input {g}, this run has {}",
                        s.size()
                    )));
                }
                let y = get_matrix(d, dim, Some(s.sketch().ncols()))?
                    .ok_or_else(|| d.damaged(format!("the sketch of input {g} is missing")))?;
                s.restore(moments, y);
            }
            InputStats::Device(_) => unreachable!("copied to the host above"),
        }
        if let (Some(gpu), Some(host)) = (gpu, copy) {
            self.stats.local[g] = Some(host.to_device(&gpu)?);
        }
        Ok(())
    }

    /// The all-reduced part of input `g` as saved, in the shape this run set up.
    fn load_shared<R: Read>(&mut self, d: &mut Decoder<R>, g: usize) -> Result<()> {
        let dim = self.catalog.inputs[g].dim;
        let moments = get_moments(d, dim)?;
        let here = self.stats.shared[g]
            .as_mut()
            .expect("checked by the caller");
        let sketch = get_matrix(d, dim, here.sketch.as_ref().map(|s| s.ncols()))?;
        if sketch.is_some() != here.sketch.is_some() {
            return Err(d.damaged(format!("input {g}'s shared sketch does not match the run")));
        }
        let gram = d.bool()?;
        if gram != here.gram.is_some() {
            return Err(d.damaged(format!(
                "input {g}'s shared Gram does not match the run (another number of replicas?)"
            )));
        }
        if let Some(full) = here.gram.as_mut() {
            let packed = d.f64s()?;
            if packed.len() != dim * (dim + 1) / 2 {
                return Err(d.damaged(format!(
                    "a shared Gram triangle of {} values at input {g}, d = {dim}",
                    packed.len()
                )));
            }
            exact::unpack_upper(&packed, dim, full);
        }
        here.moments = moments;
        here.sketch = sketch;
        Ok(())
    }
}

/// Reads the header of a checkpoint file.
pub fn read_header<R: Read>(d: &mut Decoder<R>) -> Result<Header> {
    let fingerprint = decode_fingerprint(&d.str()?);
    let rank = d.count("the rank", usize::MAX)?;
    let size = d.count("the world size", usize::MAX)?;
    let step = d.count("the step", usize::MAX)?;
    d.check_seal()?;
    Ok(Header {
        fingerprint,
        rank,
        size,
        step,
    })
}

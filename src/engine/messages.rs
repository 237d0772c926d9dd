//! The messages of a step and their encodings.
//!
//! Inside a stage, its leader (replica 0) drives the products of Grams that stay on their ranks
//! ([`super::products`]); the others serve its [`Command`]s (broadcast on the stage's
//! communicator) until `Done`:
//!
//! | command | payload | the stage's other ranks answer with |
//! |---|---|---|
//! | `Apply` | input, `Q` (`d x m`) | their local `G·Q`, summed by all-reduce |
//! | `Gram` | input | their local Gram (upper triangle), summed by all-reduce (small `d` only) |
//! | `Done` | — | — (the stage's solves are over) |
//! | `Abort` | the stage leader's error | — (they fail with it) |
//!
//! Across the world, the global leader (world rank 0) broadcasts one [`Verdict`] per step and
//! one at the end: `Decide` (which inputs accumulate and which are tested next), `Ranks` (the
//! final allocation), `Finish` (the adapter and report) or `Abort`. Stage leaders send it
//! [`Estimate`]s (ratios and convergence flags, never vectors) and, at the end, their layers'
//! `lora_A`. Every message travels through a [`Wire`], which counts it.

use super::accounting::Wire;
use crate::adapter::LayerAdapter;
use crate::comm::codec::{Reader, Writer};
use crate::leader::{Certificate, Decision, Estimate, Spectrum, Summary};
use crate::{Error, Result};
use ndarray::Array2;

fn write_certificate(w: &mut Writer, c: &Certificate) {
    match *c {
        Certificate::Exact { residual } => w.u8(0).f64s(&[residual]),
        Certificate::Sketch {
            sketch_size,
            nuclear_error,
            spectral_bound,
        } => w
            .u8(1)
            .u64(sketch_size as u64)
            .f64s(&[nuclear_error, spectral_bound]),
    };
}

fn read_certificate(r: &mut Reader) -> Result<Certificate> {
    let bad = |what: &str| Error::Comm(format!("malformed certificate: {what}"));
    Ok(match r.u8()? {
        0 => Certificate::Exact {
            residual: *r.f64s()?.first().ok_or_else(|| bad("residual"))?,
        },
        _ => {
            let sketch_size = r.u64()? as usize;
            let e = r.f64s()?;
            if e.len() != 2 {
                return Err(bad("sketch bounds"));
            }
            Certificate::Sketch {
                sketch_size,
                nuclear_error: e[0],
                spectral_bound: e[1],
            }
        }
    })
}

fn write_summary(w: &mut Writer, s: &Summary) {
    w.f64s(&s.values)
        .f64s(&s.residuals)
        .f64s(&[s.trace, s.second_moment])
        .u64(s.tokens);
    write_certificate(w, &s.certificate);
}

fn read_summary(r: &mut Reader) -> Result<Summary> {
    let values = r.f64s()?;
    let residuals = r.f64s()?;
    let (trace, second_moment) = match r.f64s()?[..] {
        [t, m] => (t, m),
        _ => return Err(Error::Comm("malformed summary: trace".into())),
    };
    let tokens = r.u64()?;
    Ok(Summary {
        values,
        residuals,
        trace,
        tokens,
        second_moment,
        certificate: read_certificate(r)?,
    })
}

/// Spectra as bytes, for gathering a stage's round-robin solves on its leader.
pub fn encode_spectra(spectra: &[(usize, Spectrum)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(spectra.len() as u64);
    for (g, s) in spectra {
        w.u64(*g as u64).u64(s.vectors.nrows() as u64);
        w.f64s(
            s.vectors
                .as_standard_layout()
                .as_slice()
                .expect("standard layout"),
        );
        write_summary(&mut w, &s.summary);
    }
    w.0
}

/// Reads back [`encode_spectra`].
pub fn decode_spectra(buf: &[u8]) -> Result<Vec<(usize, Spectrum)>> {
    let mut r = Reader::new(buf);
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let g = r.u64()? as usize;
        let rows = r.u64()? as usize;
        let data = r.f64s()?;
        let summary = read_summary(&mut r)?;
        let vectors = Array2::from_shape_vec((rows, summary.values.len()), data)
            .map_err(|e| Error::Comm(format!("malformed spectrum message: {e}")))?;
        out.push((g, Spectrum { vectors, summary }));
    }
    Ok(out)
}

/// A stage leader's estimates, for the global leader.
pub fn encode_estimates(estimates: &[(usize, Estimate)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(estimates.len() as u64);
    for (g, e) in estimates {
        w.u64(*g as u64).bools(&e.converged);
        write_summary(&mut w, &e.summary);
    }
    w.0
}

/// Reads back [`encode_estimates`].
pub fn decode_estimates(buf: &[u8]) -> Result<Vec<(usize, Estimate)>> {
    let mut r = Reader::new(buf);
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let g = r.u64()? as usize;
        let converged = r.bools()?;
        out.push((
            g,
            Estimate {
                converged,
                summary: read_summary(&mut r)?,
            },
        ));
    }
    Ok(out)
}

/// A stage leader's layers of the adapter, for rank 0.
pub fn encode_layers(layers: &[(usize, LayerAdapter)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(layers.len() as u64);
    for (i, l) in layers {
        w.u64(*i as u64)
            .bytes(l.name.as_bytes())
            .u64(l.rank as u64)
            .f64s(&[l.alpha])
            .u64(l.out_features as u64)
            .u64(l.a.ncols() as u64);
        w.f32s(
            l.a.as_standard_layout()
                .as_slice()
                .expect("standard layout"),
        );
    }
    w.0
}

/// Reads back [`encode_layers`].
pub fn decode_layers(buf: &[u8]) -> Result<Vec<(usize, LayerAdapter)>> {
    let bad = |e: String| Error::Comm(format!("malformed adapter layers: {e}"));
    let mut r = Reader::new(buf);
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let i = r.u64()? as usize;
        let name = String::from_utf8_lossy(r.bytes()?).into_owned();
        let rank = r.u64()? as usize;
        let alpha = r
            .f64s()?
            .first()
            .copied()
            .ok_or_else(|| bad("missing alpha".into()))?;
        let out_features = r.u64()? as usize;
        let cols = r.u64()? as usize;
        // `rank` rows, or `rank` per expert for a 3-D parameter's fused lora_A.
        let values = r.f32s()?;
        let rows = values.len().checked_div(cols).unwrap_or(rank);
        let a = Array2::from_shape_vec((rows, cols), values).map_err(|e| bad(e.to_string()))?;
        out.push((
            i,
            LayerAdapter {
                name,
                rank,
                alpha,
                a,
                out_features,
            },
        ));
    }
    Ok(out)
}

/// What a stage leader tells the other ranks of its stage.
pub enum Command {
    Apply { input: usize, q: Array2<f64> },
    Gram { input: usize },
    Done,
    Abort(String),
}

impl Command {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Command::Apply { input, q } => {
                w.u8(0)
                    .u64(*input as u64)
                    .u64(q.ncols() as u64)
                    .f64s(q.as_standard_layout().as_slice().expect("standard layout"));
            }
            Command::Gram { input } => {
                w.u8(1).u64(*input as u64);
            }
            Command::Done => {
                w.u8(2);
            }
            Command::Abort(msg) => {
                w.u8(3).bytes(msg.as_bytes());
            }
        }
        w.0
    }

    /// Reads back [`Command::encode`].
    pub(super) fn decode(buf: &[u8]) -> Result<Command> {
        let mut r = Reader::new(buf);
        Ok(match r.u8()? {
            0 => {
                let input = r.u64()? as usize;
                let cols = r.u64()? as usize;
                let data = r.f64s()?;
                let rows = data.len().checked_div(cols).unwrap_or(0);
                let q = Array2::from_shape_vec((rows, cols), data)
                    .map_err(|e| Error::Comm(format!("malformed Apply command: {e}")))?;
                Command::Apply { input, q }
            }
            1 => Command::Gram {
                input: r.u64()? as usize,
            },
            2 => Command::Done,
            3 => Command::Abort(String::from_utf8_lossy(r.bytes()?).into_owned()),
            tag => return Err(Error::Comm(format!("unknown stage command {tag}"))),
        })
    }
}

/// Stage leader: broadcasts a command to its stage.
pub fn send(stage: &Wire, cmd: &Command) -> Result<()> {
    let mut buf = cmd.encode();
    stage.broadcast(&mut buf, 0)
}

/// What the global leader tells every rank.
pub enum Verdict {
    /// The step's decision.
    Decide(Decision),
    /// The final rank of every layer.
    Ranks(Vec<usize>),
    /// The adapter and the report.
    Finish(Vec<u8>),
    /// The leader's error: every rank fails with it.
    Abort(String),
}

impl Verdict {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Verdict::Decide(d) => {
                w.u8(0)
                    .bools(&d.accumulate)
                    .bools(&d.test)
                    .u8(d.all_done as u8);
            }
            Verdict::Ranks(r) => {
                w.u8(1).u64(r.len() as u64);
                for &v in r {
                    w.u64(v as u64);
                }
            }
            Verdict::Finish(bytes) => {
                w.u8(2).bytes(bytes);
            }
            Verdict::Abort(msg) => {
                w.u8(3).bytes(msg.as_bytes());
            }
        }
        w.0
    }

    fn decode(buf: &[u8]) -> Result<Verdict> {
        let mut r = Reader::new(buf);
        Ok(match r.u8()? {
            0 => Verdict::Decide(Decision {
                accumulate: r.bools()?,
                test: r.bools()?,
                all_done: r.u8()? != 0,
            }),
            1 => {
                let n = r.u64()? as usize;
                Verdict::Ranks(
                    (0..n.min(buf.len()))
                        .map(|_| r.u64().map(|v| v as usize))
                        .collect::<Result<_>>()?,
                )
            }
            2 => Verdict::Finish(r.bytes()?.to_vec()),
            3 => Verdict::Abort(String::from_utf8_lossy(r.bytes()?).into_owned()),
            tag => return Err(Error::Comm(format!("unknown leader verdict {tag}"))),
        })
    }
}

/// Global leader: broadcasts `work`'s verdict, or an abort with its error, to every rank (the
/// others call [`receive_verdict`] at the same point).
pub fn announce<T>(
    world: &Wire,
    work: Result<T>,
    verdict: impl FnOnce(&T) -> Verdict,
) -> Result<T> {
    let v = match &work {
        Ok(t) => verdict(t),
        Err(e) => Verdict::Abort(e.to_string()),
    };
    let mut buf = v.encode();
    world.broadcast(&mut buf, 0)?;
    work
}

/// Every rank but the global leader: the verdict [`announce`] broadcast (an abort as an error).
pub fn receive_verdict(world: &Wire) -> Result<Verdict> {
    let mut buf = Vec::new();
    world.broadcast(&mut buf, 0)?;
    match Verdict::decode(&buf)? {
        Verdict::Abort(msg) => Err(Error::Comm(format!("rank 0 failed: {msg}"))),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let q = Array2::from_shape_fn((3, 2), |(i, j)| (i * 2 + j) as f64);
        match Command::decode(
            &Command::Apply {
                input: 4,
                q: q.clone(),
            }
            .encode(),
        )
        .unwrap()
        {
            Command::Apply { input, q: back } => assert_eq!((input, &back), (4, &q)),
            _ => panic!("wrong command"),
        }
        let d = Decision {
            accumulate: vec![true, true, false],
            test: vec![true, false, false],
            all_done: true,
        };
        match Verdict::decode(&Verdict::Decide(d.clone()).encode()).unwrap() {
            Verdict::Decide(back) => assert_eq!(back, d),
            _ => panic!("wrong verdict"),
        }
        match Verdict::decode(&Verdict::Ranks(vec![3, 0, 7]).encode()).unwrap() {
            Verdict::Ranks(r) => assert_eq!(r, vec![3, 0, 7]),
            _ => panic!("wrong verdict"),
        }
        assert!(Command::decode(&[9]).is_err() && Verdict::decode(&[9]).is_err());
        assert!(Command::decode(&[]).is_err() && Verdict::decode(&[]).is_err());
        let summary = Summary {
            values: vec![2.0, 1.0],
            residuals: vec![1e-9, 2e-9],
            trace: 4.0,
            tokens: 77,
            second_moment: 6.5,
            certificate: Certificate::Sketch {
                sketch_size: 9,
                nuclear_error: 0.5,
                spectral_bound: 0.25,
            },
        };
        let spectrum = Spectrum {
            vectors: q.slice(ndarray::s![.., ..2]).to_owned(),
            summary: summary.clone(),
        };
        let back = decode_spectra(&encode_spectra(&[(3, spectrum.clone())])).unwrap();
        assert_eq!((back.len(), back[0].0), (1, 3));
        assert_eq!(
            (&back[0].1.vectors, &back[0].1.summary),
            (&spectrum.vectors, &summary)
        );
        let est = Estimate {
            converged: vec![true, false],
            summary,
        };
        let back = decode_estimates(&encode_estimates(&[(5, est.clone())])).unwrap();
        assert_eq!((back[0].0, &back[0].1), (5, &est));
        let layer = LayerAdapter {
            name: "m.q".into(),
            rank: 2,
            alpha: 1.5,
            a: Array2::from_elem((2, 3), 0.5),
            out_features: 7,
        };
        let back = decode_layers(&encode_layers(&[(9, layer.clone())])).unwrap();
        assert_eq!(
            (
                back[0].0,
                &back[0].1.name,
                &back[0].1.a,
                back[0].1.out_features
            ),
            (9, &layer.name, &layer.a, 7)
        );
    }
}

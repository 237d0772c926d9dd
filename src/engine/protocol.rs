//! The leader phase as messages. The leader broadcasts commands; every other rank serves them
//! until a decision, the outcome or an abort arrives:
//!
//! | command | payload | others answer with |
//! |---|---|---|
//! | `Apply` | input, `Q` (`d x m`) | their local `G·Q`, summed by all-reduce |
//! | `Gram` | input | their local Gram (upper triangle), summed by all-reduce (small `d` only) |
//! | `Decide` | inputs that accumulate and inputs tested next step, all-done flag | — (the step ends) |
//! | `Finish` | the adapter and report | — (the run ends) |
//! | `Abort` | the leader's error | — (every rank fails with it) |
//!
//! [`Wire`] wraps the communicator to count payload bytes and time.

use crate::comm::wire::{Reader, Writer};
use crate::comm::Communicator;
use crate::leader::{Certificate, Decision, Spectrum};
use crate::stats::exact::{pack_upper, unpack_upper, ExactStats};
use crate::stats::InputStats;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// The communicator with accounting: payload bytes and time spent in collectives.
pub struct Wire<'a> {
    pub comm: &'a dyn Communicator,
    bytes: Cell<u64>,
    time: Cell<Duration>,
}

impl<'a> Wire<'a> {
    pub fn new(comm: &'a dyn Communicator) -> Self {
        Wire {
            comm,
            bytes: Cell::new(0),
            time: Cell::new(Duration::ZERO),
        }
    }

    fn count<T>(&self, bytes: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let out = f();
        self.time.set(self.time.get() + t.elapsed());
        if self.comm.size() > 1 {
            self.bytes.set(self.bytes.get() + bytes as u64);
        }
        out
    }

    /// Sum all-reduce (counted on every rank).
    pub fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        self.count(buf.len() * 8, || self.comm.all_reduce_sum(buf))
    }

    /// Broadcast (counted at the root).
    pub fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let n = if self.comm.rank() == root {
            buf.len()
        } else {
            0
        };
        self.count(n, || self.comm.broadcast(buf, root))
    }

    /// Gather to `root` (counted at the senders).
    pub fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let n = if self.comm.rank() == root {
            0
        } else {
            send.len()
        };
        self.count(n, || self.comm.gather(send, root))
    }

    /// [`crate::comm::agree`], timed.
    pub fn agree<T>(&self, local: Result<T>) -> Result<T> {
        self.count(8 * self.comm.size(), || {
            crate::comm::agree(self.comm, local)
        })
    }

    /// Payload bytes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Time in collectives so far.
    pub fn time(&self) -> Duration {
        self.time.get()
    }
}

/// Spectra as bytes, for gathering the round-robin solves on the leader.
pub fn encode_spectra(spectra: &[(usize, Spectrum)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(spectra.len() as u64);
    for (g, s) in spectra {
        w.u64(*g as u64)
            .f64s(&s.values)
            .u64(s.vectors.nrows() as u64);
        w.f64s(
            s.vectors
                .as_standard_layout()
                .as_slice()
                .expect("standard layout"),
        );
        w.f64s(&s.residuals).f64s(&[s.trace]).u64(s.tokens);
        match s.certificate {
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
    w.0
}

/// Reads back [`encode_spectra`].
pub fn decode_spectra(buf: &[u8]) -> Result<Vec<(usize, Spectrum)>> {
    let bad = |what: &str| Error::Comm(format!("malformed spectrum message: {what}"));
    let mut r = Reader::new(buf);
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let g = r.u64()? as usize;
        let values = r.f64s()?;
        let rows = r.u64()? as usize;
        let data = r.f64s()?;
        let vectors =
            Array2::from_shape_vec((rows, values.len()), data).map_err(|e| bad(&e.to_string()))?;
        let residuals = r.f64s()?;
        let trace = *r.f64s()?.first().ok_or_else(|| bad("trace"))?;
        let tokens = r.u64()?;
        let certificate = match r.u8()? {
            0 => Certificate::Exact {
                residual: *r.f64s()?.first().ok_or_else(|| bad("residual"))?,
            },
            _ => {
                let sketch_size = r.u64()? as usize;
                let e = r.f64s()?;
                if e.len() != 2 {
                    return Err(bad("sketch certificate"));
                }
                Certificate::Sketch {
                    sketch_size,
                    nuclear_error: e[0],
                    spectral_bound: e[1],
                }
            }
        };
        out.push((
            g,
            Spectrum {
                values,
                vectors,
                residuals,
                trace,
                tokens,
                certificate,
            },
        ));
    }
    Ok(out)
}

/// What the leader tells the others to do.
pub enum Command {
    Apply { input: usize, q: Array2<f64> },
    Gram { input: usize },
    Decide(Decision),
    Finish(Vec<u8>),
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
            Command::Decide(d) => {
                w.u8(2)
                    .bools(&d.accumulate)
                    .bools(&d.test)
                    .u8(d.all_done as u8);
            }
            Command::Finish(bytes) => {
                w.u8(3).bytes(bytes);
            }
            Command::Abort(msg) => {
                w.u8(4).bytes(msg.as_bytes());
            }
        }
        w.0
    }

    fn decode(buf: &[u8]) -> Result<Command> {
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
            2 => Command::Decide(Decision {
                accumulate: r.bools()?,
                test: r.bools()?,
                all_done: r.u8()? != 0,
            }),
            3 => Command::Finish(r.bytes()?.to_vec()),
            4 => Command::Abort(String::from_utf8_lossy(r.bytes()?).into_owned()),
            tag => return Err(Error::Comm(format!("unknown leader command {tag}"))),
        })
    }
}

fn exact(stats: &[InputStats], input: usize) -> Result<&ExactStats> {
    match stats.get(input) {
        Some(InputStats::Exact(e)) => Ok(e),
        _ => Err(Error::Comm(format!(
            "leader asked for Gram products of input {input}, which has no exact statistics"
        ))),
    }
}

/// Leader: broadcasts a command.
pub fn send(wire: &Wire, cmd: &Command) -> Result<()> {
    let mut buf = cmd.encode();
    wire.broadcast(&mut buf, 0)
}

/// Leader: `Σ_r G_r·Q` for `input`, every rank multiplying its own Gram.
pub fn apply(
    wire: &Wire,
    stats: &[InputStats],
    input: usize,
    q: ArrayView2<f64>,
) -> Result<Array2<f64>> {
    if wire.comm.size() > 1 {
        send(
            wire,
            &Command::Apply {
                input,
                q: q.to_owned(),
            },
        )?;
    }
    let mut z = exact(stats, input)?.gram_apply(q)?;
    wire.all_reduce_sum(z.as_slice_mut().expect("owned standard layout"))?;
    Ok(z)
}

/// Leader: the summed Gram (upper triangle) of `input`.
pub fn gram(wire: &Wire, stats: &[InputStats], input: usize) -> Result<Vec<f64>> {
    if wire.comm.size() > 1 {
        send(wire, &Command::Gram { input })?;
    }
    let e = exact(stats, input)?;
    let mut packed = Vec::new();
    pack_upper(e.gram(), e.dim(), &mut packed);
    wire.all_reduce_sum(&mut packed)?;
    let mut g = vec![0.0; e.dim() * e.dim()];
    unpack_upper(&packed, e.dim(), &mut g);
    Ok(g)
}

/// What ends a follower's service.
pub enum Reply {
    Decide(Decision),
    Finish(Vec<u8>),
}

/// Follower: serves the leader's products until a decision, the outcome or an abort.
pub fn serve(wire: &Wire, stats: &[InputStats]) -> Result<Reply> {
    loop {
        let mut buf = Vec::new();
        wire.broadcast(&mut buf, 0)?;
        match Command::decode(&buf)? {
            Command::Apply { input, q } => {
                let mut z = exact(stats, input)?.gram_apply(q.view())?;
                wire.all_reduce_sum(z.as_slice_mut().expect("owned standard layout"))?;
            }
            Command::Gram { input } => {
                let e = exact(stats, input)?;
                let mut packed = Vec::new();
                pack_upper(e.gram(), e.dim(), &mut packed);
                wire.all_reduce_sum(&mut packed)?;
            }
            Command::Decide(d) => return Ok(Reply::Decide(d)),
            Command::Finish(bytes) => return Ok(Reply::Finish(bytes)),
            Command::Abort(msg) => return Err(Error::Comm(format!("rank 0 failed: {msg}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
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
        match Command::decode(&Command::Decide(d.clone()).encode()).unwrap() {
            Command::Decide(back) => assert_eq!(back, d),
            _ => panic!("wrong command"),
        }
        assert!(Command::decode(&[9]).is_err());
        let spectrum = Spectrum {
            values: vec![2.0, 1.0],
            vectors: q.slice(ndarray::s![.., ..2]).to_owned(),
            residuals: vec![1e-9, 2e-9],
            trace: 4.0,
            tokens: 77,
            certificate: Certificate::Sketch {
                sketch_size: 9,
                nuclear_error: 0.5,
                spectral_bound: 0.25,
            },
        };
        let back = decode_spectra(&encode_spectra(&[(3, spectrum.clone())])).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, 3);
        assert_eq!(
            (
                back[0].1.values.clone(),
                back[0].1.vectors.clone(),
                back[0].1.tokens
            ),
            (spectrum.values, spectrum.vectors, 77)
        );
        assert_eq!(back[0].1.certificate, spectrum.certificate);
        assert!(Command::decode(&[]).is_err());
    }
}

//! The messages of a step, and the communicator wrapper that counts them.
//!
//! Inside a stage, its leader (replica 0) drives the products of Grams that stay on their ranks;
//! the others serve its commands (broadcast on the stage's communicator) until `Done`:
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
//! `lora_A`. [`Wire`] wraps each communicator to count payload bytes and time.

use crate::adapter::LayerAdapter;
use crate::comm::wire::{Reader, Writer};
use crate::comm::Communicator;
use crate::device::backend::Backend;
use crate::device::cuda::{Cuda, DeviceSums};
use crate::device::gpu::DeviceBuffer;
use crate::device::rows::Hidden;
use crate::leader::{Certificate, Decision, Estimate, Spectrum, Summary};
use crate::stats::exact::{pack_upper, unpack_upper};
use crate::stats::{InputStats, Packed};
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes and time spent communicating, shared by the wires of one rank.
#[derive(Default)]
pub struct Accounting {
    bytes: Cell<u64>,
    hidden: Cell<u64>,
    time: Cell<Duration>,
}

impl Accounting {
    /// Starts from the totals of a run resumed from a checkpoint.
    pub fn restore(&self, bytes: u64, hidden: u64, time: Duration) {
        self.bytes.set(bytes);
        self.hidden.set(hidden);
        self.time.set(time);
    }

    /// Payload bytes of collectives so far (hidden states not included).
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Bytes of hidden states sent to the next stage so far.
    pub fn hidden(&self) -> u64 {
        self.hidden.get()
    }

    /// Time in collectives and point-to-point messages so far.
    pub fn time(&self) -> Duration {
        self.time.get()
    }
}

/// A communicator with accounting: payload bytes and time.
pub struct Wire<'a> {
    pub comm: &'a dyn Communicator,
    acct: &'a Accounting,
}

impl<'a> Wire<'a> {
    pub fn new(comm: &'a dyn Communicator, acct: &'a Accounting) -> Self {
        Wire { comm, acct }
    }

    fn count<T>(&self, bytes: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let out = f();
        self.acct.time.set(self.acct.time.get() + t.elapsed());
        if self.comm.size() > 1 {
            self.acct.bytes.set(self.acct.bytes.get() + bytes as u64);
        }
        out
    }

    /// Sum all-reduce (counted on every rank).
    pub fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        self.count(buf.len() * 8, || self.comm.all_reduce_sum(buf))
    }

    /// Sum all-reduce of values in GPU memory, in place (counted on every rank).
    pub fn all_reduce_device(&self, buf: &mut DeviceSums) -> Result<()> {
        self.count(buf.len() * 8, || self.comm.all_reduce_sum_device(buf))
    }

    /// The fused all-reduce of a stage's packed shared parts, where they were packed (on a GPU
    /// through [`Wire::all_reduce_device`]), returned in host memory for `Shared::unpack`.
    /// Packing on a GPU can fail (its memory): the stage agrees on it first, so that no rank
    /// waits in a sum that another never joins.
    pub fn all_reduce_packed(&self, packed: Result<Packed>) -> Result<Vec<f64>> {
        let packed = match packed {
            Ok(Packed::Host(v)) => Packed::Host(v),
            other => self.agree(other)?,
        };
        match packed {
            Packed::Host(mut v) => {
                self.all_reduce_sum(&mut v)?;
                Ok(v)
            }
            Packed::Device(mut d) => {
                self.all_reduce_device(&mut d)?;
                d.to_host()
            }
        }
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

    /// Sends a pass's hidden state to `dest`, or the news that this pass failed upstream (counted
    /// apart from the collectives' bytes). One message ([`HiddenMessage`]) carries a host hidden
    /// state whole, or the shape of one on the GPU, whose values follow by
    /// [`Communicator::send_device`] (GPU to GPU with NCCL, through the host otherwise).
    pub fn send_hidden(&self, hidden: Option<&Hidden>, dest: usize) -> Result<()> {
        let t = Instant::now();
        let msg = HiddenMessage::encode(hidden);
        let mut bytes = msg.len();
        let mut out = self.comm.send(&msg, dest);
        if let (Ok(()), Some(Hidden::Device { gpu, x })) = (&out, hidden) {
            bytes += gpu.tokens(x) * gpu.dim(x) * 4;
            out = self.comm.send_device(gpu, x, dest);
        }
        self.acct.time.set(self.acct.time.get() + t.elapsed());
        self.acct.hidden.set(self.acct.hidden.get() + bytes as u64);
        out
    }

    /// Receives what [`Wire::send_hidden`] sent: `None` if the pass failed upstream. A hidden
    /// state on the sender's GPU is received on `gpu`, this rank's (`Source::device`).
    pub fn recv_hidden(&self, src: usize, gpu: Option<&Arc<Cuda>>) -> Result<Option<Hidden>> {
        let t = Instant::now();
        let out = self
            .comm
            .recv(src)
            .and_then(|msg| HiddenMessage::decode(&msg))
            .and_then(|msg| match msg {
                HiddenMessage::Failed => Ok(None),
                HiddenMessage::Host(h) => Ok(Some(Hidden::Host(h))),
                HiddenMessage::Device { rows, cols } => {
                    let gpu = gpu.ok_or_else(|| {
                        Error::Comm(format!(
                            "rank {src} sent a hidden state on its GPU; this rank computes on the CPU (every stage needs the same --device)"
                        ))
                    })?;
                    let x = self.comm.recv_device(gpu, rows, cols, src)?;
                    Ok(Some(Hidden::Device {
                        gpu: gpu.clone(),
                        x,
                    }))
                }
            });
        self.acct.time.set(self.acct.time.get() + t.elapsed());
        out
    }
}

/// The message that announces a pass's hidden state to the next stage.
#[derive(Debug, PartialEq)]
enum HiddenMessage {
    /// The pass failed upstream (`[0]`).
    Failed,
    /// A host hidden state, whole (`[1, rows, values]`).
    Host(Array2<f32>),
    /// The shape of one on the sender's GPU (`[2, rows, cols]`); the values follow by
    /// [`Communicator::send_device`].
    Device { rows: usize, cols: usize },
}

impl HiddenMessage {
    fn encode(hidden: Option<&Hidden>) -> Vec<u8> {
        let mut w = Writer::default();
        match hidden {
            None => {
                w.u8(0);
            }
            Some(Hidden::Host(h)) => {
                w.u8(1).u64(h.nrows() as u64);
                w.f32s(h.as_standard_layout().as_slice().expect("standard layout"));
            }
            Some(Hidden::Device { gpu, x }) => {
                return Self::device_header(gpu.tokens(x), gpu.dim(x))
            }
        }
        w.0
    }

    fn device_header(rows: usize, cols: usize) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(2).u64(rows as u64).u64(cols as u64);
        w.0
    }

    fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        let malformed =
            |e: &dyn std::fmt::Display| Error::Comm(format!("malformed hidden state message: {e}"));
        match r.u8()? {
            0 => Ok(HiddenMessage::Failed),
            1 => {
                let rows = r.u64()? as usize;
                let data = r.f32s()?;
                let cols = data.len().checked_div(rows).unwrap_or(0);
                Array2::from_shape_vec((rows, cols), data)
                    .map(HiddenMessage::Host)
                    .map_err(|e| malformed(&e))
            }
            2 => {
                let (rows, cols) = (r.u64()? as usize, r.u64()? as usize);
                Ok(HiddenMessage::Device { rows, cols })
            }
            tag => Err(malformed(&format!("unknown kind {tag}"))),
        }
    }
}

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
        let a = Array2::from_shape_vec((rank, cols), r.f32s()?).map_err(|e| bad(e.to_string()))?;
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
            2 => Command::Done,
            3 => Command::Abort(String::from_utf8_lossy(r.bytes()?).into_owned()),
            tag => return Err(Error::Comm(format!("unknown stage command {tag}"))),
        })
    }
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

/// This rank's part of `Σ_r G_r·Q` for `input`, summed over the stage: host Grams by `dsymm`
/// and a host all-reduce, Grams on a GPU by cuBLAS `dsymm` there and an all-reduce of the
/// products in GPU memory (NCCL), copied to the host for the leader's iteration.
fn gram_product(
    stage: &Wire,
    stats: &[Option<InputStats>],
    input: usize,
    q: ArrayView2<f64>,
) -> Result<Array2<f64>> {
    match stats.get(input) {
        Some(Some(InputStats::Exact(e))) => {
            let mut z = e.gram_apply(q)?;
            stage.all_reduce_sum(z.as_slice_mut().expect("owned standard layout"))?;
            Ok(z)
        }
        Some(Some(InputStats::Device(x))) if x.sketch().is_none() => {
            let mut z = x.gram_apply(q)?;
            stage.all_reduce_device(&mut z)?;
            Ok(Array2::from_shape_vec(q.dim(), z.to_host()?).expect("d x m products"))
        }
        _ => Err(not_exact(input)),
    }
}

/// The upper triangle of `input`'s Gram, packed row by row, summed over the stage (on the GPU
/// for device statistics).
fn summed_gram(stage: &Wire, stats: &[Option<InputStats>], input: usize) -> Result<Vec<f64>> {
    match stats.get(input) {
        Some(Some(InputStats::Exact(e))) => {
            let mut packed = Vec::new();
            pack_upper(e.gram(), e.dim(), &mut packed);
            stage.all_reduce_sum(&mut packed)?;
            Ok(packed)
        }
        Some(Some(InputStats::Device(x))) if x.sketch().is_none() => {
            let mut packed = x.packed_gram()?;
            stage.all_reduce_device(&mut packed)?;
            packed.to_host()
        }
        _ => Err(not_exact(input)),
    }
}

fn not_exact(input: usize) -> Error {
    Error::Comm(format!("the stage leader asked for Gram products of input {input}, which has no exact statistics on this rank"))
}

/// Stage leader: broadcasts a command to its stage.
pub fn send(stage: &Wire, cmd: &Command) -> Result<()> {
    let mut buf = cmd.encode();
    stage.broadcast(&mut buf, 0)
}

/// Stage leader: `Σ_r G_r·Q` for `input` over the stage, every rank multiplying its own Gram.
pub fn apply(
    stage: &Wire,
    stats: &[Option<InputStats>],
    input: usize,
    q: ArrayView2<f64>,
) -> Result<Array2<f64>> {
    if stage.comm.size() > 1 {
        send(
            stage,
            &Command::Apply {
                input,
                q: q.to_owned(),
            },
        )?;
    }
    gram_product(stage, stats, input, q)
}

/// Stage leader: the summed Gram (upper triangle) of `input`.
pub fn gram(stage: &Wire, stats: &[Option<InputStats>], input: usize) -> Result<Vec<f64>> {
    if stage.comm.size() > 1 {
        send(stage, &Command::Gram { input })?;
    }
    let d = stats
        .get(input)
        .and_then(|s| s.as_ref())
        .map_or(0, |s| s.dim());
    let packed = summed_gram(stage, stats, input)?;
    let mut g = vec![0.0; d * d];
    unpack_upper(&packed, d, &mut g);
    Ok(g)
}

/// The stage's other ranks: serve the stage leader's products until `Done` or an abort.
pub fn serve(stage: &Wire, stats: &[Option<InputStats>]) -> Result<()> {
    loop {
        let mut buf = Vec::new();
        stage.broadcast(&mut buf, 0)?;
        match Command::decode(&buf)? {
            Command::Apply { input, q } => {
                gram_product(stage, stats, input, q.view())?;
            }
            Command::Gram { input } => {
                summed_gram(stage, stats, input)?;
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
        let h = Array2::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f32);
        let back = HiddenMessage::decode(&HiddenMessage::encode(Some(&Hidden::Host(h.clone()))));
        assert_eq!(back.unwrap(), HiddenMessage::Host(h));
        let back = HiddenMessage::decode(&HiddenMessage::encode(None));
        assert_eq!(back.unwrap(), HiddenMessage::Failed);
        let back = HiddenMessage::decode(&HiddenMessage::device_header(4, 3));
        assert_eq!(back.unwrap(), HiddenMessage::Device { rows: 4, cols: 3 });
        assert_eq!(HiddenMessage::device_header(4, 3).len(), 17);
        assert!(HiddenMessage::decode(&[3]).is_err() && HiddenMessage::decode(&[2, 1]).is_err());
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

    #[test]
    fn hidden_states_cross_stages_and_a_device_one_needs_a_gpu() {
        use crate::comm::threads::ThreadWorld;
        let h = Array2::from_shape_fn((5, 2), |(i, j)| (i * 2 + j) as f32 - 3.5);
        let expected = h.clone();
        let worlds = ThreadWorld::create(2);
        let out: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| {
                    let h = h.clone();
                    s.spawn(move || {
                        let acct = Accounting::default();
                        let wire = Wire::new(&w, &acct);
                        let got = if w.rank() == 0 {
                            wire.send_hidden(Some(&Hidden::Host(h)), 1).unwrap();
                            wire.send_hidden(None, 1).unwrap();
                            // A GPU stage's announcement, as a CPU rank would see it.
                            w.send(&HiddenMessage::device_header(5, 2), 1).unwrap();
                            Vec::new()
                        } else {
                            let first = match wire.recv_hidden(0, None).unwrap() {
                                Some(Hidden::Host(h)) => vec![Ok(h)],
                                _ => panic!("expected a host hidden state"),
                            };
                            assert!(wire.recv_hidden(0, None).unwrap().is_none());
                            let third = wire.recv_hidden(0, None).map(|_| ()).unwrap_err();
                            [first, vec![Err(third.to_string())]].concat()
                        };
                        w.barrier().unwrap();
                        (got, acct.hidden())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Rank 0 counted both messages: kind, rows, length and 10 f32s; then one byte.
        assert_eq!(out[0].1, (1 + 8 + 8 + 40) + 1);
        assert_eq!(out[1].0[0].as_ref().unwrap(), &expected);
        let e = out[1].0[1].as_ref().unwrap_err();
        assert!(e.contains("on its GPU") && e.contains("--device"), "{e}");
    }
}

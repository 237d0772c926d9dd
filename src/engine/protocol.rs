//! The leader phase as messages. The leader broadcasts commands; every other rank serves them
//! until a decision, the outcome or an abort arrives:
//!
//! | command | payload | others answer with |
//! |---|---|---|
//! | `Apply` | input, `Q` (`d x m`) | their local `G·Q`, summed by all-reduce |
//! | `Gram` | input | their local Gram (upper triangle), summed by all-reduce (small `d` only) |
//! | `Decide` | active inputs, all-done flag | — (the step ends) |
//! | `Finish` | the adapter and report | — (the run ends) |
//! | `Abort` | the leader's error | — (every rank fails with it) |
//!
//! [`Wire`] wraps the communicator to count payload bytes and time.

use crate::comm::wire::{Reader, Writer};
use crate::comm::Communicator;
use crate::stats::exact::ExactStats;
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
        Wire { comm, bytes: Cell::new(0), time: Cell::new(Duration::ZERO) }
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
        let n = if self.comm.rank() == root { buf.len() } else { 0 };
        self.count(n, || self.comm.broadcast(buf, root))
    }

    /// [`crate::comm::agree`], timed.
    pub fn agree<T>(&self, local: Result<T>) -> Result<T> {
        self.count(8 * self.comm.size(), || crate::comm::agree(self.comm, local))
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

/// What the leader tells the others to do.
pub enum Command {
    Apply { input: usize, q: Array2<f64> },
    Gram { input: usize },
    Decide { active: Vec<bool>, all_done: bool },
    Finish(Vec<u8>),
    Abort(String),
}

impl Command {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Command::Apply { input, q } => {
                w.u8(0).u64(*input as u64).u64(q.ncols() as u64).f64s(q.as_standard_layout().as_slice().expect("standard layout"));
            }
            Command::Gram { input } => {
                w.u8(1).u64(*input as u64);
            }
            Command::Decide { active, all_done } => {
                w.u8(2).bools(active).u8(*all_done as u8);
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
                let rows = if cols == 0 { 0 } else { data.len() / cols };
                let q = Array2::from_shape_vec((rows, cols), data).map_err(|e| Error::Comm(format!("malformed Apply command: {e}")))?;
                Command::Apply { input, q }
            }
            1 => Command::Gram { input: r.u64()? as usize },
            2 => Command::Decide { active: r.bools()?, all_done: r.u8()? != 0 },
            3 => Command::Finish(r.bytes()?.to_vec()),
            4 => Command::Abort(String::from_utf8_lossy(r.bytes()?).into_owned()),
            tag => return Err(Error::Comm(format!("unknown leader command {tag}"))),
        })
    }
}

fn exact(stats: &[InputStats], input: usize) -> Result<&ExactStats> {
    match stats.get(input) {
        Some(InputStats::Exact(e)) => Ok(e),
        _ => Err(Error::Comm(format!("leader asked for Gram products of input {input}, which has no exact statistics"))),
    }
}

/// Leader: broadcasts a command.
pub fn send(wire: &Wire, cmd: &Command) -> Result<()> {
    let mut buf = cmd.encode();
    wire.broadcast(&mut buf, 0)
}

/// Leader: `Σ_r G_r·Q` for `input`, every rank multiplying its own Gram.
pub fn apply(wire: &Wire, stats: &[InputStats], input: usize, q: ArrayView2<f64>) -> Result<Array2<f64>> {
    if wire.comm.size() > 1 {
        send(wire, &Command::Apply { input, q: q.to_owned() })?;
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
    let mut g = exact(stats, input)?.gram().to_vec();
    wire.all_reduce_sum(&mut g)?;
    Ok(g)
}

/// What ends a follower's service.
pub enum Reply {
    Decide { active: Vec<bool>, all_done: bool },
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
                let mut g = exact(stats, input)?.gram().to_vec();
                wire.all_reduce_sum(&mut g)?;
            }
            Command::Decide { active, all_done } => return Ok(Reply::Decide { active, all_done }),
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
        match Command::decode(&Command::Apply { input: 4, q: q.clone() }.encode()).unwrap() {
            Command::Apply { input, q: back } => assert_eq!((input, back), (4, q)),
            _ => panic!("wrong command"),
        }
        match Command::decode(&Command::Decide { active: vec![true, false], all_done: true }.encode()).unwrap() {
            Command::Decide { active, all_done } => assert_eq!((active, all_done), (vec![true, false], true)),
            _ => panic!("wrong command"),
        }
        assert!(Command::decode(&[9]).is_err());
        assert!(Command::decode(&[]).is_err());
    }
}

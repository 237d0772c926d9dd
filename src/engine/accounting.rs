//! A rank's communication accounting: [`Wire`] wraps a communicator to count payload bytes and
//! time in one [`Accounting`] per rank (the report's `bytes` and communication time), and carries a
//! pass's hidden state to the next pipeline stage (counted apart).

use crate::comm::codec::{Reader, Writer};
use crate::comm::Communicator;
use crate::device::backend::Backend;
use crate::device::cuda::{Cuda, DeviceSums};
use crate::device::gpu::DeviceBuffer;
use crate::device::rows::Hidden;
use crate::stats::Packed;
use crate::{Error, Result};
use ndarray::Array2;
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
        self.sum_packed(packed)
    }

    /// Sums every rank's `packed` values in place, where they are (host or GPU memory). Every
    /// rank must hold its part.
    pub fn all_reduce_in_place(&self, packed: &mut Packed) -> Result<()> {
        match packed {
            Packed::Host(v) => self.all_reduce_sum(v),
            Packed::Device(d) => self.all_reduce_device(d),
        }
    }

    /// [`Wire::all_reduce_in_place`], the sum returned in host memory.
    pub fn sum_packed(&self, mut packed: Packed) -> Result<Vec<f64>> {
        self.all_reduce_in_place(&mut packed)?;
        match packed {
            Packed::Host(v) => Ok(v),
            Packed::Device(d) => d.to_host(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_messages_round_trip() {
        let h = Array2::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f32);
        let back = HiddenMessage::decode(&HiddenMessage::encode(Some(&Hidden::Host(h.clone()))));
        assert_eq!(back.unwrap(), HiddenMessage::Host(h));
        let back = HiddenMessage::decode(&HiddenMessage::encode(None));
        assert_eq!(back.unwrap(), HiddenMessage::Failed);
        let back = HiddenMessage::decode(&HiddenMessage::device_header(4, 3));
        assert_eq!(back.unwrap(), HiddenMessage::Device { rows: 4, cols: 3 });
        assert_eq!(HiddenMessage::device_header(4, 3).len(), 17);
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

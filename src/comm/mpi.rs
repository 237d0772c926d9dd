//! MPI backend (rsmpi). Initialized only when a launcher started this process; finalized when
//! the last handle (world or split) is dropped.
//!
//! Every operation is an immediate (non-blocking) MPI call polled with `MPI_Test` under a
//! [`Backoff`]: a waiting rank sleeps instead of busy-polling (OpenMPI's blocking collectives
//! spin at 100 % CPU), and a collective that does not complete within the
//! [`collective_timeout`](super::collective_timeout) aborts the whole job (`MPI_Abort`) with a
//! message naming the collective, the caller's [`context`](super::context) and the ranks that
//! did not answer. To find those, a rank whose wait timed out asks every other rank on a private
//! duplicate of the communicator; ranks that are themselves waiting answer from their poll loop,
//! so the ranks that stay silent are the ones that never arrived (stopped, hung, or still
//! computing).

use super::watchdog::{timeout_message, Backoff};
use super::Communicator as EvaCommunicator;
use crate::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::point_to_point::{MatchedReceiveVec, Message, Status};
use mpi::request::{Request, Scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Elements per MPI call: MPI counts are 32-bit.
const MAX_COUNT: usize = 1 << 30;

/// Payloads up to this many bytes move as one polled immediate operation. Larger ones first
/// wait (polled) in an immediate barrier until every rank has arrived, then move as an immediate
/// operation polled without sleeping ([`MpiWorld::wait_moving`]): MPI progresses an immediate
/// operation only inside MPI calls, so polling between sleeps made a 21 MB all-reduce 22x slower
/// (examples/collective_latency.rs). A blocking call there would hang forever when a rank stops
/// after the barrier, mid-transfer; the polled one stays under the watchdog.
const SMALL_BYTES: usize = 1 << 16;

/// How long a transfer among ranks that have all arrived is polled without sleeping: this much,
/// plus its bytes at [`SPIN_RATE`]; past that a rank has likely stopped mid-transfer, and the
/// wait continues under the sleeping [`Backoff`] (and the timeout).
const SPIN_BASE: Duration = Duration::from_millis(50);

/// A pessimistic transfer rate (bytes/s) for the spinning budget of [`SPIN_BASE`].
const SPIN_RATE: f64 = 100e6;

/// Tags on the private probe communicator.
const ASK: i32 = 1;
const ANSWER: i32 = 2;
/// Tag of eva's point-to-point messages ([`MpiWorld::send`]), apart from the gathers'.
const P2P_TAG: i32 = 1;
/// Tag of [`MpiWorld::gather`]'s point-to-point parts.
const GATHER: i32 = 3;

/// How long a timed-out rank waits for the others to answer before it aborts.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// Exit code passed to `MPI_Abort` after a timeout.
const ABORT_CODE: i32 = 1;

/// An MPI communicator (the world, or a split of it).
pub struct MpiWorld {
    comm: SimpleCommunicator,
    /// A duplicate of `comm` for the watchdog's questions, so they never match real traffic.
    probe: SimpleCommunicator,
    /// Collectives this rank has entered on `comm`.
    seq: Cell<u64>,
    _universe: Rc<mpi::environment::Universe>,
}

impl MpiWorld {
    /// Initializes MPI and returns the world.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Comm("MPI is already initialized in this process".into()))?;
        let comm = universe.world();
        Ok(Self::wrap(comm, Rc::new(universe)))
    }

    fn wrap(comm: SimpleCommunicator, universe: Rc<mpi::environment::Universe>) -> Self {
        let probe = comm.duplicate();
        MpiWorld {
            comm,
            probe,
            seq: Cell::new(0),
            _universe: universe,
        }
    }

    /// Answers the questions of ranks whose wait timed out: "this rank is waiting, in collective
    /// number `seq`".
    pub(super) fn answer_questions(&self) {
        while let Some(probed) = self
            .probe
            .any_process()
            .immediate_matched_probe_with_tag(ASK)
        {
            let source = probed.1.source_rank();
            let _: (Vec<u64>, _) = probed.matched_receive_vec();
            // Eight bytes go eagerly: this send does not wait for the asking rank.
            self.probe
                .process_at_rank(source)
                .send_with_tag(&[self.seq.get()][..], ANSWER);
        }
    }

    /// Polls `test` until it reports completion, answering questions while waiting; past the
    /// deadline, finds the ranks that did not arrive and aborts the job.
    fn poll(&self, op: &str, mut test: impl FnMut() -> bool) {
        let mut backoff = Backoff::start();
        while !test() {
            if backoff.sleeping() {
                self.answer_questions();
            }
            if let Err(waited) = backoff.pause() {
                self.time_out(op, waited);
            }
        }
    }

    /// Waits for a transfer of `bytes` among ranks that have all arrived: polls without sleeping
    /// (each `MPI_Test` moves it on) for its expected time ([`SPIN_BASE`], [`SPIN_RATE`]), then
    /// as [`MpiWorld::wait`] does, under the watchdog.
    fn wait_moving<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        op: &str,
        request: Request<'a, D, S>,
        bytes: usize,
    ) {
        let spin = SPIN_BASE + Duration::from_secs_f64(bytes as f64 / SPIN_RATE);
        let started = Instant::now();
        let mut pending = request;
        let mut polls = 0u32;
        loop {
            match pending.test() {
                Ok(_) => return,
                Err(r) => pending = r,
            }
            polls = polls.wrapping_add(1);
            if polls % 1024 == 0 {
                self.answer_questions();
                if started.elapsed() >= spin {
                    return self.wait(op, pending);
                }
                std::thread::yield_now();
            }
        }
    }

    /// Waits for one request.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, op: &str, request: Request<'a, D, S>) {
        let mut pending = Some(request);
        self.poll(op, || {
            match pending.take().expect("polled after completion").test() {
                Ok(_) => true,
                Err(r) => {
                    pending = Some(r);
                    false
                }
            }
        });
    }

    /// The next message from `src` with `tag`: the probe and the payload both wait under the
    /// watchdog (a large message arrives in pieces after its header has matched, so a sender
    /// stopped mid-message must time out too, not block a matched receive forever).
    fn receive_from(&self, op: &str, src: usize, tag: i32) -> Vec<u8> {
        let mut found: Option<(Message, Status)> = None;
        self.poll(op, || {
            found = self
                .comm
                .process_at_rank(src as i32)
                .immediate_matched_probe_with_tag(tag);
            found.is_some()
        });
        let (message, status) = found.expect("probe matched");
        let len = status.count(u8::equivalent_datatype()).max(0) as usize;
        let mut buf = vec![0u8; len];
        mpi::request::scope(|scope| {
            let request = message.immediate_matched_receive_into(scope, &mut buf[..]);
            self.wait_moving(op, request, len);
        });
        buf
    }

    /// Reports a collective that timed out, with the ranks that did not answer, and aborts.
    pub(super) fn time_out(&self, op: &str, waited: Duration) -> ! {
        let (rank, size) = (self.rank(), self.size());
        let mine = [self.seq.get()];
        let mut answered = vec![false; size];
        answered[rank] = true;
        mpi::request::scope(|scope| {
            let asks: Vec<_> = (0..size)
                .filter(|&r| r != rank)
                .map(|r| {
                    self.probe
                        .process_at_rank(r as i32)
                        .immediate_send_with_tag(scope, &mine[..], ASK)
                })
                .collect();
            let until = Instant::now() + ANSWER_GRACE;
            while Instant::now() < until && !answered.iter().all(|&a| a) {
                // Timed-out ranks ask each other: keep answering.
                self.answer_questions();
                while let Some(probed) = self
                    .probe
                    .any_process()
                    .immediate_matched_probe_with_tag(ANSWER)
                {
                    answered[probed.1.source_rank() as usize] = true;
                    let _: (Vec<u64>, _) = probed.matched_receive_vec();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let missing: Vec<usize> = (0..size).filter(|&r| !answered[r]).collect();
            let msg = timeout_message(op, rank, size, waited, Some(&missing));
            crate::log::say(&format!("eva: error: rank {rank}: {msg}"));
            super::watchdog::before_abort();
            // The sends to silent ranks never complete; MPI_Abort ends every process first.
            std::mem::forget(asks);
            self.comm.abort(ABORT_CODE)
        })
    }

    /// [`EvaCommunicator::split`] as an MPI world (the NCCL backend builds its own split on it).
    pub(super) fn split_world(&self, color: usize, key: usize) -> Result<MpiWorld> {
        // MPI_Comm_split blocks: a barrier under the watchdog first finds hung ranks.
        self.enter();
        self.wait("barrier before split", self.comm.immediate_barrier());
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| {
                Error::Comm(format!(
                    "MPI split by color {color} returned no communicator"
                ))
            })?;
        Ok(MpiWorld::wrap(comm, self._universe.clone()))
    }

    fn enter(&self) {
        self.seq.set(self.seq.get() + 1);
    }

    /// Waits (polled, under the watchdog) until every rank has reached this collective.
    fn arrive(&self, op: &str) {
        self.wait(op, self.comm.immediate_barrier());
    }
}

impl EvaCommunicator for MpiWorld {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        self.enter();
        if buf.len() * 8 > SMALL_BYTES {
            self.arrive("all-reduce");
            for chunk in buf.chunks_mut(MAX_COUNT) {
                let send = chunk.to_vec();
                mpi::request::scope(|scope| {
                    let request = self.comm.immediate_all_reduce_into(
                        scope,
                        &send[..],
                        chunk,
                        SystemOperation::sum(),
                    );
                    self.wait_moving("all-reduce", request, send.len() * 8)
                });
            }
            return Ok(());
        }
        for chunk in buf.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            mpi::request::scope(|scope| {
                self.wait(
                    "all-reduce",
                    self.comm.immediate_all_reduce_into(
                        scope,
                        &send[..],
                        chunk,
                        SystemOperation::sum(),
                    ),
                );
            });
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.enter();
        let op = format!("broadcast from rank {root}");
        let process = self.comm.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        mpi::request::scope(|scope| {
            self.wait(&op, process.immediate_broadcast_into(scope, &mut len))
        });
        buf.resize(len as usize, 0);
        if buf.len() > SMALL_BYTES {
            self.arrive(&op);
            for chunk in buf.chunks_mut(MAX_COUNT) {
                let bytes = chunk.len();
                mpi::request::scope(|scope| {
                    let request = process.immediate_broadcast_into(scope, chunk);
                    self.wait_moving(&op, request, bytes)
                });
            }
            return Ok(());
        }
        for chunk in buf.chunks_mut(MAX_COUNT) {
            mpi::request::scope(|scope| {
                self.wait(&op, process.immediate_broadcast_into(scope, chunk))
            });
        }
        Ok(())
    }

    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        self.enter();
        let op = format!("gather to rank {root}");
        let process = self.comm.process_at_rank(root as i32);
        let mine = send.len() as u64;
        if self.rank() != root {
            mpi::request::scope(|scope| {
                self.wait(&op, process.immediate_gather_into(scope, &mine))
            });
            for chunk in send.chunks(MAX_COUNT) {
                mpi::request::scope(|scope| {
                    let request = process.immediate_send_with_tag(scope, chunk, GATHER);
                    if chunk.len() > SMALL_BYTES {
                        self.wait_moving(&op, request, chunk.len())
                    } else {
                        self.wait(&op, request)
                    }
                });
            }
            return Ok(None);
        }
        let mut lens = vec![0u64; self.size()];
        mpi::request::scope(|scope| {
            self.wait(
                &op,
                process.immediate_gather_into_root(scope, &mine, &mut lens[..]),
            )
        });
        let mut out = Vec::with_capacity(self.size());
        for (r, &len) in lens.iter().enumerate() {
            if r == root {
                out.push(send.to_vec());
                continue;
            }
            let mut v = Vec::with_capacity(len as usize);
            while (v.len() as u64) < len {
                v.extend_from_slice(&self.receive_from(&op, r, GATHER));
            }
            out.push(v);
        }
        Ok(Some(out))
    }

    fn barrier(&self) -> Result<()> {
        self.enter();
        self.wait("barrier", self.comm.immediate_barrier());
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn EvaCommunicator>> {
        Ok(Box::new(self.split_world(color, key)?))
    }

    fn send(&self, buf: &[u8], dest: usize) -> Result<()> {
        let op = format!("send to rank {dest}");
        let to = self.comm.process_at_rank(dest as i32);
        let len = (buf.len() as u64).to_le_bytes();
        mpi::request::scope(|scope| {
            self.wait(&op, to.immediate_send_with_tag(scope, &len[..], P2P_TAG))
        });
        for chunk in buf.chunks(MAX_COUNT) {
            mpi::request::scope(|scope| {
                let request = to.immediate_send_with_tag(scope, chunk, P2P_TAG);
                if chunk.len() > SMALL_BYTES {
                    self.wait_moving(&op, request, chunk.len())
                } else {
                    self.wait(&op, request)
                }
            });
        }
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        let op = format!("receive from rank {src}");
        let head = self.receive_from(&op, src, P2P_TAG);
        let len = <[u8; 8]>::try_from(&head[..])
            .map_err(|_| {
                Error::Comm(format!(
                    "{op}: expected an 8-byte length, found {} bytes",
                    head.len()
                ))
            })
            .map(u64::from_le_bytes)?;
        let mut v = Vec::with_capacity(len as usize);
        while (v.len() as u64) < len {
            v.extend_from_slice(&self.receive_from(&op, src, P2P_TAG));
        }
        Ok(v)
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }
}

//! NCCL backend: sums of GPU memory and GPU-to-GPU hidden states through NCCL, everything else
//! (broadcast, gather, barrier, host point-to-point messages, each NCCL communicator's unique id)
//! through a host world: MPI for the ranks a launcher started, the thread world for
//! `--local-ranks` (one GPU per thread rank), a world of one otherwise. NCCL itself is behind the
//! seam `device::cuda::nccl`: cudarc's raw bindings (feature `nccl`), or the emulated NCCL of the
//! emulated device (feature `cuda-emu`).
//!
//! Sums of values already in GPU memory (`--device cuda` statistics and `G·Q` products,
//! [`Communicator::all_reduce_sum_device`]) run in place there; host buffers are staged through
//! the GPU. [`Communicator::send_device`] queues the values GPU to GPU and returns without waiting
//! for the receiver (the trait's contract); their shape goes ahead over the host world.
//! [`Communicator::split`] returns an NCCL communicator too (the host world's split, then a new
//! NCCL communicator over its ranks on the same GPU and stream).
//!
//! No call waits for a peer inside NCCL: communicators are non-blocking, joined eagerly (every
//! member waits until all have joined, while all are known to be present), and every wait polls
//! under the watchdog's [`Backoff`]. Past `--collective-timeout` a rank aborts its NCCL
//! communicator explicitly (`ncclCommAbort`, never from a drop) and then the job: MPI aborts every
//! process with a message naming the collective; thread ranks abort the thread world and return
//! the message.

use super::threads::ThreadWorld;
use super::watchdog::Backoff;
use super::{agree, share_from_root, Communicator, MpiWorld};
use crate::device::cuda::nccl::{self as seam, Comm, Device};
use crate::device::cuda::{Cuda, CudaTensor, DeviceSums};
use crate::device::gpu::{DeviceBuffer, Gpu};
use crate::{Error, Result};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// The world that carries what NCCL does not: MPI processes or thread ranks.
enum Host {
    Mpi(MpiWorld),
    Threads(ThreadWorld),
}

impl Host {
    fn comm(&self) -> &dyn Communicator {
        match self {
            Host::Mpi(w) => w,
            Host::Threads(w) => w,
        }
    }

    /// While a rank waits: MPI answers the watchdog's questions of timed-out ranks; a thread
    /// rank stops waiting once another rank has aborted the thread world.
    fn while_waiting(&self) -> Result<()> {
        match self {
            Host::Mpi(w) => {
                w.answer_questions();
                Ok(())
            }
            Host::Threads(w) => match w.aborted() {
                Some(why) => Err(Error::Comm(format!("thread world aborted: {why}"))),
                None => Ok(()),
            },
        }
    }

    /// A wait that outlasted the timeout: MPI aborts the job (never returns); the thread world
    /// is aborted and the message returned.
    fn time_out(&self, op: &str, waited: Duration) -> Error {
        match self {
            Host::Mpi(w) => w.time_out(op, waited),
            Host::Threads(w) => w.time_out(op, waited),
        }
    }

    /// Whether the host world was aborted (thread worlds; MPI aborts the job instead).
    fn aborted(&self) -> bool {
        match self {
            Host::Mpi(_) => false,
            Host::Threads(w) => w.aborted().is_some(),
        }
    }

    fn split(&self, color: usize, key: usize) -> Result<Host> {
        Ok(match self {
            Host::Mpi(w) => Host::Mpi(w.split_world(color, key)?),
            Host::Threads(w) => Host::Threads(w.split_world(color, key)?),
        })
    }
}

/// A host world whose sums and GPU point-to-point values run through NCCL.
pub struct NcclWorld {
    host: Host,
    /// `None` once aborted.
    comm: RefCell<Option<Comm>>,
    device: Rc<Device>,
}

impl NcclWorld {
    /// The NCCL world of the ranks `mpi` holds (a world of one when no launcher started this
    /// process: the host world is then a thread world of one), on GPU `local_rank % devices`.
    pub fn init(mpi: Option<MpiWorld>, local_rank: usize) -> Result<Self> {
        let host = match mpi {
            Some(w) => Host::Mpi(w),
            None => Host::Threads(ThreadWorld::create(1).pop().expect("one rank")),
        };
        Self::open(host, local_rank)
    }

    /// The NCCL world of thread rank `world.rank()`, on GPU `rank % devices` (thread ranks are
    /// one node's ranks).
    pub fn over_threads(world: ThreadWorld) -> Result<Self> {
        let rank = world.rank();
        Self::open(Host::Threads(world), rank)
    }

    fn open(host: Host, node_rank: usize) -> Result<Self> {
        let device = agree(
            host.comm(),
            seam::devices().and_then(|n| Device::open(node_rank % n)),
        )?;
        Self::join(host, Rc::new(device))
    }

    /// The NCCL communicator of `host`'s ranks on `device`: the host's rank 0 makes the unique
    /// id and shares it (a rank 0 that cannot make one fails every member instead of leaving them
    /// waiting), every member starts joining, waits under the watchdog until all have joined,
    /// and the members agree on the outcome. Collective on `host`.
    fn join(host: Host, device: Rc<Device>) -> Result<Self> {
        let id = share_from_root(host.comm(), seam::unique_id)?;
        let (rank, size) = (host.comm().rank(), host.comm().size());
        let (comm, started) = match Comm::start(&device, rank, size, &id) {
            Ok(c) => (Some(c), Ok(())),
            Err(e) => (None, Err(e)),
        };
        let world = NcclWorld {
            host,
            comm: RefCell::new(comm),
            device,
        };
        let joined = started.and_then(|()| world.settle("communicator init"));
        match joined {
            // A thread rank that timed out has aborted the thread world: no agreement is left
            // to reach, and its message says why.
            Err(e) if world.host.aborted() => Err(e),
            joined => agree(world.host.comm(), joined).map(|()| world),
        }
    }

    /// Runs `f` on the communicator (an error once it was aborted).
    fn with_comm<T>(&self, f: impl FnOnce(&mut Comm) -> Result<T>) -> Result<T> {
        let mut slot = self.comm.borrow_mut();
        let comm = slot
            .as_mut()
            .ok_or_else(|| Error::Comm("the NCCL communicator was aborted".into()))?;
        f(comm)
    }

    /// Aborts the communicator (`ncclCommAbort`), explicitly.
    fn abort(&self) {
        if let Some(comm) = self.comm.borrow_mut().take() {
            comm.abort();
        }
    }

    /// Polls `done` under the watchdog's [`Backoff`] until it holds. An NCCL error aborts the
    /// communicator and returns; past `--collective-timeout` the communicator is aborted and
    /// then the job, naming `op`.
    fn poll_until(&self, op: &str, mut done: impl FnMut(&mut Comm) -> Result<bool>) -> Result<()> {
        let mut backoff = Backoff::start();
        loop {
            match self.with_comm(&mut done) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.abort();
                    return Err(e);
                }
            }
            if backoff.sleeping() {
                if let Err(e) = self.host.while_waiting() {
                    self.abort();
                    return Err(e);
                }
            }
            if let Err(waited) = backoff.pause() {
                self.abort();
                return Err(self.host.time_out(&format!("NCCL {op}"), waited));
            }
        }
    }

    /// Waits until the communicator has no call in progress (joining, or a call that left it
    /// `ncclInProgress`): only then may the next call be made.
    fn settle(&self, op: &str) -> Result<()> {
        self.poll_until(op, Comm::ready)
    }

    /// Waits until the work queued so far has run.
    fn wait(&self, op: &str) -> Result<()> {
        self.poll_until(op, Comm::poll)
    }

    /// Makes one NCCL call once the communicator is ready for it.
    fn call<T>(&self, op: &str, f: impl FnOnce(&mut Comm) -> Result<T>) -> Result<T> {
        self.settle(op)?;
        self.with_comm(f)
    }
}

impl Communicator for NcclWorld {
    fn rank(&self) -> usize {
        self.host.comm().rank()
    }

    fn size(&self) -> usize {
        self.host.comm().size()
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let staged = self.call("all-reduce", |c| c.host_sum_start(buf))?;
        self.wait("all-reduce")?;
        self.with_comm(|c| staged.finish(c, buf))
    }

    fn all_reduce_sum_device(&self, buf: &mut DeviceSums) -> Result<()> {
        if self.size() == 1 || buf.is_empty() {
            return Ok(());
        }
        // The buffer was written by work queued on the statistics' stream: the device's default
        // stream, as this communicator's, so NCCL's sum runs after it. Waiting here keeps a rank
        // that never arrives under the watchdog (a later copy would block instead).
        let n = buf.len();
        self.call("all-reduce of device statistics", |c| {
            c.all_reduce_sum(buf.buffer_mut(), n)
        })?;
        self.wait("all-reduce of device statistics")
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.comm().broadcast(buf, root)
    }

    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        self.host.comm().gather(send, root)
    }

    fn barrier(&self) -> Result<()> {
        self.host.comm().barrier()
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        // Same GPU and stream: the split's sums run after the world's work queued so far.
        let host = self.host.split(color, key)?;
        Ok(Box::new(NcclWorld::join(host, self.device.clone())?))
    }

    fn send(&self, buf: &[u8], dest: usize) -> Result<()> {
        // Host bytes go over the host world, which does not wait for the receiver.
        self.host.comm().send(buf, dest)
    }

    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        self.host.comm().recv(src)
    }

    fn send_device(&self, _gpu: &Cuda, x: &CudaTensor, dest: usize) -> Result<()> {
        // The shape went ahead over the host world (the caller's header); the values GPU to GPU,
        // from the buffer the forward pass wrote on the device's default stream, as this one.
        // Queued, not waited for: the receiver takes them when it gets there, and the next wait
        // on this stream covers the send (the buffer is freed in stream order).
        let n = x.rows() * x.cols();
        if n == 0 {
            return Ok(());
        }
        self.call(&format!("send to rank {dest}"), |c| {
            c.send(x.values()?, n, dest)
        })
    }

    fn recv_device(&self, gpu: &Cuda, rows: usize, cols: usize, src: usize) -> Result<CudaTensor> {
        let mut x = gpu.alloc_tensor(rows, cols, "a hidden state from the previous stage")?;
        let n = rows * cols;
        if n > 0 {
            let op = format!("receive from rank {src}");
            self.call(&op, |c| c.recv(x.values_mut()?, n, src))?;
            self.wait(&op)?;
        }
        Ok(x)
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::device::gpu::CudaOptions;
    use ndarray::Array2;
    use std::sync::Arc;
    use std::time::Duration;

    /// Runs `f` on every rank of an `n`-rank NCCL world over thread ranks on emulated GPUs
    /// (`EVA_EMU_DEVICES` is raised for the process: the other emulator tests open GPU 0 only).
    fn run_nccl<T: Send>(n: usize, f: impl Fn(&NcclWorld) -> T + Sync) -> Vec<T> {
        std::env::set_var("EVA_EMU_DEVICES", "8");
        let worlds = ThreadWorld::create_with_timeout(n, Some(Duration::from_secs(20)));
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = worlds
                .into_iter()
                .map(|w| s.spawn(move || f(&NcclWorld::over_threads(w).unwrap())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn closed_forms_hold_over_nccl_on_thread_ranks() {
        for n in [1, 2, 3, 4] {
            for r in run_nccl(n, |w| crate::comm::selftest(w)) {
                r.unwrap();
            }
        }
    }

    /// The trait's contract: a send does not wait for its receiver. Rank 0 sends three device
    /// tensors and then meets rank 1 at a barrier; only after it does rank 1 receive them (a send
    /// that waited for the receiver would leave both waiting until the host world's timeout).
    #[test]
    fn device_sends_do_not_wait_for_the_receiver_and_arrive_in_order() {
        let out = run_nccl(2, |w| {
            let gpu = Cuda::open(CudaOptions {
                ordinal: w.rank(),
                ..CudaOptions::default()
            })
            .unwrap();
            let mut got = Vec::new();
            if w.rank() == 0 {
                for i in 0..3 {
                    let x = Array2::from_shape_fn((2, 3), |(r, c)| (10 * i + 3 * r + c) as f32);
                    let dev = gpu.to_device(&x).unwrap();
                    w.send_device(&gpu, &dev, 1).unwrap();
                    // The tensor is dropped at once: the send took its values in stream order.
                }
                w.barrier().unwrap();
            } else {
                w.barrier().unwrap();
                for _ in 0..3 {
                    let x = w.recv_device(&gpu, 2, 3, 0).unwrap();
                    got.push(gpu.to_host(&x).unwrap());
                }
            }
            // The sums after the sends run in order behind them.
            let mut v = [w.rank() as f64 + 1.0];
            w.all_reduce_sum(&mut v).unwrap();
            (got, v[0])
        });
        for i in 0..3 {
            let want = Array2::from_shape_fn((2, 3), |(r, c)| (10 * i + 3 * r + c) as f32);
            assert_eq!(out[1].0[i], want);
        }
        assert!(out.iter().all(|(_, s)| *s == 3.0));
    }

    #[test]
    fn device_sums_add_in_place_on_every_rank() {
        let out = run_nccl(3, |w| {
            let gpu = Arc::new(
                Cuda::open(CudaOptions {
                    ordinal: w.rank(),
                    ..CudaOptions::default()
                })
                .unwrap(),
            );
            let mut sums = DeviceSums::zeros(&gpu, 5, "test sums").unwrap();
            let mine: Vec<f64> = (0..5).map(|i| (w.rank() * 10 + i) as f64 + 0.25).collect();
            sums.copy_from_host(&mine).unwrap();
            w.all_reduce_sum_device(&mut sums).unwrap();
            sums.to_host().unwrap()
        });
        let want: Vec<f64> = (0..5).map(|i| (30 + 3 * i) as f64 + 0.75).collect();
        for got in out {
            assert_eq!(got, want);
        }
    }
}

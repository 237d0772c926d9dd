//! NCCL backend (cudarc): all-reduce runs on the GPU chosen by the node-local rank; broadcast,
//! gather and barrier go through MPI, which also carries each NCCL communicator's unique id from
//! its rank 0. Sums of values already in GPU memory (`--device cuda` statistics and `G·Q`
//! products, [`Communicator::all_reduce_sum_device`]) run in place there; host buffers are staged
//! through the GPU. Point-to-point messages (hidden states between `--pp` stages) send their
//! length or shape over MPI and their values GPU to GPU ([`Communicator::send_device`]).
//!
//! [`Communicator::split`] returns an NCCL communicator too: the MPI split first, then a new
//! NCCL communicator over its ranks (its rank 0's unique id broadcast over the split), on the
//! same GPU and stream, so `--pp` stage groups sum their device statistics on the GPUs as the
//! world does. Every NCCL communicator is made by [`NcclWorld::join`].
//!
//! A rank waits for its NCCL work by polling an event under the watchdog's [`Backoff`], never in a
//! blocking synchronize: past `--collective-timeout` it aborts the NCCL communicator and the job.

use super::watchdog::Backoff;
use super::{share_from_root, Communicator, MpiWorld};
use crate::device::cuda::{probe, Cuda, CudaTensor, DeviceSums};
use crate::device::gpu::{DeviceBuffer, Gpu};
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use std::cell::{Ref, RefCell};
use std::sync::Arc;

/// An MPI world (or a split of one) whose sums and point-to-point values run through NCCL.
pub struct NcclWorld {
    mpi: MpiWorld,
    /// `None` once aborted after a timeout.
    comm: RefCell<Option<Comm>>,
    stream: Arc<CudaStream>,
}

/// cudarc's `NcclError` prints only "NcclError": keep the code's name.
fn nccl(op: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> Error {
    move |e| Error::Comm(format!("NCCL {op} failed: {:?}", e.0))
}

fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Comm(format!("CUDA {op} failed: {e:?}"))
}

impl NcclWorld {
    /// Opens the GPU `local_rank % devices` and joins the NCCL communicator of `mpi`'s ranks.
    pub fn init(mpi: MpiWorld, local_rank: usize) -> Result<Self> {
        // A missing library panics inside cudarc: probe first (a usage error naming the files
        // tried and LD_LIBRARY_PATH, exit code 2, as for --device cuda).
        // SAFETY: the probes only try to load the shared libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(probe::missing(
                "the CUDA driver library (--comm nccl)",
                "cuda",
                " (it comes with the NVIDIA driver; none is installed, or this machine has no GPU)",
            )
            .into());
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(probe::missing("NCCL (--comm nccl)", "nccl", " (pip's nvidia-nccl ships only libnccl.so.2: link it as libnccl.so in a directory on LD_LIBRARY_PATH)").into());
        }
        let devices = CudaContext::device_count()
            .map_err(cuda("device count"))?
            .max(0) as usize;
        if devices == 0 {
            return Err(Error::usage(format!(
                "--comm nccl: no CUDA device is visible (CUDA_VISIBLE_DEVICES={})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            )));
        }
        let ctx = CudaContext::new(local_rank % devices).map_err(cuda("context creation"))?;
        Self::join(mpi, ctx.default_stream())
    }

    /// The NCCL communicator of `mpi`'s ranks on `stream` (the world's, or a split's on the
    /// world's stream): `mpi`'s rank 0 makes the unique id, MPI broadcasts it (a rank 0 that
    /// cannot make one fails every member instead of leaving them waiting), and every member
    /// joins (`ncclCommInitRank`). Collective on `mpi`.
    fn join(mpi: MpiWorld, stream: Arc<CudaStream>) -> Result<Self> {
        let id = share_from_root(&mpi, || {
            let id = Id::new().map_err(nccl("unique id"))?;
            Ok(id.internal().map(|c| c as u8))
        })?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), mpi.rank(), mpi.size(), id)
            .map_err(nccl("communicator init"))?;
        Ok(NcclWorld {
            mpi,
            comm: RefCell::new(Some(comm)),
            stream,
        })
    }

    /// The NCCL communicator (an error once it was aborted).
    fn comm(&self) -> Result<Ref<'_, Comm>> {
        Ref::filter_map(self.comm.borrow(), Option::as_ref)
            .map_err(|_| Error::Comm("the NCCL communicator was aborted".into()))
    }

    /// Waits until the work queued on the stream so far has run: polls an event (`cuEventQuery`)
    /// under the watchdog's [`Backoff`], answering the MPI watchdog's questions while it sleeps, so
    /// a rank waiting for one that never arrives sleeps instead of blocking in a synchronize. Past
    /// `--collective-timeout` it aborts the NCCL communicator (`ncclCommAbort`, which ends the
    /// kernels waiting for the missing rank) and then the job, naming `op`.
    fn wait(&self, op: &str) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(cuda("event record"))?;
        let mut backoff = Backoff::start();
        while !done.try_is_complete().map_err(cuda("event query"))? {
            if backoff.sleeping() {
                self.mpi.answer_questions();
            }
            if let Err(waited) = backoff.pause() {
                // Dropping cudarc's Comm calls ncclCommAbort.
                drop(self.comm.borrow_mut().take());
                self.mpi.time_out(&format!("NCCL {op}"), waited);
            }
        }
        Ok(())
    }

    /// Sends values on the GPU to `dest` (NCCL) and waits for the send under the watchdog.
    fn send_values<T: NcclType>(&self, values: &impl DevicePtr<T>, dest: usize) -> Result<()> {
        self.comm()?
            .send(values, dest as i32)
            .map_err(nccl("send"))?;
        self.wait(&format!("send to rank {dest}"))
    }

    /// Receives into `into` on the GPU what [`NcclWorld::send_values`] on `src` sent (as many
    /// values), and waits for it under the watchdog.
    fn recv_values<T: NcclType>(
        &self,
        into: &mut impl cudarc::driver::DevicePtrMut<T>,
        src: usize,
    ) -> Result<()> {
        self.comm()?
            .recv(into, src as i32)
            .map_err(nccl("receive"))?;
        self.wait(&format!("receive from rank {src}"))
    }
}

impl Communicator for NcclWorld {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn size(&self) -> usize {
        self.mpi.size()
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self
            .stream
            .clone_htod(&buf[..])
            .map_err(cuda("host-to-device copy"))?;
        self.comm()?
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(nccl("all-reduce"))?;
        // Before the copy back: a copy into pageable memory would block until the sum is done.
        self.wait("all-reduce")?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(cuda("device-to-host copy"))?;
        // Only the copy is left on the stream.
        self.stream.synchronize().map_err(cuda("synchronize"))
    }

    fn all_reduce_sum_device(&self, buf: &mut DeviceSums) -> Result<()> {
        if self.size() == 1 || buf.is_empty() {
            return Ok(());
        }
        // The buffer was written by work queued on the statistics' stream: the device's default
        // stream, as this communicator's (both on the device's primary context), so NCCL's sum
        // runs after it and the copy back to the host after the sum. Waiting here keeps a rank
        // that never arrives under the watchdog (the later copy would block instead).
        let n = buf.len();
        self.comm()?
            .all_reduce_in_place(
                &mut buf.buffer_mut().slice_mut().slice_mut(0..n),
                &ReduceOp::Sum,
            )
            .map_err(nccl("all-reduce"))?;
        self.wait("all-reduce of device statistics")
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.mpi.broadcast(buf, root)
    }

    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        self.mpi.gather(send, root)
    }

    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        // Same GPU and stream: the split's sums run after the world's work queued so far.
        let mpi = self.mpi.split_world(color, key)?;
        Ok(Box::new(NcclWorld::join(mpi, self.stream.clone())?))
    }

    fn send(&self, buf: &[u8], dest: usize) -> Result<()> {
        // The length over MPI, the payload GPU to GPU.
        self.mpi.send(&(buf.len() as u64).to_le_bytes(), dest)?;
        if buf.is_empty() {
            return Ok(());
        }
        let dev = self
            .stream
            .clone_htod(buf)
            .map_err(cuda("host-to-device copy"))?;
        self.send_values(&dev, dest)
    }

    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        let len = self.mpi.recv(src)?;
        let len = u64::from_le_bytes(
            len.as_slice()
                .try_into()
                .map_err(|_| Error::Comm(format!("malformed message length from rank {src}")))?,
        ) as usize;
        let mut out = vec![0u8; len];
        if len == 0 {
            return Ok(out);
        }
        let mut dev = self
            .stream
            .alloc_zeros::<u8>(len)
            .map_err(cuda("allocation"))?;
        self.recv_values(&mut dev, src)?;
        self.stream
            .memcpy_dtoh(&dev, &mut out)
            .map_err(cuda("device-to-host copy"))?;
        self.stream.synchronize().map_err(cuda("synchronize"))?;
        Ok(out)
    }

    fn send_device(&self, _gpu: &Cuda, x: &CudaTensor, dest: usize) -> Result<()> {
        // The shape went ahead over MPI (the caller's header); the values GPU to GPU, from the
        // buffer the forward pass wrote on the device's default stream, as this one.
        if x.rows() * x.cols() == 0 {
            return Ok(());
        }
        self.send_values(&x.values()?.slice().slice(0..x.rows() * x.cols()), dest)
    }

    fn recv_device(&self, gpu: &Cuda, rows: usize, cols: usize, src: usize) -> Result<CudaTensor> {
        let mut x = gpu.alloc_tensor(rows, cols, "a hidden state from the previous stage")?;
        if rows * cols > 0 {
            self.recv_values(
                &mut x.values_mut()?.slice_mut().slice_mut(0..rows * cols),
                src,
            )?;
        }
        Ok(x)
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}

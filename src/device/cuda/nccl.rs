//! The NCCL seam (feature `nccl`): everything `comm/nccl.rs` asks of NCCL, on one GPU's stream,
//! through cudarc's raw bindings. `emu_nccl.rs` serves the same calls on the emulated device.
//!
//! Communicators are **non-blocking** (`ncclCommInitRankConfig` with `blocking = 0`): no call
//! blocks the host waiting for a peer (NCCL connects peers lazily, inside the first collective or
//! send to them); a call may leave the communicator `ncclInProgress`, which [`Comm::ready`] polls
//! (`ncclCommGetAsyncError`), and the queued work is polled by an event ([`Comm::poll`]). The
//! caller polls both under its watchdog and calls [`Comm::abort`] (`ncclCommAbort`) explicitly
//! when a peer never arrives: cudarc's own `Comm` aborts inside `Drop` and panics there, so it
//! is not used.

use super::probe;
use super::runtime::Buffer;
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of a unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// NCCL's error code by name (cudarc's `NcclError` prints only "NcclError").
fn nccl(op: &'static str) -> impl Fn(result::NcclError) -> Error {
    move |e| Error::Comm(format!("NCCL {op} failed: {:?}", e.0))
}

fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Comm(format!("CUDA {op} failed: {e:?}"))
}

/// The GPUs the driver sees, after checking that the driver and NCCL load (a missing library
/// panics inside cudarc): a usage error naming the files tried otherwise.
pub fn devices() -> Result<usize> {
    // SAFETY: the probes only try to load the shared libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(probe::missing(
            "the CUDA driver library (--comm nccl)",
            "cuda",
            " (it comes with the NVIDIA driver; none is installed, or this machine has no GPU)",
        )
        .into());
    }
    if !unsafe { sys::is_culib_present() } {
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
    Ok(devices)
}

/// A new communicator's unique id (`ncclGetUniqueId`), made on one rank and sent to the others.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let id = result::get_uniqueid().map_err(nccl("unique id"))?;
    Ok(id.internal.map(|c| c as u8))
}

/// The GPU a rank's NCCL communicators run on: its primary context's default stream, the one
/// the CUDA backend queues its work on, so NCCL's calls are ordered after that work.
pub struct Device {
    stream: Arc<CudaStream>,
    ordinal: usize,
}

impl Device {
    /// GPU `ordinal` (which [`devices`] counted).
    pub fn open(ordinal: usize) -> Result<Device> {
        let ctx = CudaContext::new(ordinal).map_err(cuda("context creation"))?;
        Ok(Device {
            stream: ctx.default_stream(),
            ordinal,
        })
    }

    /// Its ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field undefined (NCCL's
/// defaults), for the bindings' `ncclConfig_t` (cudarc's feature `nccl`: NCCL 2.30's header; an
/// older library reads the fields it knows, up to its own size).
fn non_blocking() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 30, 0), the header these bindings were made from.
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// One rank's NCCL communicator on a [`Device`]'s stream.
pub struct Comm {
    raw: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    /// Recorded after the last call once the communicator was ready; `None` before any.
    done: Option<CudaEvent>,
    /// A call was made since `done` was recorded.
    record: bool,
    ordinal: usize,
}

/// A host all-reduce staged through the device: [`Comm::host_sum_start`], then
/// [`HostSum::finish`] once [`Comm::poll`] says the work is done.
pub struct HostSum {
    dev: CudaSlice<f64>,
}

impl HostSum {
    /// Copies the sums into `host` (of the length started with).
    pub fn finish(self, comm: &mut Comm, host: &mut [f64]) -> Result<()> {
        comm.stream
            .memcpy_dtoh(&self.dev, host)
            .map_err(cuda("device-to-host copy"))?;
        // Only the copy is left on the stream.
        comm.stream.synchronize().map_err(cuda("synchronize"))
    }
}

impl Comm {
    /// Starts joining the communicator of `size` ranks named by `id` as `rank` on `dev`
    /// (`ncclCommInitRankConfig`, non-blocking): returns at once; [`Comm::ready`] says when it
    /// has joined.
    pub fn start(dev: &Device, rank: usize, size: usize, id: &[u8; ID_BYTES]) -> Result<Comm> {
        // NCCL takes the device from the calling thread's current context.
        dev.stream
            .context()
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut config = non_blocking();
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `config` are valid for the call; NCCL keeps neither pointer.
        unsafe {
            result::comm_init_rank_config(&mut raw, size as i32, id, rank as i32, &mut config)
        }
        .map_err(nccl("communicator init"))?;
        Ok(Comm {
            raw,
            stream: dev.stream.clone(),
            done: None,
            record: false,
            ordinal: dev.ordinal,
        })
    }

    /// Whether no call is in progress (`ncclCommGetAsyncError` is not `ncclInProgress`); the
    /// communicator's asynchronous error otherwise. Only then may the next call be made.
    pub fn ready(&mut self) -> Result<bool> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `raw` is a live communicator.
        unsafe { sys::ncclCommGetAsyncError(self.raw, &mut state) }
            .result()
            .map_err(nccl("error query"))?;
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(nccl("operation")(result::NcclError(e))),
        }
    }

    /// Whether every call made so far has run on the stream.
    pub fn poll(&mut self) -> Result<bool> {
        if !self.ready()? {
            return Ok(false);
        }
        if self.record {
            // The calls are on the stream once the communicator is ready.
            self.done = Some(
                self.stream
                    .record_event(None)
                    .map_err(cuda("event record"))?,
            );
            self.record = false;
        }
        match &self.done {
            Some(e) => e.try_is_complete().map_err(cuda("event query")),
            None => Ok(true),
        }
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Queues an in-place sum of the first `n` values of `buf` over the ranks.
    pub fn all_reduce_sum(&mut self, buf: &mut Buffer<f64>, n: usize) -> Result<()> {
        let mut view = buf.slice_mut().slice_mut(0..n);
        let (ptr, _sync) = view.device_ptr_mut(&self.stream);
        // SAFETY: `n` values at `ptr` on this stream's device, in place.
        unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                n,
                sys::ncclDataType_t::ncclFloat64,
                sys::ncclRedOp_t::ncclSum,
                self.raw,
                self.raw_stream(),
            )
        }
        .map_err(nccl("all-reduce"))?;
        self.record = true;
        Ok(())
    }

    /// Queues a sum of host values staged through the device; [`HostSum::finish`] gives it.
    pub fn host_sum_start(&mut self, host: &[f64]) -> Result<HostSum> {
        let mut dev = self
            .stream
            .clone_htod(host)
            .map_err(cuda("host-to-device copy"))?;
        let (ptr, sync) = dev.device_ptr_mut(&self.stream);
        // SAFETY: `host.len()` values at `ptr`, in place; `dev` lives in the returned staging.
        unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                host.len(),
                sys::ncclDataType_t::ncclFloat64,
                sys::ncclRedOp_t::ncclSum,
                self.raw,
                self.raw_stream(),
            )
        }
        .map_err(nccl("all-reduce"))?;
        drop(sync);
        self.record = true;
        Ok(HostSum { dev })
    }

    /// Queues a send of the first `n` values of `buf` to `peer`. The buffer's memory is freed
    /// in stream order (cudarc frees asynchronously on the stream), so the caller may drop it.
    pub fn send(&mut self, buf: &Buffer<f32>, n: usize, peer: usize) -> Result<()> {
        let view = buf.slice().slice(0..n);
        let (ptr, _sync) = view.device_ptr(&self.stream);
        // SAFETY: `n` f32 values at `ptr` on this stream's device.
        unsafe {
            result::send(
                ptr as *const c_void,
                n,
                sys::ncclDataType_t::ncclFloat32,
                peer as i32,
                self.raw,
                self.raw_stream(),
            )
        }
        .map_err(nccl("send"))?;
        self.record = true;
        Ok(())
    }

    /// Queues a receive from `peer` into the first `n` values of `buf`.
    pub fn recv(&mut self, buf: &mut Buffer<f32>, n: usize, peer: usize) -> Result<()> {
        let mut view = buf.slice_mut().slice_mut(0..n);
        let (ptr, _sync) = view.device_ptr_mut(&self.stream);
        // SAFETY: room for `n` f32 values at `ptr` on this stream's device.
        unsafe {
            result::recv(
                ptr as *mut c_void,
                n,
                sys::ncclDataType_t::ncclFloat32,
                peer as i32,
                self.raw,
                self.raw_stream(),
            )
        }
        .map_err(nccl("receive"))?;
        self.record = true;
        Ok(())
    }

    /// The GPU this communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `ncclCommAbort`: ends the kernels waiting for a peer that never arrives and frees the
    /// communicator, whatever is queued. Errors are ignored: the job is ending.
    pub fn abort(mut self) {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: `raw` is a live communicator, used no more.
        let _ = unsafe { result::comm_abort(raw) };
    }
}

impl Drop for Comm {
    /// `ncclCommFinalize` (polled for at most 10 s), then `ncclCommDestroy`; a communicator
    /// that does not finalize in time is aborted. Never panics.
    fn drop(&mut self) {
        if self.raw.is_null() {
            return;
        }
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: `raw` is a live communicator, used no more after this.
        unsafe {
            let finalized = result::comm_finalize(raw).is_ok() && {
                let until = Instant::now() + Duration::from_secs(10);
                let mut state = sys::ncclResult_t::ncclInProgress;
                while state == sys::ncclResult_t::ncclInProgress && Instant::now() < until {
                    if sys::ncclCommGetAsyncError(raw, &mut state)
                        .result()
                        .is_err()
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                state == sys::ncclResult_t::ncclSuccess
            };
            let _ = if finalized {
                result::comm_destroy(raw)
            } else {
                result::comm_abort(raw)
            };
        }
    }
}

//! Collectives between ranks. Every backend implements [`Communicator`]; the engine talks to
//! nothing else, so single-process, thread, MPI and NCCL worlds share one code path.
//!
//! | backend | world | built |
//! |---|---|---|
//! | [`SingleProcess`] | one rank; collectives return at once | always |
//! | [`threads::ThreadWorld`] | N ranks as threads of one process (tests, one-box runs) | always |
//! | [`MpiWorld`] | the ranks `mpirun`/`srun` started (rsmpi) | feature `mpi` |
//! | [`NcclWorld`] | MPI processes or thread ranks whose GPU sums and hidden states run through NCCL | feature `nccl` (cudarc), `cuda-emu` (emulated) |
//!
//! A backend that was not compiled in is an uninhabited twin whose constructor returns
//! [`Error::NotCompiled`]. [`launcher::detect`] reads the launcher's environment; without one,
//! eva is a world of one and never initializes MPI. [`topology::Topology`] cuts a world into
//! the grid of `dp` data-parallel replicas × `pp` pipeline stages and their sub-communicators.
//!
//! Agreement helpers: [`agree`] (every rank returns an error if one failed), [`share_from_root`]
//! (rank 0's bytes to all), [`unanimous::check`] (every rank started the same way).

/// Implements [`Communicator`] for an uninhabited (not compiled) backend twin (unused when every
/// backend is built).
#[allow(unused_macros)]
macro_rules! uninhabited_communicator {
    ($ty:ty) => {
        impl $crate::comm::Communicator for $ty {
            fn rank(&self) -> usize {
                match *self {}
            }
            fn size(&self) -> usize {
                match *self {}
            }
            fn all_reduce_sum(&self, _: &mut [f64]) -> $crate::Result<()> {
                match *self {}
            }
            fn broadcast(&self, _: &mut Vec<u8>, _: usize) -> $crate::Result<()> {
                match *self {}
            }
            fn gather(&self, _: &[u8], _: usize) -> $crate::Result<Option<Vec<Vec<u8>>>> {
                match *self {}
            }
            fn barrier(&self) -> $crate::Result<()> {
                match *self {}
            }
            fn split(
                &self,
                _: usize,
                _: usize,
            ) -> $crate::Result<Box<dyn $crate::comm::Communicator>> {
                match *self {}
            }
            fn send(&self, _: &[u8], _: usize) -> $crate::Result<()> {
                match *self {}
            }
            fn recv(&self, _: usize) -> $crate::Result<Vec<u8>> {
                match *self {}
            }
            fn backend(&self) -> &'static str {
                match *self {}
            }
        }
    };
}

pub mod codec;
pub mod launcher;
pub mod threads;
pub mod topology;
pub mod unanimous;
pub mod watchdog;

pub use watchdog::{collective_timeout, context, set_collective_timeout, DEFAULT_TIMEOUT_S};

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(not(feature = "mpi"))]
#[path = "no_mpi.rs"]
mod mpi;

// NCCL through cudarc (`nccl`) or the emulated device's NCCL (`cuda-emu`): the same backend
// over the seam `device::cuda::nccl`.
#[cfg(any(feature = "nccl", feature = "cuda-emu"))]
mod nccl;
#[cfg(not(any(feature = "nccl", feature = "cuda-emu")))]
#[path = "no_nccl.rs"]
mod nccl;

pub use self::mpi::MpiWorld;
pub use self::nccl::NcclWorld;

use crate::comm::codec::{Reader, Writer};
use crate::config::validate::Collectives;
use crate::device::cuda::{Cuda, CudaTensor, DeviceSums};
use crate::device::gpu::{DeviceBuffer, Gpu};
use crate::{Error, Result};

/// What a rank can do with the others. All methods but [`send`](Communicator::send) and
/// [`recv`](Communicator::recv) are collective: every rank of the world must call them in the
/// same order with matching arguments. The point-to-point pair involves two ranks only: every
/// `send(_, dest)` on one rank is matched by one `recv(src)` on `dest`, and messages between a
/// pair arrive in the order they were sent.
pub trait Communicator {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum across ranks, in place; every rank receives the same result.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// [`Communicator::all_reduce_sum`] of values in GPU memory (`--device cuda` statistics),
    /// in place. NCCL sums them on the GPUs; this default copies them to the host, sums there and
    /// copies the sums back.
    fn all_reduce_sum_device(&self, buf: &mut DeviceSums) -> Result<()> {
        if self.size() == 1 || buf.is_empty() {
            return Ok(());
        }
        let mut host = buf.to_host()?;
        self.all_reduce_sum(&mut host)?;
        buf.copy_from_host(&host)
    }
    /// Replaces `buf` on every rank with `root`'s bytes (lengths may differ before the call).
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// `root` receives every rank's bytes in rank order; the others receive `None`.
    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>>;
    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// Sub-worlds of the ranks that pass the same `color`, ordered by `(key, rank)`.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;
    /// Sends `buf` to rank `dest` (point-to-point; may return before `dest` receives it).
    fn send(&self, buf: &[u8], dest: usize) -> Result<()>;
    /// Receives the next message that rank `src` sent to this rank.
    fn recv(&self, src: usize) -> Result<Vec<u8>>;
    /// [`Communicator::send`] of an activation in GPU memory (a hidden state between `--pp`
    /// stages). NCCL sends it GPU to GPU; this default copies it to the host and sends its
    /// values as one message. `dest` takes it with [`Communicator::recv_device`], knowing its
    /// shape from an earlier message.
    fn send_device(&self, gpu: &Cuda, x: &CudaTensor, dest: usize) -> Result<()> {
        let host = gpu.to_host(x)?;
        let mut w = Writer::default();
        w.f32s(host.as_slice().expect("to_host returns standard layout"));
        self.send(&w.0, dest)
    }
    /// Receives on `gpu` what [`Communicator::send_device`] on `src` sent: a `rows × cols`
    /// activation (the default receives the values on the host and uploads them).
    fn recv_device(&self, gpu: &Cuda, rows: usize, cols: usize, src: usize) -> Result<CudaTensor> {
        let msg = self.recv(src)?;
        let values = Reader::new(&msg).f32s()?;
        let host = ndarray::Array2::from_shape_vec((rows, cols), values).map_err(|e| {
            Error::Comm(format!(
                "rank {src} sent an activation that is not {rows} x {cols}: {e}"
            ))
        })?;
        gpu.to_device(&host)
    }
    /// Backend name for reports.
    fn backend(&self) -> &'static str;
    /// Rank 0 leads: it decides and writes the output.
    fn is_leader(&self) -> bool {
        self.rank() == 0
    }
}

/// A world of one process: collectives return at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn gather(&self, send: &[u8], _root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![send.to_vec()]))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize, _key: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(SingleProcess))
    }
    fn send(&self, _buf: &[u8], dest: usize) -> Result<()> {
        Err(Error::Comm(format!(
            "point-to-point send to rank {dest} in a world of one"
        )))
    }
    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        Err(Error::Comm(format!(
            "point-to-point receive from rank {src} in a world of one"
        )))
    }
    fn backend(&self) -> &'static str {
        "single"
    }
}

/// Makes every rank agree on a local result: if any rank failed, every rank returns an error —
/// the failing rank its own, the others one that names the lowest failing rank and its message.
/// Call it at the same point on every rank; it costs one `size`-long all-reduce.
pub fn agree<T>(comm: &dyn Communicator, local: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return local;
    }
    let mut flags = vec![0.0; comm.size()];
    if local.is_err() {
        flags[comm.rank()] = 1.0;
    }
    comm.all_reduce_sum(&mut flags)?;
    let Some(first) = flags.iter().position(|&f| f > 0.0) else {
        return local;
    };
    let mut msg = match &local {
        Err(e) if comm.rank() == first => e.to_string().into_bytes(),
        _ => Vec::new(),
    };
    comm.broadcast(&mut msg, first)?;
    match local {
        Err(e) => Err(e),
        Ok(_) => Err(Error::Comm(format!(
            "rank {first} failed: {}",
            String::from_utf8_lossy(&msg)
        ))),
    }
}

/// Runs `make` on rank 0 only and gives every rank its `N` bytes (the unique id of a new NCCL
/// communicator, which every member needs before it can join): one broadcast. If `make` fails,
/// rank 0 returns its error and the others one that quotes it, so that no rank waits for an id
/// that never comes. Collective on `comm`.
pub fn share_from_root<const N: usize>(
    comm: &dyn Communicator,
    make: impl FnOnce() -> Result<[u8; N]>,
) -> Result<[u8; N]> {
    let mine = (comm.rank() == 0).then(make);
    let mut msg = match &mine {
        Some(Ok(bytes)) => [&[1u8][..], bytes].concat(),
        Some(Err(e)) => [&[0u8][..], e.to_string().as_bytes()].concat(),
        None => Vec::new(),
    };
    comm.broadcast(&mut msg, 0)?;
    if let Some(mine) = mine {
        return mine;
    }
    match msg.split_first() {
        Some((1, bytes)) => bytes.try_into().map_err(|_| {
            Error::Comm(format!(
                "rank 0 sent a {}-byte id, expected {N} bytes",
                bytes.len()
            ))
        }),
        Some((0, why)) => Err(Error::Comm(format!(
            "rank 0 failed: {}",
            String::from_utf8_lossy(why)
        ))),
        _ => Err(Error::Comm(format!(
            "malformed id message from rank 0 ({} bytes)",
            msg.len()
        ))),
    }
}

/// Connects to the world the launcher started (or a world of one without a launcher), over the
/// collectives `--comm` chose.
pub fn connect(transport: Collectives) -> Result<Box<dyn Communicator>> {
    let launch = launcher::detect();
    match (transport, &launch) {
        (Collectives::Auto, None) => Ok(Box::new(SingleProcess)),
        (Collectives::Auto | Collectives::Mpi, _) => Ok(Box::new(MpiWorld::init()?)),
        (Collectives::Nccl, None) => Ok(Box::new(NcclWorld::init(None, 0)?)),
        (Collectives::Nccl, Some(l)) => Ok(Box::new(NcclWorld::init(
            Some(MpiWorld::init()?),
            l.local_rank,
        )?)),
    }
}

/// Closed-form checks of every collective, valid for any world size (each rank contributes
/// `rank + 1`, so sums are `n(n+1)/2`): one body for the thread, MPI and NCCL backends.
pub fn selftest(comm: &dyn Communicator) -> Result<()> {
    let (rank, n) = (comm.rank(), comm.size());
    let fail = |what: String| {
        Err(Error::Comm(format!(
            "collective self-test on rank {rank} of {n} ({}): {what}",
            comm.backend()
        )))
    };
    let mut v = vec![(rank + 1) as f64; 1000];
    v[999] = rank as f64 * 0.5;
    comm.all_reduce_sum(&mut v)?;
    let want = (n * (n + 1)) as f64 / 2.0;
    if v[..999].iter().any(|&x| x != want) || v[999] != 0.25 * ((n * (n - 1)) as f64) {
        return fail(format!(
            "all-reduce gave {} and {}, expected {want} and {}",
            v[0],
            v[999],
            0.25 * (n * (n - 1)) as f64
        ));
    }
    for root in [0, n - 1] {
        let mut b = if rank == root {
            format!("from {root}").into_bytes()
        } else {
            vec![7; rank * 3]
        };
        comm.broadcast(&mut b, root)?;
        if b != format!("from {root}").into_bytes() {
            return fail(format!(
                "broadcast from {root} gave {:?}",
                String::from_utf8_lossy(&b)
            ));
        }
    }
    let gathered = comm.gather(&vec![rank as u8; rank + 1], 0)?;
    match (rank, gathered) {
        (0, Some(all))
            if all
                .iter()
                .enumerate()
                .all(|(r, b)| *b == vec![r as u8; r + 1])
                && all.len() == n => {}
        (0, other) => return fail(format!("gather gave {other:?}")),
        (_, None) => {}
        (_, Some(_)) => return fail("gather delivered to a non-root rank".into()),
    }
    comm.barrier()?;
    // Point-to-point: every rank sends two messages to the next one around the ring, in order.
    if n > 1 {
        let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
        comm.send(&vec![rank as u8; rank + 2], next)?;
        comm.send(&[], next)?;
        let (first, second) = (comm.recv(prev)?, comm.recv(prev)?);
        if first != vec![prev as u8; prev + 2] || !second.is_empty() {
            return fail(format!(
                "send/recv from {prev} gave {first:?} then {second:?}"
            ));
        }
    }
    // Split into even and odd ranks; each half sums its own ranks + 1.
    let half = comm.split(rank % 2, rank)?;
    let mut s = [(rank + 1) as f64];
    half.all_reduce_sum(&mut s)?;
    let members: Vec<usize> = (0..n).filter(|r| r % 2 == rank % 2).collect();
    let want: f64 = members.iter().map(|r| (r + 1) as f64).sum();
    if s[0] != want || half.size() != members.len() || half.rank() != rank / 2 {
        return fail(format!(
            "split: sum {} (want {want}), size {} (want {}), rank {}",
            s[0],
            half.size(),
            members.len(),
            half.rank()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::threads::run_world;
    use super::*;

    #[test]
    fn every_member_of_a_split_gets_its_own_roots_id() {
        // Two groups (even, odd world ranks): each group's rank 0 makes an id naming its world
        // rank; only roots call `make`.
        let out = run_world(5, |w| {
            let group = w.split(w.rank() % 2, w.rank()).unwrap();
            let world_rank = w.rank();
            share_from_root::<128>(group.as_ref(), || {
                assert_eq!(
                    world_rank,
                    world_rank % 2,
                    "only a group's rank 0 makes the id"
                );
                Ok([world_rank as u8 + 7; 128])
            })
            .unwrap()
        });
        for (rank, id) in out.iter().enumerate() {
            assert_eq!(*id, [(rank % 2) as u8 + 7; 128], "rank {rank}");
        }
    }

    #[test]
    fn a_root_that_cannot_make_the_id_fails_every_member() {
        let out = run_world(3, |w| {
            share_from_root::<128>(w, || Err(Error::Comm("ncclGetUniqueId: no network".into())))
        });
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("no network"));
        for r in &out[1..] {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(
                e.contains("rank 0 failed") && e.contains("no network"),
                "{e}"
            );
        }
        // A root whose id has another length than the members expect (a mismatched build).
        let out = run_world(2, |w| {
            if w.rank() == 0 {
                share_from_root::<4>(w, || Ok([1; 4])).map(|_| ())
            } else {
                share_from_root::<128>(w, || unreachable!()).map(|_| ())
            }
        });
        assert!(out[0].is_ok());
        let e = out[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("4-byte id, expected 128"), "{e}");
    }
}

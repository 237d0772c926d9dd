//! The emulated NCCL (feature `cuda-emu`): the NCCL seam of `nccl.rs` served on the host, with
//! NCCL's semantics as eva uses them, so that `--comm nccl` runs on emulated devices over thread
//! ranks and over MPI processes alike.
//!
//! | NCCL | emulated as |
//! |---|---|
//! | unique id, `ncclCommInitRankConfig` (non-blocking) | a directory named by the id in the temporary directory (shared memory between ranks, as NCCL's own intra-node transport); joining writes `join.<rank>` and stays in progress ([`Comm::ready`] false) until every rank has joined; two ranks on one emulated device fail as NCCL's "Duplicate GPU detected" |
//! | `ncclAllReduce` (sum, f64, in place) | each rank posts its values (`ar.<seq>.<rank>`) when the call reaches the head of its queue; it completes when every rank's values are there, summed in rank order; the buffer is NaN until then |
//! | `ncclSend` / `ncclRecv` | the sender posts its values at once (`p2p.<src>.<dst>.<seq>`); the receive takes them in order; a send completes only when its receiver has taken it (NCCL: "blocking for the GPU") |
//! | the stream, `ncclCommGetAsyncError` | every call queues in order; [`Comm::poll`] moves the queue on and says whether it is empty; an error is sticky |
//! | `ncclCommAbort` | [`Comm::abort`]: this rank leaves; peers still waiting stay waiting (as on a GPU) |
//!
//! A rank that never arrives: `EVA_EMU_NCCL_STALL=R@N` makes rank `R` of every communicator of
//! more than one rank stop at its `N`th call (0 is joining): that call and every later one never
//! completes, as a GPU whose process hung. Tests use it for `--collective-timeout`.
//!
//! Values the host code hands over are taken when the call is made (the emulated stream has run
//! everything queued before it), as the device would read them at that point of its stream.

use super::runtime::Buffer;
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of a unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// The emulated devices NCCL can use (`EVA_EMU_DEVICES`).
pub fn devices() -> Result<usize> {
    Ok(super::runtime::device_count())
}

/// A new communicator's unique id: it names the directory its ranks meet in.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut id = [0u8; ID_BYTES];
    id[..4].copy_from_slice(b"EVAE");
    id[4..8].copy_from_slice(&std::process::id().to_le_bytes());
    id[8..16].copy_from_slice(&nanos.to_le_bytes());
    id[16..24].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    Ok(id)
}

/// The emulated GPU a rank's NCCL communicators run on.
pub struct Device {
    ordinal: usize,
}

impl Device {
    /// Emulated GPU `ordinal` (which must exist).
    pub fn open(ordinal: usize) -> Result<Device> {
        let count = devices()?;
        if ordinal >= count {
            return Err(Error::Comm(format!(
                "--comm nccl: GPU {ordinal} was asked for, the emulator has {count} (EVA_EMU_DEVICES)"
            )));
        }
        Ok(Device { ordinal })
    }

    /// Its ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

/// Where an all-reduce's sums go when it completes.
enum Target {
    /// Device memory (`ptr`, `n` values).
    Device(*mut f64),
    /// The staging of a host all-reduce ([`HostSum`]).
    Host,
}

/// A call in a rank's queue (its stream).
enum Op {
    /// Joining the communicator.
    Join,
    /// An in-place sum: this rank's values (taken when called), posted at the head of the queue.
    AllReduce {
        seq: u64,
        mine: Vec<f64>,
        posted: bool,
        target: Target,
    },
    /// A send, posted when called; done once the receiver has taken the file.
    Send { path: PathBuf },
    /// A receive of `bytes` bytes into `ptr`.
    Recv {
        path: PathBuf,
        ptr: *mut u8,
        bytes: usize,
    },
}

/// One rank's emulated NCCL communicator.
pub struct Comm {
    rank: usize,
    size: usize,
    ordinal: usize,
    dir: PathBuf,
    queue: VecDeque<Op>,
    /// All-reduces called so far.
    collectives: u64,
    /// Sends to and receives from each peer so far.
    sent: HashMap<usize, u64>,
    received: HashMap<usize, u64>,
    /// Calls made (joining is call 0), for `EVA_EMU_NCCL_STALL`.
    calls: usize,
    stall_at: Option<usize>,
    stalled: bool,
    /// The sticky asynchronous error.
    error: Option<String>,
    /// The completed host all-reduce's sums, until [`HostSum::finish`] takes them.
    host_sums: Option<Vec<f64>>,
}

/// A host all-reduce staged through the device: [`Comm::host_sum_start`], then
/// [`HostSum::finish`] once [`Comm::poll`] says the queue is empty.
pub struct HostSum {
    len: usize,
}

impl HostSum {
    /// Copies the sums into `host` (of the length started with).
    pub fn finish(self, comm: &mut Comm, host: &mut [f64]) -> Result<()> {
        let sums = comm.host_sums.take().ok_or_else(|| {
            Error::Comm("emulated NCCL: the host all-reduce has not completed".into())
        })?;
        if sums.len() != self.len || host.len() != self.len {
            return Err(Error::Comm(format!(
                "emulated NCCL: host all-reduce of {} values finished into {}",
                self.len,
                host.len()
            )));
        }
        host.copy_from_slice(&sums);
        Ok(())
    }
}

/// `EVA_EMU_NCCL_STALL=R@N`: the call at which rank `R` stops, for a rank of `rank`.
fn stall_at(rank: usize, size: usize) -> Result<Option<usize>> {
    let Ok(spec) = std::env::var("EVA_EMU_NCCL_STALL") else {
        return Ok(None);
    };
    let parsed = spec
        .split_once('@')
        .and_then(|(r, n)| Some((r.trim().parse::<usize>().ok()?, n.trim().parse().ok()?)));
    let Some((r, n)) = parsed else {
        return Err(Error::usage(format!(
            "EVA_EMU_NCCL_STALL: expected RANK@CALL (e.g. 1@3), found {spec:?}"
        )));
    };
    Ok((size > 1 && r == rank).then_some(n))
}

/// Writes `bytes` to `path` whole: a reader never sees part of it.
fn post(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().expect("a file").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            Error::Comm(format!(
                "emulated NCCL: cannot write {}: {e}",
                path.display()
            ))
        })
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Comm {
    /// Starts joining the communicator of `size` ranks named by `id` as `rank` on `dev`
    /// (`ncclCommInitRankConfig` with `blocking = 0`): returns at once; [`Comm::ready`] says when
    /// every rank has joined.
    pub fn start(dev: &Device, rank: usize, size: usize, id: &[u8; ID_BYTES]) -> Result<Comm> {
        if rank >= size {
            return Err(Error::Comm(format!(
                "emulated NCCL: rank {rank} of a communicator of {size}"
            )));
        }
        let name: String = id[..24].iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("eva-nccl-emu-{name}"));
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Comm(format!("emulated NCCL: cannot make {}: {e}", dir.display()))
        })?;
        let mut comm = Comm {
            rank,
            size,
            ordinal: dev.ordinal,
            dir,
            queue: VecDeque::new(),
            collectives: 0,
            sent: HashMap::new(),
            received: HashMap::new(),
            calls: 0,
            stall_at: stall_at(rank, size)?,
            stalled: false,
            error: None,
            host_sums: None,
        };
        if comm.call() {
            post(
                &comm.dir.join(format!("join.{rank}")),
                format!("{}", dev.ordinal).as_bytes(),
            )?;
        }
        comm.queue.push_back(Op::Join);
        Ok(comm)
    }

    /// Counts a call; false once this rank has stalled (`EVA_EMU_NCCL_STALL`).
    fn call(&mut self) -> bool {
        if self.stall_at == Some(self.calls) {
            self.stalled = true;
        }
        self.calls += 1;
        !self.stalled
    }

    /// The sticky error, if any.
    fn check(&self) -> Result<()> {
        match &self.error {
            Some(e) => Err(Error::Comm(e.clone())),
            None => Ok(()),
        }
    }

    /// Whether joining has completed (`ncclCommGetAsyncError` no longer `ncclInProgress`):
    /// before that no other call may be made.
    pub fn ready(&mut self) -> Result<bool> {
        self.progress()?;
        Ok(!self.stalled && !matches!(self.queue.front(), Some(Op::Join)))
    }

    /// Whether every call made so far has completed (the stream has run them).
    pub fn poll(&mut self) -> Result<bool> {
        self.progress()?;
        Ok(!self.stalled && self.queue.is_empty())
    }

    /// Moves the queue on as far as the peers allow; an error is kept (sticky).
    fn progress(&mut self) -> Result<()> {
        self.check()?;
        if self.stalled {
            return Ok(());
        }
        if let Err(e) = self.advance() {
            self.error = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Completes the calls at the head of the queue, in order, until one cannot complete yet.
    fn advance(&mut self) -> Result<()> {
        while let Some(op) = self.queue.front_mut() {
            let done = match op {
                Op::Join => Self::joined(&self.dir, self.size)?,
                Op::AllReduce {
                    seq,
                    mine,
                    posted,
                    target,
                } => {
                    let sums =
                        Self::all_reduce_step(&self.dir, self.rank, self.size, *seq, mine, posted)?;
                    match (sums, target) {
                        (None, _) => false,
                        (Some(sums), Target::Device(ptr)) => {
                            // SAFETY: the caller of `all_reduce_sum` keeps the buffer's values
                            // allocated until the queue is empty (it waits).
                            unsafe {
                                std::ptr::copy_nonoverlapping(sums.as_ptr(), *ptr, sums.len())
                            };
                            true
                        }
                        (Some(sums), Target::Host) => {
                            self.host_sums = Some(sums);
                            true
                        }
                    }
                }
                Op::Send { path } => !path.exists(),
                Op::Recv { path, ptr, bytes } => Self::take(path, *ptr, *bytes)?,
            };
            if !done {
                break;
            }
            self.queue.pop_front();
        }
        Ok(())
    }

    /// An all-reduce at the head of the queue: posts this rank's values once, then the sums once
    /// every rank has posted (and this rank's part of the previous all-reduce is removed: every
    /// rank has posted `seq`, so every rank has read `seq - 1`).
    fn all_reduce_step(
        dir: &Path,
        rank: usize,
        size: usize,
        seq: u64,
        mine: &[f64],
        posted: &mut bool,
    ) -> Result<Option<Vec<f64>>> {
        if !*posted {
            post(&dir.join(format!("ar.{seq}.{rank}")), &f64_bytes(mine))?;
            *posted = true;
        }
        let sums = Self::summed(dir, seq, size, mine.len())?;
        if sums.is_some() && seq > 0 {
            let _ = std::fs::remove_file(dir.join(format!("ar.{}.{rank}", seq - 1)));
        }
        Ok(sums)
    }

    /// A receive at the head of the queue: takes the matching send's `bytes` bytes into `ptr`
    /// once it is there (a different length is NCCL's invalid usage).
    fn take(path: &Path, ptr: *mut u8, bytes: usize) -> Result<bool> {
        let Ok(got) = std::fs::read(path) else {
            return Ok(false);
        };
        if got.len() != bytes {
            return Err(Error::Comm(format!(
                "NCCL receive failed: ncclInvalidUsage (a receive of {bytes} bytes matched a send of {} bytes)",
                got.len()
            )));
        }
        // SAFETY: the caller of `recv` keeps `bytes` bytes at `ptr` allocated until the queue is
        // empty (it waits).
        unsafe { std::ptr::copy_nonoverlapping(got.as_ptr(), ptr, bytes) };
        std::fs::remove_file(path).map_err(|e| {
            Error::Comm(format!(
                "emulated NCCL: cannot take {}: {e}",
                path.display()
            ))
        })?;
        Ok(true)
    }

    /// Whether every rank has joined; an error when two share an emulated device.
    fn joined(dir: &Path, size: usize) -> Result<bool> {
        let mut on = Vec::with_capacity(size);
        for r in 0..size {
            match std::fs::read_to_string(dir.join(format!("join.{r}"))) {
                Ok(s) => on.push(s),
                Err(_) => return Ok(false),
            }
        }
        for a in 0..size {
            if let Some(b) = (a + 1..size).find(|&b| on[b] == on[a]) {
                return Err(Error::Comm(format!(
                    "NCCL communicator init failed: ncclInvalidUsage (Duplicate GPU detected: rank {a} and rank {b} both on emulated CUDA device {}; one rank per GPU)",
                    on[a]
                )));
            }
        }
        Ok(true)
    }

    /// The sums of all-reduce `seq` in rank order, once every rank has posted its `n` values.
    fn summed(dir: &Path, seq: u64, size: usize, n: usize) -> Result<Option<Vec<f64>>> {
        let part = |r: usize| dir.join(format!("ar.{seq}.{r}"));
        // Cheap checks first: a large sum is read once, when every part is there.
        if !(0..size).all(|r| part(r).exists()) {
            return Ok(None);
        }
        let mut parts = Vec::with_capacity(size);
        for r in 0..size {
            match std::fs::read(part(r)) {
                Ok(b) => parts.push(b),
                Err(_) => return Ok(None),
            }
        }
        let mut sums = vec![0.0; n];
        for (r, part) in parts.iter().enumerate() {
            if part.len() != 8 * n {
                return Err(Error::Comm(format!(
                    "NCCL all-reduce failed: ncclInvalidUsage (rank {r} summed {} values, this rank {n})",
                    part.len() / 8
                )));
            }
            for (s, b) in sums.iter_mut().zip(part.chunks_exact(8)) {
                *s += f64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
        }
        Ok(Some(sums))
    }

    /// A call other than joining: refused before joining completed (NCCL's rule for
    /// non-blocking communicators) or after an error.
    fn enqueue(&mut self, what: &str) -> Result<bool> {
        self.check()?;
        if !self.stalled && matches!(self.queue.front(), Some(Op::Join)) {
            return Err(Error::Comm(format!(
                "emulated NCCL: {what} before the communicator finished joining (poll ready() first)"
            )));
        }
        Ok(self.call())
    }

    fn peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.size {
            return Err(Error::Comm(format!(
                "NCCL {what} failed: ncclInvalidArgument (peer {peer} in a communicator of {})",
                self.size
            )));
        }
        Ok(())
    }

    /// Queues `op` and starts what can start (a GPU starts a call once it is at its stream's
    /// head). A stalled rank's calls never reach its queue: the queue stays stuck.
    fn push(&mut self, go: bool, op: Op) -> Result<()> {
        if go {
            self.queue.push_back(op);
        }
        self.progress()
    }

    /// Queues an in-place sum of the first `n` values of `buf` over the ranks.
    pub fn all_reduce_sum(&mut self, buf: &mut Buffer<f64>, n: usize) -> Result<()> {
        assert!(
            n <= buf.len(),
            "all_reduce_sum: {n} values of {}",
            buf.len()
        );
        let go = self.enqueue("all-reduce")?;
        let ptr = buf.device_ptr();
        // SAFETY: `n` values of the buffer (checked).
        let mine = unsafe { std::slice::from_raw_parts(ptr, n) }.to_vec();
        // Undefined until the sum completes: reading it earlier shows as NaN.
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(ptr, 0xFF, n) };
        let seq = self.collectives;
        self.collectives += 1;
        self.push(
            go,
            Op::AllReduce {
                seq,
                mine,
                posted: false,
                target: Target::Device(ptr),
            },
        )
    }

    /// Queues a sum of host values staged through the device; [`HostSum::finish`] gives it.
    pub fn host_sum_start(&mut self, host: &[f64]) -> Result<HostSum> {
        let go = self.enqueue("all-reduce")?;
        let seq = self.collectives;
        self.collectives += 1;
        self.host_sums = None;
        self.push(
            go,
            Op::AllReduce {
                seq,
                mine: host.to_vec(),
                posted: false,
                target: Target::Host,
            },
        )?;
        Ok(HostSum { len: host.len() })
    }

    /// Queues a send of the first `n` values of `buf` to `peer`.
    pub fn send(&mut self, buf: &Buffer<f32>, n: usize, peer: usize) -> Result<()> {
        assert!(n <= buf.len(), "send: {n} values of {}", buf.len());
        self.peer(peer, "send")?;
        let go = self.enqueue("send")?;
        let seq = self.sent.entry(peer).or_insert(0);
        let path = self.dir.join(format!("p2p.{}.{peer}.{seq}", self.rank));
        *seq += 1;
        if go {
            // SAFETY: `n` values of the buffer (checked).
            let values = unsafe { std::slice::from_raw_parts(buf.device_ptr(), n) };
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            post(&path, &bytes)?;
        }
        self.push(go, Op::Send { path })
    }

    /// Queues a receive from `peer` into the first `n` values of `buf`.
    pub fn recv(&mut self, buf: &mut Buffer<f32>, n: usize, peer: usize) -> Result<()> {
        assert!(n <= buf.len(), "recv: {n} values of {}", buf.len());
        self.peer(peer, "receive")?;
        let go = self.enqueue("receive")?;
        let seq = self.received.entry(peer).or_insert(0);
        let path = self.dir.join(format!("p2p.{peer}.{}.{seq}", self.rank));
        *seq += 1;
        let ptr = buf.device_ptr();
        // Undefined until the receive completes.
        // SAFETY: `n` values of the buffer (checked).
        unsafe { std::ptr::write_bytes(ptr, 0xFF, n) };
        self.push(
            go,
            Op::Recv {
                path,
                ptr: ptr as *mut u8,
                bytes: 4 * n,
            },
        )
    }

    /// The emulated device this rank's communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `ncclCommAbort`: leaves at once, whatever is queued (called explicitly, never from a drop).
    pub fn abort(mut self) {
        self.queue.clear();
    }
}

impl Drop for Comm {
    /// Leaves the communicator; the last rank to leave removes its directory. Never fails.
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join(format!("left.{}", self.rank)), b"");
        if (0..self.size).all(|r| self.dir.join(format!("left.{r}")).exists()) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::runtime::Runtime;
    use super::*;

    /// An emulated allocation (which fails only beyond `EVA_EMU_MEMORY`).
    fn mem<T>(r: std::result::Result<Buffer<T>, super::super::runtime::AllocError>) -> Buffer<T> {
        r.unwrap_or_else(|_| panic!("emulated allocation failed"))
    }

    /// Two ranks of one communicator, on emulated GPUs 0 and 1, joined.
    fn pair() -> (Runtime, Comm, Comm) {
        std::env::set_var("EVA_EMU_DEVICES", "8");
        let id = unique_id().unwrap();
        let mut a = Comm::start(&Device::open(0).unwrap(), 0, 2, &id).unwrap();
        assert!(!a.ready().unwrap(), "joined before its peer");
        let mut b = Comm::start(&Device::open(1).unwrap(), 1, 2, &id).unwrap();
        assert!(a.ready().unwrap() && b.ready().unwrap());
        (Runtime::open(0).unwrap(), a, b)
    }

    #[test]
    fn a_send_completes_only_when_its_receiver_has_taken_it() {
        let (rt, mut a, mut b) = pair();
        let x = mem(rt.upload(&[1.0f32, 2.0, 3.0]));
        a.send(&x, 3, 1).unwrap();
        drop(x);
        assert!(!a.poll().unwrap(), "a send completed before its receive");
        let mut y = mem(rt.zeros::<f32>(3));
        b.recv(&mut y, 3, 0).unwrap();
        assert!(b.poll().unwrap() && a.poll().unwrap());
        assert_eq!(rt.download(&y, 0..3).unwrap(), [1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_sum_is_nan_until_every_rank_has_posted() {
        let (rt, mut a, mut b) = pair();
        let mut x = mem(rt.upload(&[1.0f64, 2.0]));
        let mut y = mem(rt.upload(&[10.0f64, 20.0]));
        a.all_reduce_sum(&mut x, 2).unwrap();
        assert!(!a.poll().unwrap());
        assert!(rt.download(&x, 0..2).unwrap().iter().all(|v| v.is_nan()));
        b.all_reduce_sum(&mut y, 2).unwrap();
        assert!(a.poll().unwrap() && b.poll().unwrap());
        assert_eq!(rt.download(&x, 0..2).unwrap(), [11.0, 22.0]);
        assert_eq!(rt.download(&y, 0..2).unwrap(), [11.0, 22.0]);
    }

    #[test]
    fn mismatched_lengths_and_peers_are_errors_that_stick() {
        let (rt, mut a, mut b) = pair();
        let x = mem(rt.upload(&[1.0f32, 2.0]));
        a.send(&x, 2, 1).unwrap();
        let mut y = mem(rt.zeros::<f32>(3));
        // The error shows at the call or at the next poll (here: the call, which starts it).
        let e = b
            .recv(&mut y, 3, 0)
            .and_then(|()| b.poll().map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a receive of 12 bytes matched a send of 8 bytes"),
            "{e}"
        );
        assert_eq!(b.poll().unwrap_err().to_string(), e, "not sticky");
        let e = a.send(&x, 2, 2).unwrap_err().to_string();
        assert!(e.contains("peer 2 in a communicator of 2"), "{e}");
    }
}

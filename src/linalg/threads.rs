//! eva's thread count and the one scheduler of its parallel loops: work cut into pieces whose
//! shapes depend on the problem (or, for independent rows and heads, whose results do not depend
//! on the cut), each piece computed by the same code whichever thread takes it.
//!
//! | item | what |
//! |---|---|
//! | [`set_threads`], [`threads`] | the thread count (OpenBLAS stays on the calling thread) |
//! | [`tiles`] | `0..n` cut into parts whose shapes depend on `n` alone |
//! | [`par_tiles`], [`par_map`] | every tile on the next free thread (the BLAS-tiled products, the sketch, the solves) |
//! | [`par_groups`], [`par_rows`] | one contiguous group of independent items per thread, small work kept on the calling thread (the CPU backend's loops and attention heads) |

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

extern "C" {
    fn openblas_set_num_threads(n: std::os::raw::c_int);
}

/// Threads for eva's parallel loops and faer (0: not set yet).
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set inside the scheduler's pieces: the tiled kernels they call stay on their thread.
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets the number of threads eva's parallel loops and faer use (0 = all available cores), and
/// keeps OpenBLAS on the calling thread (see [`crate::linalg`]: its own threading would change
/// f32 rounding with the thread count).
pub fn set_threads(n: usize) {
    let n = if n == 0 {
        std::thread::available_parallelism()
            .map(|v| v.get())
            .unwrap_or(1)
    } else {
        n
    };
    THREADS.store(n, Ordering::Relaxed);
    // SAFETY: OpenBLAS allows changing its thread count between calls.
    unsafe { openblas_set_num_threads(1) };
    faer::set_global_parallelism(match std::num::NonZeroUsize::new(n) {
        Some(v) if n > 1 => faer::Par::Rayon(v),
        _ => faer::Par::Seq,
    });
}

/// Threads of eva's parallel loops (1 inside one of their pieces); all cores unless [`set_threads`] said otherwise (the first
/// call also puts OpenBLAS on the calling thread).
pub fn threads() -> usize {
    if ALONE.with(|a| a.get()) {
        return 1;
    }
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            set_threads(0);
            THREADS.load(Ordering::Relaxed)
        }
        n => n,
    }
}

/// `0..n` cut into `ceil(n / target)` nearly equal consecutive ranges: tile shapes that depend on
/// `n` alone, never on the thread count.
pub fn tiles(n: usize, target: usize) -> Vec<Range<usize>> {
    let count = n.div_ceil(target.max(1)).max(1);
    (0..count)
        .map(|i| i * n / count..(i + 1) * n / count)
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `f(i)` for every tile `i < count` on up to [`threads`] threads, each tile taking the next
/// free one (tiles of unequal cost still end together). Inside a tile eva's tiled kernels run on
/// its thread alone ([`threads`] = 1); tile shapes never depend on the thread count, so every
/// result is the same as when computed by itself.
pub fn par_tiles(count: usize, f: impl Fn(usize) + Sync) {
    run(count, threads(), f)
}

/// The scheduler behind every parallel loop of eva: `f(i)` for every `i < count` on
/// `min(workers, count)` threads, the calling one included, each taking the next free index;
/// inside, [`threads`] is 1 (a kernel called from a tile stays on its thread).
fn run(count: usize, workers: usize, f: impl Fn(usize) + Sync) {
    let t = workers.min(count);
    let next = AtomicUsize::new(0);
    let work = || {
        let was = ALONE.with(|a| a.replace(true));
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            f(i);
        }
        ALONE.with(|a| a.set(was));
    };
    if t <= 1 {
        work();
        return;
    }
    std::thread::scope(|s| {
        for _ in 1..t {
            s.spawn(work);
        }
        work();
    });
}

/// `[f(0), f(1), ..]` for `count` tiles computed as in [`par_tiles`], in tile order.
pub fn par_map<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<std::sync::Mutex<Option<T>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    par_tiles(count, |t| {
        *slots[t].lock().expect("no tile panicked") = Some(f(t))
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("no tile panicked")
                .expect("every tile ran")
        })
        .collect()
}

/// Rough operation count below which [`par_groups`] and [`par_rows`] stay on the calling thread
/// (starting a scoped thread costs some tens of microseconds).
const PAR_MIN_WORK: usize = 1 << 17;

/// Runs `f(group)` over `0..count` cut into one contiguous group per thread, on
/// `min(threads, count, work / PAR_MIN_WORK)` threads (at least one): for items that are
/// independent of each other (rows of a normalization, attention heads), `work` operations in
/// all. Each item is computed by the same code whichever group it falls in, so results do not
/// depend on the thread count; the groups run as [`par_tiles`]' tiles.
pub fn par_groups(count: usize, work: usize, f: impl Fn(Range<usize>) + Sync) {
    if count == 0 {
        return;
    }
    let t = threads().min(count).min(work / PAR_MIN_WORK).max(1);
    let per = count.div_ceil(t);
    run(count.div_ceil(per), t, |g| {
        f(g * per..((g + 1) * per).min(count))
    });
}

/// Runs `f(first_row, rows)` over `data` (rows of `row_len` values, `cost` operations each) cut
/// as [`par_groups`] cuts its items, each group a contiguous block of whole rows (a partial last
/// row, if any, goes with the last block). Each row is computed by the same code whichever block
/// it falls in, so results do not depend on the thread count.
pub fn par_rows<T: Send>(
    data: &mut [T],
    row_len: usize,
    cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let rows = data.len().checked_div(row_len).unwrap_or(0);
    if rows == 0 {
        f(0, data);
        return;
    }
    let (len, base) = (data.len(), SendPtr(data.as_mut_ptr()));
    par_groups(rows, rows.saturating_mul(cost), |r| {
        let (start, end) = (
            r.start * row_len,
            if r.end == rows { len } else { r.end * row_len },
        );
        // SAFETY: the groups are disjoint ranges of rows of `data`, which outlives the scope.
        let block = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
        f(r.start, block)
    });
}

/// A raw pointer that tiles writing disjoint parts of one buffer may share across threads.
pub(super) struct SendPtr<T>(pub(super) *mut T);
// By hand: a derive would ask `T: Copy`, and the pointer copies whatever `T` is.
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only used by tiles that write disjoint elements, inside a scope that outlives them.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    pub(super) fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_range_in_equal_parts() {
        assert_eq!(
            tiles(640, 128),
            vec![0..128, 128..256, 256..384, 384..512, 512..640]
        );
        assert_eq!(tiles(384, 256), vec![0..192, 192..384]);
        assert_eq!(tiles(5, 128), vec![0..5]);
        assert!(tiles(0, 128).is_empty());
    }

    /// Every row is visited once, in blocks of whole rows that start where they say (a partial
    /// last row goes with the last block), with 1 to 3 threads; work below the threshold stays
    /// in one block. (Other tests may change the thread count meanwhile: only the threshold's
    /// single block is asserted exactly.)
    #[test]
    fn rows_are_cut_into_whole_blocks() {
        for (threads, cost) in [
            (1, PAR_MIN_WORK),
            (2, PAR_MIN_WORK),
            (3, PAR_MIN_WORK),
            (3, 1),
        ] {
            set_threads(threads);
            let (rows, row_len) = (10, 3);
            let mut data = vec![0usize; rows * row_len + 2];
            let blocks = std::sync::Mutex::new(Vec::new());
            par_rows(&mut data, row_len, cost, |first, block| {
                blocks.lock().unwrap().push((first, block.len()));
                for (i, v) in block.iter_mut().enumerate() {
                    *v += first * row_len + i + 1;
                }
            });
            assert!(
                data.iter().enumerate().all(|(i, &v)| v == i + 1),
                "{threads}: {data:?}"
            );
            let mut blocks = blocks.into_inner().unwrap();
            blocks.sort();
            let last = blocks.len() - 1;
            assert!(
                blocks
                    .iter()
                    .enumerate()
                    .all(|(i, &(_, len))| len % row_len == if i == last { 2 } else { 0 }),
                "{blocks:?}"
            );
            if cost == 1 {
                assert_eq!(blocks, vec![(0, data.len())]);
            }
        }
        set_threads(0);
    }
}

//! Cost of eva's polled MPI collectives against OpenMPI's blocking ones, under `mpirun -np 2`:
//! a small all-reduce loop, a large (21 MB) all-reduce, and a large one whose partner arrives
//! 20 ms late (the waiting rank sleeps meanwhile), plus the CPU the waiting rank used.
//!
//!     mpirun -np 2 target/release/examples/collective_latency

use eva::comm::{Communicator, MpiWorld};
use mpi::collective::SystemOperation;
use mpi::traits::*;
use std::time::{Duration, Instant};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat[stat.rfind(')').map_or(0, |i| i + 1)..]
        .split_whitespace()
        .collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() -> eva::Result<()> {
    let eva_world = MpiWorld::init()?;
    let raw = mpi::topology::SimpleCommunicator::world();
    let rank = eva_world.rank();
    let blocking = |buf: &mut [f64]| {
        let send = buf.to_vec();
        raw.all_reduce_into(&send[..], buf, SystemOperation::sum());
    };
    let polled = |buf: &mut [f64]| eva_world.all_reduce_sum(buf).expect("all-reduce");
    let report = |what: &str, b: f64, p: f64, unit: &str| {
        if rank == 0 {
            println!(
                "{what:<44} blocking {b:>9.2} {unit}   polled {p:>9.2} {unit}   ratio {:.2}",
                p / b
            );
        }
    };

    let small = 20_000;
    let mut v = vec![1.0f64; 8];
    let time = |f: &dyn Fn(&mut [f64]), buf: &mut [f64], n: usize| {
        eva_world.barrier().expect("barrier");
        let t = Instant::now();
        for _ in 0..n {
            f(buf);
        }
        t.elapsed().as_secs_f64() / n as f64
    };
    let b = time(&blocking, &mut v, small);
    let p = time(&polled, &mut v, small);
    report("all-reduce of 8 f64 (per call)", b * 1e6, p * 1e6, "us");

    let mut big = vec![1.0f64; 21 << 17];
    let b = time(&blocking, &mut big, 20);
    let p = time(&polled, &mut big, 20);
    report("all-reduce of 21 MB (per call)", b * 1e3, p * 1e3, "ms");

    // The partner (rank 1) arrives 20 ms late; rank 0 waits. Time on rank 1 = the cost of
    // finishing once it arrives; CPU on rank 0 = what waiting cost.
    let late = |f: &dyn Fn(&mut [f64]), buf: &mut [f64]| {
        eva_world.barrier().expect("barrier");
        let (mut inside, cpu0, mut wall) = (Duration::ZERO, cpu_seconds(), Duration::ZERO);
        for _ in 0..10 {
            if rank == 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let t = Instant::now();
            f(buf);
            inside += t.elapsed();
            wall += t.elapsed();
        }
        let mut pair = [
            inside.as_secs_f64() / 10.0,
            (cpu_seconds() - cpu0) / wall.as_secs_f64().max(1e-9),
        ];
        let mut got = [0.0; 4];
        let send = [pair[0], pair[1]];
        raw.all_gather_into(&send[..], &mut got[..]);
        pair = [got[2], got[1]];
        pair
    };
    let [b_late, b_cpu] = late(&blocking, &mut big);
    let [p_late, p_cpu] = late(&polled, &mut big);
    report(
        "21 MB, partner 20 ms late: late rank's call",
        b_late * 1e3,
        p_late * 1e3,
        "ms",
    );
    report(
        "21 MB, partner 20 ms late: waiting rank CPU",
        b_cpu * 100.0,
        p_cpu * 100.0,
        "% ",
    );
    Ok(())
}

//! Runs the closed-form collective self-test (`eva::comm::selftest`) on the world a launcher
//! started, e.g. `mpirun -np 4 target/debug/examples/collectives` (or `... collectives nccl`
//! on GPUs). Prints one line per rank and exits non-zero on any mismatch.

use eva::comm;
use eva::config::validate::Collectives;
use std::process::ExitCode;

fn main() -> ExitCode {
    let backend = match std::env::args().nth(1).as_deref() {
        Some("nccl") => Collectives::Nccl,
        _ => Collectives::Mpi,
    };
    let result = comm::connect(backend).and_then(|c| {
        comm::selftest(c.as_ref())?;
        Ok((c.rank(), c.size(), c.backend()))
    });
    match result {
        Ok((rank, size, backend)) => {
            println!("rank {rank} of {size}: {backend} collectives ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("collectives: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Reads the launcher's environment: OpenMPI (`mpirun`), MPICH/Hydra (PMI), PMIx and Slurm
//! (`srun`). Without any of these, eva is a world of one.

/// What the launcher says about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Which launcher set the variables.
    pub kind: &'static str,
    /// Rank in the world.
    pub rank: usize,
    /// World size.
    pub size: usize,
    /// Rank among the processes on this node (picks the GPU).
    pub local_rank: usize,
    /// Processes on this node (divides the cores).
    pub local_size: usize,
}

/// Detects a launcher from the environment of this process.
pub fn detect() -> Option<Launch> {
    detect_from(|k| std::env::var(k).ok())
}

/// [`detect`] over an arbitrary environment (for tests).
pub fn detect_from(env: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<usize>().ok());
    let make =
        |kind, rank: Option<usize>, size: Option<usize>, lr: Option<usize>, ls: Option<usize>| {
            let (rank, size) = (rank?, size?);
            Some(Launch {
                kind,
                rank,
                size,
                local_rank: lr.unwrap_or(0),
                local_size: ls.unwrap_or(1).max(1),
            })
        };
    make(
        "openmpi",
        num("OMPI_COMM_WORLD_RANK"),
        num("OMPI_COMM_WORLD_SIZE"),
        num("OMPI_COMM_WORLD_LOCAL_RANK"),
        num("OMPI_COMM_WORLD_LOCAL_SIZE"),
    )
    .or_else(|| {
        make(
            "mpich",
            num("PMI_RANK"),
            num("PMI_SIZE"),
            num("MPI_LOCALRANKID"),
            num("MPI_LOCALNRANKS"),
        )
    })
    .or_else(|| {
        make(
            "pmix",
            num("PMIX_RANK"),
            num("PMIX_SIZE").or(num("OMPI_UNIVERSE_SIZE")),
            num("PMIX_LOCAL_RANK"),
            num("PMIX_LOCAL_SIZE"),
        )
    })
    // A Slurm batch script also has SLURM_PROCID; only srun steps set SLURM_STEP_NUM_TASKS.
    .or_else(|| {
        num("SLURM_STEP_NUM_TASKS")?;
        make(
            "slurm",
            num("SLURM_PROCID"),
            num("SLURM_STEP_NUM_TASKS"),
            num("SLURM_LOCALID"),
            local_tasks(env("SLURM_STEP_TASKS_PER_NODE")),
        )
    })
}

/// First count of Slurm's `2(x3),1` task-per-node syntax.
fn local_tasks(v: Option<String>) -> Option<usize> {
    v?.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// Cores for this process: the machine's cores divided among the ranks on this node.
pub fn cores_per_rank(local_ranks: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|v| v.get())
        .unwrap_or(1);
    (cores / local_ranks.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launchers_are_recognized() {
        assert_eq!(detect_from(env(&[])), None);
        let l = detect_from(env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]))
        .unwrap();
        assert_eq!(
            (l.kind, l.rank, l.size, l.local_rank, l.local_size),
            ("openmpi", 3, 4, 1, 2)
        );
        let l = detect_from(env(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")])).unwrap();
        assert_eq!((l.kind, l.rank, l.size, l.local_size), ("mpich", 1, 2, 1));
        // A Slurm batch script without srun is not a world.
        assert_eq!(
            detect_from(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")])),
            None
        );
        let l = detect_from(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ]))
        .unwrap();
        assert_eq!(
            (l.kind, l.rank, l.size, l.local_rank, l.local_size),
            ("slurm", 5, 8, 1, 4)
        );
    }
}

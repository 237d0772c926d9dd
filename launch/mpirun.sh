#!/usr/bin/env bash
# Runs `eva init` on NP processes with OpenMPI, on one box or on the hosts of a hostfile.
#
#   launch/mpirun.sh 4 --synthetic "layers=8,dim=1024,tokens=4096,units=64" --out /tmp/eva-adapter
#   HOSTFILE=hosts.txt launch/mpirun.sh 16 --activations /shared/acts --out /shared/adapter
#
# A hostfile is OpenMPI's (`host slots=N` lines); tests/suite/netns.rs rehearses two "nodes" on one
# box through this script (network namespaces, see launch/README.md).
# Build first with MPI: cargo build --release --features mpi (or --features nccl for NCCL).
# Every rank runs the same command line; rank 0 writes the output directory.
set -euo pipefail
np=${1:?usage: launch/mpirun.sh NP eva-init-arguments...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
eva=${EVA:-$here/target/release/eva}
[ -x "$eva" ] || { echo "no eva binary at $eva; build it with: cargo build --release --features mpi" >&2; exit 2; }

# OpenMPI as root (containers), more ranks than cores, and no ssh agent needed on one box.
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}

args=(-np "$np")
if [ -n "${HOSTFILE:-}" ]; then
    args+=(--hostfile "$HOSTFILE")
fi
exec mpirun "${args[@]}" "$eva" init "$@"

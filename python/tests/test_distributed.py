"""`torchrun --nproc-per-node 2` (gloo) gives the one-process adapter, with a plain and with an
FSDP-wrapped model, and a rank that raises makes every rank raise instead of hanging."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_eva_lora import BATCH, drop_in

HERE = Path(__file__).resolve().parent


def torchrun(out, mode):
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           str(HERE / "dist_script.py"), str(out), mode]
    return subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)


@pytest.mark.parametrize("mode", ["ok", "fsdp"])
def test_two_ranks_give_the_one_process_adapter(tmp_path, mode):
    r = torchrun(tmp_path / "state.pt", mode)
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(tmp_path / "state.pt")
    one = drop_in("tiny-llama", BATCH)
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in one.items()}
    worst = max((two[k] - one[k]).abs().max().item() for k in one if one[k].numel())
    assert worst <= 1e-6, worst


def test_a_failing_rank_fails_every_rank(tmp_path):
    r = torchrun(tmp_path / "state.pt", "fail")
    assert r.returncode != 0
    mine = (tmp_path / "state.pt.rank1").read_text()
    other = (tmp_path / "state.pt.rank0").read_text()
    assert mine == "RuntimeError: rank 1 broke its forward pass", mine
    assert other.startswith("EvaError: rank 1 failed: RuntimeError: rank 1 broke its forward pass"), other

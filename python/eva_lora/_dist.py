"""eva's collectives over the job's own ``torch.distributed`` process group.

The Rust engine calls these methods with bytes and gets bytes back (see ``python/src/comm.rs``).
Tensors live on the CPU for gloo and on the current CUDA device for NCCL.
"""

import torch
import torch.distributed as dist


class TorchComm:
    """The collectives eva needs (all-reduce of float64, broadcast, gather, barrier, send/recv)
    on ``group`` (``None``: the default group)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def _global(self, rank):
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _tensor(self, data, dtype):
        if len(data) == 0:
            return torch.empty(0, dtype=dtype, device=self.device)
        return torch.frombuffer(bytearray(data), dtype=dtype).to(self.device)

    @staticmethod
    def _bytes(t):
        return t.cpu().numpy().tobytes()

    def all_reduce_sum(self, data):
        t = self._tensor(data, torch.float64)
        if t.numel() > 0:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return self._bytes(t)

    def broadcast(self, data, root):
        src = self._global(root)
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=src, group=self.group)
        n = int(n.item())
        if n == 0:
            return b""
        if self.rank == root:
            t = self._tensor(data, torch.uint8)
        else:
            t = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(t, src=src, group=self.group)
        return self._bytes(t)

    def gather(self, data, root):
        # all_gather of padded payloads: every backend has it (gloo and NCCL alike).
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        width = max(sizes)
        if width == 0:
            return [b""] * self.size if self.rank == root else None
        padded = torch.zeros(width, dtype=torch.uint8, device=self.device)
        if len(data) > 0:
            padded[: len(data)] = self._tensor(data, torch.uint8)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        if self.rank != root:
            return None
        return [self._bytes(p[:s]) for p, s in zip(parts, sizes)]

    def barrier(self):
        dist.barrier(group=self.group)

    def send(self, data, dest):
        dst = self._global(dest)
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=self.device), dst, group=self.group)
        if len(data) > 0:
            dist.send(self._tensor(data, torch.uint8), dst, group=self.group)

    def recv(self, src):
        src = self._global(src)
        n = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(n, src, group=self.group)
        n = int(n.item())
        if n == 0:
            return b""
        t = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.recv(t, src, group=self.group)
        return self._bytes(t)

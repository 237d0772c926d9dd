"""Run under `torchrun --nproc-per-node N` (gloo) by test_distributed.py: each rank reads its
DistributedSampler shard with a per-rank batch of BATCH / N, so that the global batches are the
one-process run's; rank 0 saves the state dict to argv[1]. With argv[2] == "fail", rank 1's
forward raises on its second batch; every rank writes what it raised to argv[1].rank<R>. With
argv[2] == "fsdp", the model is FSDP-wrapped first (FSDP2's `fully_shard` on every decoder
layer and the root, CPU parameters sharded over gloo)."""

import sys

import torch
import torch.distributed as dist
from peft import EvaConfig, LoraConfig
from peft.tuners.lora.eva import forward_fn_dict

import eva_lora
from common import MODELS, TARGETS, load_model, loader

BATCH = 8


def main():
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_model(MODELS["tiny-llama"])
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        # FSDP's unshard/reshard pair around each layer's forward: eva never cuts such a pass short.
        assert eva_lora.eva._paired_wrappers(model)
    calls = [0]

    def forward(model, inputs):
        calls[0] += 1
        if mode == "fail" and rank == 1 and calls[0] == 2:
            raise RuntimeError("rank 1 broke its forward pass")
        return forward_fn_dict(model, inputs)

    ds = loader("tiny-llama", 1).dataset
    sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
    try:
        state = eva_lora.get_eva_state_dict(
            model, loader("tiny-llama", BATCH // world, sampler=sampler), peft_config=cfg, forward_fn=forward, show_progress_bar=False
        )
    except Exception as e:  # noqa: BLE001
        with open(f"{out}.rank{rank}", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        dist.destroy_process_group()
        sys.exit(3)
    if rank == 0:
        torch.save(state, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

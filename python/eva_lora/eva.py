"""``get_eva_state_dict`` and ``initialize_lora_eva_weights`` with ``peft.tuners.lora.eva``'s
signatures and meaning, on eva's statistics (see docs/python.md).

The phases of a run:

1. *targets*: the modules PEFT would hook (LoRA layers of a PeftModel, or the ``nn.Linear`` /
   ``Conv1D`` modules that ``peft_config.target_modules`` selects);
2. *first batch*: one forward pass whose hooks record which modules receive the same input
   tensor object (equal-input groups) and keep each group's rows: they are step 1;
3. *steps*: one forward pass per batch, hooks on the representative module of every input that
   still accumulates hand its rows to the Rust statistics; inputs that are done are unhooked;
4. *finish*: eva's final solves and rank allocation give ``lora_A`` for every target layer.
"""

import json
import warnings
from copy import copy
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from peft.tuners.lora.eva import (
    UNSUPPORTED_LORA_MODULES,
    _load_eva_state_dict,
    forward_fn_dict,
    get_device_with_meta_params,
    move_inputs_to_device,
)
from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling as _peft_model_inputs
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.tuners_utils import _find_minimal_target_modules, check_target_module_exists
from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION
from peft.utils.other import _get_submodules, get_pattern_key
from transformers.pytorch_utils import Conv1D

from ._dist import TorchComm
from ._eva import CUDA, DEFAULT_STATS_MEMORY, EvaError, Gpu, Run

__all__ = [
    "EvaError",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
    "forward_fn_dict",
]

_END = object()


def prepare_model_inputs_fn_language_modeling(model_input, peft_config):
    """PEFT's default: the ``(example, position)`` indices of the tokens whose rows EVA uses (the
    attention mask, and with ``use_label_mask`` the tokens whose label is not
    ``label_mask_value``). Also for a ``BatchEncoding`` (what a tokenizer returns; any mapping).
    A batch with neither ``input_ids`` nor ``attention_mask`` (e.g. a vision model's
    ``pixel_values``) gives ``None``: every token of every layer input is used."""
    if isinstance(model_input, Mapping) and not isinstance(model_input, dict):
        model_input = dict(model_input)
    if isinstance(model_input, dict) and "input_ids" not in model_input and "attention_mask" not in model_input:
        return None
    return _peft_model_inputs(model_input, peft_config)


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """PEFT's default: the rows of ``layer_input`` at the indices ``model_input`` (the output of
    ``prepare_model_inputs_fn_language_modeling``: attention mask and label mask) selects; when
    every token is kept, the input itself, flattened (a view, no copy). ``model_input`` None
    (a batch without token ids or mask) keeps every row."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
            "please provide a custom prepare_layer_inputs_fn"
        )
    if model_input is None:
        return layer_input.reshape(-1, layer_input.shape[-1])
    if (
        isinstance(model_input, torch.Tensor)
        and layer_input.ndim == 3
        and model_input.ndim == 2
        and model_input.shape[0] == layer_input.shape[0] * layer_input.shape[1]
    ):
        return layer_input.reshape(-1, layer_input.shape[-1])
    if layer_input.ndim == 3 and isinstance(model_input, torch.Tensor) and model_input.ndim == 2 and model_input.shape[1] == 2:
        # The same rows as PEFT's `layer_input[model_input.T.unbind()]`, gathered by one
        # `index_select` of whole rows (several times faster than 2-D advanced indexing).
        flat = model_input[:, 0] * layer_input.shape[1] + model_input[:, 1]
        return layer_input.reshape(-1, layer_input.shape[-1]).index_select(0, flat)
    return layer_input[model_input.T.unbind()]


@dataclass
class _Target:
    """One target layer: its module path, module and shapes."""

    name: str
    module: torch.nn.Module
    in_features: int
    out_features: int
    prepare: Any
    # For an expert's slice of a 3-D parameter (PEFT's target_parameters): (parameter path,
    # expert, experts).
    param: Optional[tuple] = None


def _strip_base_layer(name):
    """A module path without PEFT's ``.base_layer`` wrappers."""
    return name.replace(".base_layer", "")


# The batch being run: its (examples, length), for the experts' token positions.
_BATCH = {"shape": None}


def _batch_shape(batch):
    """(examples, length) of a batch's ``input_ids`` or ``attention_mask``, if it has one."""
    if isinstance(batch, Mapping):
        for key in ("input_ids", "attention_mask"):
            t = batch.get(key)
            if isinstance(t, torch.Tensor) and t.ndim == 2:
                return tuple(t.shape)
    return None


def _expert_prepare(experts, which, e):
    """The rows expert ``e`` of a transformers ``*Experts`` module reads, from its forward's
    arguments ``(hidden_states, top_k_index, top_k_weights)``: ``gate_up_proj``'s are the hidden
    states of the tokens routed to it, ``down_proj``'s their ``act(gate) · up``, in transformers'
    order (top-k position, then token), kept tokens only (PEFT's default model inputs)."""

    def prepare(inp, model_input, name):
        if not isinstance(inp, (tuple, list)) or len(inp) < 2:
            raise EvaError(f"{name}: the experts' forward did not receive (hidden_states, top_k_index, ...)")
        x, index = inp[0], inp[1]
        x = x.reshape(-1, x.shape[-1])
        _pos, tok = torch.where(index.reshape(x.shape[0], -1).T == e)
        if model_input is not None:
            shape = _BATCH["shape"]
            if not (isinstance(model_input, torch.Tensor) and model_input.ndim == 2 and model_input.shape[1] == 2 and shape and shape[0] * shape[1] == x.shape[0]):
                raise EvaError(
                    f"{name}: an expert's routed rows need PEFT's default prepare_model_inputs_fn "
                    "(token indices of batches with input_ids or attention_mask)"
                )
            keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            keep[(model_input[:, 0] * shape[1] + model_input[:, 1]).to(x.device)] = True
            tok = tok[keep[tok]]
        rows = x[tok]
        if which == "gate_up_proj":
            return rows
        gate, up = torch.nn.functional.linear(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    return prepare


def _expert_targets(path, experts, param_name, shape):
    """One target per expert of the 3-D parameter ``param_name`` (``[E, out, in]``, as PEFT's
    ``ParamWrapper`` reads it) of the ``*Experts`` module at ``path``."""
    if param_name not in ("gate_up_proj", "down_proj") or not hasattr(experts, "act_fn"):
        raise EvaError(
            f"parameter {path}.{param_name} ({type(experts).__name__}) is not supported: eva computes the routed "
            "inputs of transformers' experts' gate_up_proj and down_proj"
        )
    n, out_features, in_features = shape
    param = f"{path}.{param_name}"
    return [
        _Target(f"{param}[{e}]", experts, in_features, out_features, _expert_prepare(experts, param_name, e), (param, e, n))
        for e in range(n)
    ]


def _shapes(name, module):
    """(in_features, out_features) of a supported module, or an EvaError naming what it is."""
    base = getattr(module, "base_layer", module)
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    raise EvaError(
        f"module {name} ({type(base).__name__}) is not supported: eva computes the statistics of the inputs "
        "of torch.nn.Linear and transformers' Conv1D layers"
    )


def _targets(model, peft_config, is_peft_model, prepare_layer_inputs_fn):
    """The modules PEFT hooks, in ``named_modules`` order; unsupported LoRA types (embeddings,
    convolutions, attention) are left to PEFT's normal initialization with its warning."""
    fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    targets, params = [], []
    for name, module in model.named_modules():
        if is_peft_model and isinstance(module, ParamWrapper):
            base = module.get_base_layer()
            path = _strip_base_layer(name).removeprefix("base_model.model.")
            shape = getattr(base, module.parameter_name).shape
            params.append((module.parameter_name, _expert_targets(path, base, module.parameter_name, shape)))
            continue
        if not is_peft_model and getattr(peft_config, "target_parameters", None):
            for pname, p in module.named_parameters(recurse=False):
                key = f"{name}.{pname}"
                if p.ndim == 3 and any(key == t or key.endswith("." + t) for t in peft_config.target_parameters):
                    params.append((pname, _expert_targets(name, module, pname, p.shape)))
        if is_peft_model:
            if not hasattr(module, "base_layer") or isinstance(module, UNSUPPORTED_LORA_MODULES):
                continue
        else:
            if peft_config.target_modules is None and getattr(peft_config, "target_parameters", None):
                continue
            if peft_config.target_modules is not None and not check_target_module_exists(peft_config, name):
                continue
            if peft_config.target_modules is None and not isinstance(module, (torch.nn.Linear, Conv1D)):
                continue
            if isinstance(module, (torch.nn.Embedding, torch.nn.MultiheadAttention, torch.nn.modules.conv._ConvNd)):
                continue
        fn = fns.pop(name, None) if fns is not None else prepare_layer_inputs_fn
        fn = fn or _prepare_default
        targets.append(_Target(name, module, *_shapes(name, module), fn))
    # The experts' targets in eva's catalog order: gate_up_proj's experts before down_proj's, per
    # module (PEFT wraps gate_up_proj innermost, so named_modules meets it last).
    first = {}
    for _name, ts in params:
        first.setdefault(ts[0].param[0].rsplit(".", 1)[0], len(first))
    params.sort(key=lambda p: (first[p[1][0].param[0].rsplit(".", 1)[0]], p[0] != "gate_up_proj"))
    for _name, ts in params:
        targets.extend(ts)
    if fns:
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not found in the model: "
            f"{fns.keys()}"
        )
    if not targets:
        raise EvaError("no target layers: nothing in the model matches peft_config.target_modules")
    return targets


def _prepare_default(layer_input, model_input, layer_name):
    """PEFT's fallback when ``prepare_layer_inputs_fn`` is None: the first input, flattened."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer {layer_name}, "
            "please provide a custom prepare_layer_inputs_fn"
        )
    if layer_input.ndim > 2:
        layer_input = layer_input.reshape(-1, layer_input.size(-1))
    return layer_input


def _rows(rows, name, gpu=None):
    """Rows as a C-contiguous float32 tensor where eva's statistics live: on GPU ``gpu`` (its
    CUDA ordinal) for rows already there, else on the CPU (no copy for CPU float32 tensors;
    rows on another device are copied)."""
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
        raise EvaError(
            f"prepare_layer_inputs_fn must return a 2-D tensor (tokens x features) for {name}, "
            f"found {type(rows).__name__} {tuple(getattr(rows, 'shape', ()))}"
        )
    rows = rows.detach()
    if rows.device.type == "meta":
        raise EvaError(f"the input of {name} is on the meta device: load the model's weights first")
    if gpu is not None and rows.is_cuda and rows.device.index == gpu:
        return rows.to(dtype=torch.float32).contiguous()
    return rows.to(device="cpu", dtype=torch.float32).contiguous()


def _cuda_index(t):
    """The CUDA ordinal of a tensor on a GPU, else None."""
    return t.device.index if isinstance(t, torch.Tensor) and t.is_cuda else None


def _stats_device(rows, choice):
    """The GPU to keep the statistics on, as (CUDA ordinal, opened ``Gpu``), or (None, None) for
    the host: ``auto`` follows the first batch's layer inputs when this build has CUDA and the
    GPU opens (else warns and stays on the host), ``cuda`` insists, ``cpu`` declines."""
    if choice not in ("auto", "cuda", "cpu"):
        raise EvaError(f"stats_device must be auto, cuda or cpu, found {choice!r}")
    ordinal = next((_cuda_index(r) for r in rows if r.is_cuda), None)
    if choice == "cuda" and (ordinal is None or not CUDA):
        why = "this eva_lora was built without its cuda feature" if not CUDA else "the layer inputs are not on a GPU"
        raise EvaError(f"stats_device='cuda': {why}")
    if choice == "cpu" or ordinal is None or not CUDA:
        return None, None
    try:
        gpu = Gpu(ordinal)
    except EvaError as e:
        if choice == "cuda":
            raise
        warnings.warn(f"eva keeps its statistics on the host (layer inputs are copied from the GPU): {e}")
        return None, None
    # PyTorch's cached-but-free blocks count as used for the driver: eva asks PyTorch to release
    # them before it decides that the GPU is out of memory.
    gpu.on_low_memory(torch.cuda.empty_cache)
    return ordinal, gpu


def _eva_stream(run, gpu):
    """eva's CUDA stream on GPU ``gpu`` as a ``torch.cuda.Stream`` (None for host statistics)."""
    if gpu is None:
        return None
    raw = run.cuda_stream()
    device = torch.device("cuda", gpu)
    return torch.cuda.default_stream(device) if raw == 0 else torch.cuda.ExternalStream(raw, device=device)


def _feed(run, g, x, what, stream):
    """Hands rows to eva: CPU rows as a NumPy view; rows on eva's GPU in place (the pointer
    DLPack would hand over), queued on eva's stream after the work that produced them and kept
    from reuse by PyTorch's allocator until that stream has read them; PyTorch's current stream
    then waits for eva's, so that a later in-place write to the rows (or to the tensor they view)
    comes after eva's reads."""
    if x.shape[0] == 0:
        return  # an expert no kept token was routed to in this batch
    if not x.is_cuda:
        run.accumulate(g, x.numpy(), what)
        return
    current = torch.cuda.current_stream(x.device)
    if current.cuda_stream != stream.cuda_stream:
        stream.wait_stream(current)
        x.record_stream(stream)
    run.accumulate_cuda(g, x.data_ptr(), x.shape[0], x.shape[1], what)
    if current.cuda_stream != stream.cuda_stream:
        current.wait_stream(stream)


def _first_tensor_len(batch):
    """Examples in a batch: the length of its first tensor (1 if it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _first_tensor_len(v)
            if n:
                return n
    if isinstance(batch, (tuple, list)):
        for v in batch:
            n = _first_tensor_len(v)
            if n:
                return n
    return 0


@dataclass
class _Capture:
    """The first batch's forward: each target's input tensors (kept alive so that their ids stay
    unique) and prepared rows."""

    model_input: Any = None
    keys: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    keep: list = field(default_factory=list)
    order: list = field(default_factory=list)


def _discover(model, targets, inputs, model_input, forward_fn):
    """Runs the first batch with recording hooks: returns the equal-input groups (targets whose
    hooks saw the same input tensor objects and use the same preparation), the rows of every
    group's representative (float32, where the forward left them) and the order in which the
    pass called the targets (target indices, one per call)."""
    cap = _Capture(model_input=model_input)

    def hook_for(i, t):
        def hook(module, inp, out):
            raw = inp[0] if isinstance(inp, (tuple, list)) and inp else inp
            cap.keep.append(raw)
            cap.order.append(i)
            cap.keys.setdefault(i, []).append((id(raw), id(t.prepare)))
            cap.rows.setdefault(i, []).append(t.prepare(inp, cap.model_input, t.name))

        return hook

    handles = [t.module.register_forward_hook(hook_for(i, t)) for i, t in enumerate(targets)]
    try:
        forward_fn(model, inputs)
    finally:
        for h in handles:
            h.remove()
    groups = {}
    for i in range(len(targets)):
        key = tuple(cap.keys.get(i, [("unseen", i)]))
        groups.setdefault(key, []).append(i)
    groups = list(groups.values())
    rows = []
    for g in groups:
        i = g[0]
        # Kept where the forward left them until the statistics' device is chosen.
        parts = [_rows(r, targets[i].name, _cuda_index(r)) for r in cap.rows.get(i, [])]
        rows.append(torch.cat([p.to(parts[0].device) for p in parts]) if parts else torch.zeros(0, targets[i].in_features))
    return groups, rows, cap.order


class _CutShort(Exception):
    """Raised by the hook of the last input that still accumulates: the rest of the pass feeds
    nothing."""


def _paired_wrappers(model):
    """Whether something wraps the model's modules with work paired before and after their
    forward, which a pass cut short would leave half done: FSDP's all-gather and reshard,
    accelerate's device hooks, DeepSpeed ZeRO-3's parameter fetch."""
    for m in model.modules():
        if {c.__name__ for c in type(m).__mro__} & {"FullyShardedDataParallel", "FSDPModule"}:
            return True
        if hasattr(m, "_hf_hook") or hasattr(m, "ds_id") or any(hasattr(p, "ds_id") for p in m.parameters(recurse=False)):
            return True
    return False


class _Cut:
    """Where a step's forward pass stops: right after the hook of the hooked input whose
    representative the first pass called last, once every hooked representative has been
    called. The rest (the blocks after it, the LM head) feeds nothing, as in the CLI, whose
    forward stops at the last layer it needs. Only for passes that call each target once in a
    fixed order (checked on the first pass, and on each pass: another order ends the cuts) and
    models without paired wrappers ([`_paired_wrappers`])."""

    def __init__(self, positions):
        # Per group: its representative's call position in the first pass (None: never cut).
        self.positions = positions
        self.last = None
        self.pending = set()

    @classmethod
    def plan(cls, model, targets, groups, order, enabled):
        calls = [0] * len(targets)
        for i in order:
            calls[i] += 1
        if not enabled or any(c != 1 for c in calls) or _paired_wrappers(model):
            return cls(None)
        position = {i: p for p, i in enumerate(order)}
        return cls([position[g[0]] for g in groups])

    def arm(self, hooked):
        """Before a pass: the groups whose hooks are on for it."""
        self.pending = set(hooked)
        self.last = max(hooked, key=self.positions.__getitem__) if self.positions is not None and hooked else None

    def after(self, g):
        """At the end of group ``g``'s hook: stops the pass when nothing hooked is left."""
        if self.last is None:
            return
        self.pending.discard(g)
        if g != self.last:
            return
        if self.pending:
            # Called in another order than the first pass: the graph is not static, never cut.
            self.positions, self.last = None, None
            return
        raise _CutShort


def _cut_short(e):
    """Whether exception ``e`` is (or was raised while handling) a cut of the pass."""
    while e is not None:
        if isinstance(e, _CutShort):
            return True
        e = e.__cause__ or e.__context__
    return False


def _reference(rows, model_input):
    """A row near the data's mean that keeps eva's Gram free of cancellation: the mean of the
    first example's rows when the token indices of PEFT's default preparation tell them (the
    CLI's choice: unit 0), else of the whole first batch."""
    if rows.shape[0] == 0:
        return [0.0] * rows.shape[1]
    first = rows
    if isinstance(model_input, torch.Tensor) and model_input.ndim == 2 and model_input.shape[0] == rows.shape[0]:
        k = int((model_input[:, 0] == model_input[0, 0]).sum())
        first = rows[:k] if k > 0 else rows
    # Non-finite rows are reported by the statistics, with where they are; the reference stays finite.
    return torch.nan_to_num(first.double().mean(0), nan=0.0, posinf=0.0, neginf=0.0).float().tolist()


def _agree(comm, error):
    """Every rank learns whether any rank failed before the engine exists; raises on all of them
    (the failing rank its own exception)."""
    if comm is None:
        if error is not None:
            raise error
        return
    flags = torch.zeros(comm.size, dtype=torch.float64)
    flags[comm.rank] = 1.0 if error is not None else 0.0
    flags = torch.frombuffer(bytearray(comm.all_reduce_sum(flags.numpy().tobytes())), dtype=torch.float64)
    failed = [r for r in range(comm.size) if flags[r] > 0]
    if not failed:
        return
    msg = comm.broadcast(str(error).encode() if comm.rank == failed[0] else b"", failed[0]).decode()
    if error is not None:
        raise error
    raise EvaError(f"rank {failed[0]} failed: {msg}")


def _layer_ranks(peft_config, targets):
    """PEFT's rank before redistribution of each target whose rank is not ``r``: its
    ``rank_pattern`` entry, matched by PEFT's own ``get_pattern_key`` (regular expressions too)."""
    pattern = peft_config.rank_pattern or {}
    ranks = [(t.name, int(pattern.get(get_pattern_key(pattern.keys(), t.name), peft_config.r))) for t in targets]
    return [(name, r) for name, r in ranks if r != peft_config.r]


def _options(peft_config, targets, rho, batch_size, eva_options):
    eva_config = peft_config.eva_config
    opts = {
        "r": peft_config.r,
        "rank_pattern": _layer_ranks(peft_config, targets),
        "lora_alpha": float(peft_config.lora_alpha),
        "lora_dropout": float(peft_config.lora_dropout),
        "rho": float(rho),
        "tau": float(eva_config.tau),
        "whiten": bool(eva_config.whiten),
        "adjust_scaling_factors": bool(eva_config.adjust_scaling_factors),
        "use_label_mask": bool(eva_config.use_label_mask),
        "label_mask_value": int(eva_config.label_mask_value),
        "batch_size": batch_size,
        "task_type": getattr(peft_config, "task_type", None),
        "base_model": getattr(peft_config, "base_model_name_or_path", None),
    }
    task = opts["task_type"]
    opts["task_type"] = getattr(task, "value", task)
    opts.update(eva_options)
    return opts


def _progress(show):
    """A tqdm bar on rank 0 fed by the engine's step callback, or None."""
    if not show or (dist.is_initialized() and dist.get_rank() != 0):
        return None, None
    from tqdm import tqdm

    bar = tqdm(position=0, leave=False)

    def on_step(step, converged, layers, tokens):
        bar.update(1)
        bar.set_description(f"{converged}/{layers} layers have converged")

    return bar, on_step


@dataclass
class _Loop:
    """The Python side's options of a run (eva's engine takes the rest)."""

    show_progress_bar: bool
    cycle_dataloader: bool
    report_path: Optional[str]
    stats_device: str
    stop_forward_early: bool


def _run(model, dataloader, peft_config, targets, forward_fn, prepare_model_inputs_fn, comm, loop, eva_options):
    device = get_device_with_meta_params(model)

    def prepare(batch):
        _BATCH["shape"] = _batch_shape(batch)
        if device is not None:
            batch = move_inputs_to_device(batch, device)
        if prepare_model_inputs_fn is not None:
            return batch, prepare_model_inputs_fn(batch, peft_config)
        return batch, batch

    it = iter(dataloader)
    first = _first_batch(model, it, targets, forward_fn, prepare, comm, loop)
    run = _engine(model, dataloader, peft_config, targets, comm, first, eva_options)
    stop = _steps(model, dataloader, it, targets, forward_fn, prepare, run, first, loop)
    return _finish(run, stop, targets, comm, loop, device)


@dataclass
class _First:
    """What the first batch's pass (phase 2) found on this rank."""

    groups: list
    rows: list
    order: list
    model_input: Any
    local_batch: int
    gpu: Optional[int]
    opened: Any


def _first_batch(model, it, targets, forward_fn, prepare, comm, loop):
    """Phase 2: the first batch (every rank must have one; the engine does not exist yet): its
    pass finds the equal-input groups and keeps their rows; the ranks agree on any failure."""
    error, first = None, None
    try:
        batch = next(it, _END)
        if batch is _END:
            raise EvaError("the data loader is empty: EVA needs at least one batch")
        inputs, model_input = prepare(batch)
        groups, rows, order = _discover(model, targets, inputs, model_input, forward_fn)
        gpu, opened = _stats_device(rows, loop.stats_device)
        first = _First(groups, rows, order, model_input, _first_tensor_len(batch), gpu, opened)
    except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised
        error = e
    _agree(comm, error)
    return first


def _engine(model, dataloader, peft_config, targets, comm, first, eva_options):
    """eva's engine for the run (collective): the global batch, the expected units, PEFT's rho cap
    and each group's reference row."""
    global_batch = first.local_batch
    if comm is not None:
        sizes = torch.zeros(comm.size, dtype=torch.float64)
        sizes[comm.rank] = first.local_batch
        global_batch = int(sum(torch.frombuffer(bytearray(comm.all_reduce_sum(sizes.numpy().tobytes())), dtype=torch.float64)))
    units = len(dataloader) * global_batch if hasattr(dataloader, "__len__") else 0

    rho = peft_config.eva_config.rho
    if rho > 1000:  # PEFT's cap for unusually high rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    layers = [(t.name, t.in_features, t.out_features) for t in targets]
    refs = [_reference(r, first.model_input) for r in first.rows]
    desc = f"pytorch:{type(model).__name__}"
    params = [t.param for t in targets] if any(t.param for t in targets) else None
    options = _options(peft_config, targets, rho, global_batch, eva_options)
    return Run(layers, first.groups, refs, units, desc, options, comm, first.opened, params)


def _steps(model, dataloader, it, targets, forward_fn, prepare, run, first, loop):
    """Phase 3: the steps, until eva's leader, the step cap or the data ends the run; returns why
    it stopped. Step 1 is the first batch's rows; each later batch is one forward pass, with hooks
    on the representatives of the groups that still accumulate."""
    groups, gpu = first.groups, first.gpu
    stream = _eva_stream(run, gpu)
    cut = _Cut.plan(model, targets, groups, first.order, loop.stop_forward_early)
    bar, on_step = _progress(loop.show_progress_bar)
    handles = {}
    state = {"model_input": None, "step": 1}

    def what(name):
        return f"input of {name} (batch {state['step']} of this rank)"

    def hook_for(g):
        t = targets[groups[g][0]]

        def hook(module, inp, out):
            x = _rows(t.prepare(inp, state["model_input"], t.name), t.name, gpu)
            _feed(run, g, x, what(t.name), stream)
            cut.after(g)

        return hook

    try:
        error = None
        try:
            for g, (acc, x) in enumerate(zip(run.accumulating(), first.rows)):
                if acc:
                    name = targets[groups[g][0]].name
                    _feed(run, g, _rows(x, name, gpu), what(name), stream)
        except Exception as e:  # noqa: BLE001
            error = e
        first.rows = None
        stop = _end_step(run, error, on_step)
        while stop is None:
            batch = next(it, _END)
            if batch is _END and loop.cycle_dataloader:
                it = iter(dataloader)
                batch = next(it, _END)
            if not run.more_data(batch is not _END):
                return "data_exhausted"
            state["step"] += 1
            for g, acc in enumerate(run.accumulating()):
                if acc and g not in handles:
                    handles[g] = targets[groups[g][0]].module.register_forward_hook(hook_for(g))
                elif not acc and g in handles:
                    handles.pop(g).remove()
            error = None
            try:
                inputs, state["model_input"] = prepare(batch)
                cut.arm(list(handles))
                forward_fn(model, inputs)
            except Exception as e:  # noqa: BLE001
                error = None if _cut_short(e) else e
            stop = _end_step(run, error, on_step)
        return stop
    finally:
        for h in handles.values():
            h.remove()
        if bar is not None:
            bar.close()


def _finish(run, stop, targets, comm, loop, device):
    """Phase 4: eva's final solves and allocation; rank 0 writes the report. Returns the state
    dict (every target, ``0 x in_features`` where the rank went to others), the config and the
    report."""
    done, config, report = run.finish(stop)
    if loop.report_path is not None and (comm is None or comm.rank == 0):
        with open(loop.report_path, "w") as f:
            f.write(report)
    by_name = {name: (rank, a) for name, rank, _alpha, a in done}
    state_dict = {}
    for t in targets:
        # A 3-D parameter's lora_A: r rows per expert, expert e's at e·r..(e+1)·r, under its path.
        name = t.param[0] if t.param else t.name
        if name in state_dict:
            continue
        rank, a = by_name.get(name, (0, b""))
        w = torch.frombuffer(bytearray(a), dtype=torch.float32).reshape(-1, t.in_features) if rank else torch.zeros(0, t.in_features)
        state_dict[name] = w if device is None else w.to(device)
    return state_dict, json.loads(config), json.loads(report)


def _end_step(run, error, on_step):
    """Ends a step on every rank; the rank whose forward failed raises its own exception."""
    try:
        return run.end_step(None if error is None else f"{type(error).__name__}: {error}", on_step)
    except EvaError:
        if error is not None:
            raise error
        raise


@torch.no_grad()
def get_eva_state_dict(
    model: torch.nn.Module,
    dataloader,
    peft_config=None,
    forward_fn=forward_fn_dict,
    prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    *,
    estimator: str = "auto",
    stats_memory: Optional[int] = None,
    sketch_size: Optional[int] = None,
    max_steps: Optional[int] = None,
    refine_converged: bool = False,
    cycle_dataloader: bool = False,
    report_path: Optional[str] = None,
    seed: int = 0,
    process_group=None,
    stats_device: str = "auto",
    stop_forward_early: bool = True,
) -> dict:
    """PEFT's ``get_eva_state_dict`` on eva's statistics: ``{module name: lora_A}`` with
    ``lora_A`` of shape ``rank x in_features`` (``0 x in_features`` for layers whose rank went
    to others). eva's own options (keyword only): ``estimator`` (``auto``, ``exact``,
    ``sketch``), ``stats_memory`` (bytes of exact Grams under ``auto``; 8 GiB), ``sketch_size``,
    ``max_steps`` (a cap on steps), ``refine_converged`` (PEFT's behaviour: done inputs keep
    accumulating), ``cycle_dataloader`` (PEFT cycles the loader until convergence; eva stops
    when it runs out), ``report_path`` (where rank 0 writes ``eva_report.json``), ``seed``
    (sketch test matrices), ``process_group`` (the ``torch.distributed`` group; default group),
    ``stats_device`` (``auto``: on the GPU of CUDA layer inputs, read in place; ``cuda``;
    ``cpu``: copied to host statistics), ``stop_forward_early`` (a step's forward pass stops
    after the last layer that still accumulates, where that is safe; see docs/python.md).
    Raises :class:`EvaError` with eva's message on bad input or data, and on every rank when one
    rank fails."""
    is_peft_model = hasattr(model, "peft_config")
    if is_peft_model and peft_config is None:
        peft_config = model.peft_config[adapter_name]
    elif peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    if getattr(peft_config, "eva_config", None) is None:
        from peft import EvaConfig

        peft_config = _with_eva_config(peft_config, EvaConfig())
    comm = None
    if dist.is_available() and dist.is_initialized() and gather_distributed_inputs:
        comm = TorchComm(process_group)
    eva_options = {
        "estimator": estimator,
        "stats_memory": DEFAULT_STATS_MEMORY if stats_memory is None else int(stats_memory),
        "sketch_size": sketch_size,
        "max_steps": max_steps,
        "refine_converged": refine_converged,
        "seed": seed,
    }
    ctx = model.disable_adapter() if is_peft_model else nullcontext()
    training = model.training
    model.eval()
    try:
        with ctx:
            targets = _targets(model, peft_config, is_peft_model, prepare_layer_inputs_fn)
            state_dict, _config, _report = _run(
                model,
                dataloader,
                peft_config,
                targets,
                forward_fn,
                prepare_model_inputs_fn,
                comm,
                _Loop(show_progress_bar, cycle_dataloader, report_path, stats_device, stop_forward_early),
                eva_options,
            )
    finally:
        model.train(training)
    return state_dict


def _with_eva_config(peft_config, eva_config):
    from copy import copy

    cfg = copy(peft_config)
    cfg.eva_config = eva_config
    return cfg


@torch.no_grad()
def initialize_lora_eva_weights(
    model: torch.nn.Module,
    dataloader=None,
    eva_state_dict: Optional[dict] = None,
    forward_fn=forward_fn_dict,
    prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn=prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    **eva_options,
):
    """PEFT's ``initialize_lora_eva_weights``: computes the EVA state dict with eva (options of
    :func:`get_eva_state_dict` pass through) and loads it as PEFT does (new ranks, adjusted
    alphas, ``rank_pattern`` / ``alpha_pattern``, rank-0 layers removed from the model and from
    ``target_modules``)."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            model=model,
            dataloader=dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
            **eva_options,
        )
    _load(model, eva_state_dict, adapter_name)
    return model


def _load(model, eva_state_dict, adapter_name):
    """PEFT's ``_load_eva_state_dict`` (new ranks, adjusted alphas, rank-0 layers removed,
    ``rank_pattern`` / ``alpha_pattern``), also for PEFT's ``ParamWrapper``s: their entry is
    keyed by the parameter's path and holds ``r`` rows per expert; their rank is ``r`` and their
    patterns are keyed by the parameter's path (how PEFT reads them back)."""
    wrappers = {n.replace("base_model.model.", "") for n, m in model.named_modules() if isinstance(m, ParamWrapper)}
    if not wrappers:
        _load_eva_state_dict(model, eva_state_dict, adapter_name)
        return
    peft_config = copy(model.peft_config[adapter_name])
    missing, new_targets, others, rank_pattern, alpha_pattern = [], [], [], {}, {}
    for name, module in list(model.named_modules()):
        in_base = name.replace("base_model.model.", "")
        if not isinstance(module, LoraLayer):
            others.append(in_base)
            continue
        experts = isinstance(module, ParamWrapper)
        key = f"{_strip_base_layer(in_base)}.{module.parameter_name}" if experts else name
        r = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), key if experts else name), peft_config.r)
        alpha = peft_config.alpha_pattern.get(get_pattern_key(peft_config.alpha_pattern.keys(), key if experts else name), peft_config.lora_alpha)
        w = eva_state_dict.pop(key, None) if experts else eva_state_dict.pop(name, None)
        if w is None or (experts and w.shape[0] == 0):
            peft_config.init_lora_weights = True
            module.update_layer(adapter_name=adapter_name, r=r, lora_alpha=alpha, config=peft_config)
            missing.append(in_base)
            new_rank = r
        else:
            new_rank = w.shape[0] // (module.num_experts if experts else 1)
            if new_rank == 0:
                parent, _, target_name = _get_submodules(model, name)
                setattr(parent, target_name, module.get_base_layer())
                continue
            if new_rank != r and peft_config.eva_config.adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != r or module.lora_A[adapter_name].weight.device.type == "meta":
                peft_config.init_lora_weights = "eva"
                module.update_layer(adapter_name=adapter_name, r=new_rank, lora_alpha=alpha, config=peft_config)
            module.lora_A[adapter_name].weight.copy_(w)
            if not experts:
                new_targets.append(in_base)
        pattern_key = key if experts else in_base
        if new_rank != peft_config.r:
            rank_pattern[pattern_key] = new_rank
        if alpha != peft_config.lora_alpha:
            alpha_pattern[pattern_key] = alpha
    new_targets = new_targets + [m for m in missing if m not in wrappers]
    if len(new_targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        new_targets = _find_minimal_target_modules(new_targets, others)
    model.peft_config[adapter_name].target_modules = new_targets
    model.peft_config[adapter_name].rank_pattern = rank_pattern
    model.peft_config[adapter_name].alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(f"the following layers were initialized with init_lora_weights=True because they were not found in the eva state_dict: {missing}")

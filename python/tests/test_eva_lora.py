"""The drop-in against `eva init --model`, PEFT loading its result, and eva's errors."""

import json
import subprocess

import pytest
import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model

import eva_lora
from common import TARGETS, cli_adapter, eva_bin, load_model, loader, MODELS

BATCH = 8
# Largest |ΔA| against `eva init --model`, whose forward rounds differently from PyTorch's: on
# the same inputs eva's f32-product Grams (summed in f64 per batch) agree with a float64 PCA to
# ~1e-6 on these random-weight fixtures (close eigenvalues), and the two forwards' rounding adds
# as much again: measured 1.0e-6 (BERT) and 1.7e-6 (tiny Llama) on a Zen 2 machine, 1.65e-6
# (BERT) on an AVX-512 Xeon, where PyTorch's kernels round differently (docs/python.md).
CLI_TOLERANCE = 5e-6
# Against a float64 PCA of PyTorch's own layer inputs: eva's rounding only (f32 products over a
# batch's ~240 rows, then f64): measured 9.8e-7 (tiny Llama) and 4.6e-7 (BERT) on the Xeon.
PCA_TOLERANCE = 2e-6


def drop_in(name, batch_size=BATCH, rank=4, **kw):
    model = load_model(MODELS[name])
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS[name], init_lora_weights="eva", eva_config=EvaConfig())
    return eva_lora.get_eva_state_dict(model, loader(name, batch_size), peft_config=cfg, show_progress_bar=False, **kw)


@pytest.mark.parametrize("name", ["tiny-llama", "bert"])
def test_same_adapter_as_the_cli(name, tmp_path):
    ours = drop_in(name, report_path=tmp_path / "eva_report.json")
    theirs, config = cli_adapter(name, tmp_path / "cli", BATCH)
    report = json.loads((tmp_path / "eva_report.json").read_text())
    assert report["batch_size"] == BATCH
    # The hooks' accumulation is timed as eva's statistics; the forward passes are the caller's.
    assert report["time_s"]["statistics"] > 0 and report["time_s"]["forward"] == 0, report["time_s"]
    # Every target layer is in the state dict; those with rank > 0 are the CLI's layers.
    assert {k for k, v in ours.items() if v.shape[0] > 0} == set(theirs), (sorted(ours), sorted(theirs))
    assert len(ours) == len(config["target_modules"]) + sum(v.shape[0] == 0 for v in ours.values())
    worst = 0.0
    for k, a in theirs.items():
        assert ours[k].shape == a.shape, k
        worst = max(worst, (ours[k] - a).abs().max().item())
    assert worst <= CLI_TOLERANCE, f"max |dA| = {worst}"


def test_peft_loads_the_initialized_model(tmp_path):
    torch.manual_seed(0)
    base = load_model(MODELS["tiny-llama"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
    model = get_peft_model(base, cfg)
    state = drop_in("tiny-llama")
    eva_lora.initialize_lora_eva_weights(model, loader("tiny-llama", BATCH), show_progress_bar=False)
    pc = model.peft_config["default"]
    ranks = {k: v.shape[0] for k, v in state.items()}
    # PEFT's meaning: rank_pattern holds layers whose rank differs from r, alpha scales with it,
    # rank-0 layers leave target_modules.
    for k, r in ranks.items():
        if r not in (0, 4):
            assert pc.rank_pattern[k] == r
            assert pc.alpha_pattern[k] == pytest.approx(8 * r / 4)
    lora = {n[len("base_model.model."):] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora == {k for k, r in ranks.items() if r > 0}
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(MODELS["tiny-llama"]), tmp_path / "adapter")
    mods = dict(loaded.named_modules())
    for k, a in state.items():
        m = mods.get("base_model.model." + k)
        if a.shape[0] == 0:
            assert m is None or not hasattr(m, "lora_A")
            continue
        assert torch.equal(m.lora_A["default"].weight, a), k
        assert m.lora_B["default"].weight.abs().max() == 0


def _lora_a(model):
    """{module path in the base model: lora_A} of a PeftModel's LoRA layers."""
    return {n[len("base_model.model."):]: m.lora_A["default"].weight for n, m in model.named_modules() if hasattr(m, "lora_A")}


def test_rank_pattern_gives_the_clis_adapter_and_config(tmp_path):
    """A pre-set rank_pattern, PEFT's meaning: each layer's rank before redistribution (its cap
    round(r_l x rho), the group's largest; the budget is their sum; alpha scales by new rank over
    r_l). The drop-in resolves PEFT's keys with PEFT's own matcher (a regular expression here);
    `eva init --rank-pattern` takes literal suffixes that name the same layers."""
    pattern = {r"self_attn\.q_proj": 2, "model.layers.1.mlp.down_proj": 6}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["tiny-llama"], rank_pattern=pattern, init_lora_weights="eva", eva_config=EvaConfig())
    model = get_peft_model(load_model(MODELS["tiny-llama"]), cfg)
    eva_lora.initialize_lora_eva_weights(model, loader("tiny-llama", BATCH), show_progress_bar=False, report_path=tmp_path / "r.json")
    theirs, config = cli_adapter(
        "tiny-llama", tmp_path / "cli", BATCH, extra=("--alpha", "8", "--rank-pattern", "q_proj=2,model.layers.1.mlp.down_proj=6")
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rank_budget"] == 4 * 28 - 4 * 2 + 2, report["rank_budget"]
    pc = model.peft_config["default"]
    assert pc.rank_pattern == config["rank_pattern"] and pc.rank_pattern, (pc.rank_pattern, config["rank_pattern"])
    assert pc.alpha_pattern == config["alpha_pattern"] and pc.alpha_pattern, (pc.alpha_pattern, config["alpha_pattern"])
    ours = _lora_a(model)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    worst = max((ours[k] - a).abs().max().item() for k, a in theirs.items())
    assert worst <= CLI_TOLERANCE, f"max |dA| = {worst}"


def test_rank_pattern_with_rho_one_gives_peft_s_own_ranks():
    """With rho = 1 and equal ranks inside each equal-input group every layer keeps its r_l, in
    PEFT's own EVA as in eva: the two configs after `initialize_lora_eva_weights` must agree."""
    from peft import initialize_lora_eva_weights as peft_init

    pattern = {r"self_attn\.(q|k|v)_proj": 2, "down_proj": 6}
    configs = []
    for init in (eva_lora.initialize_lora_eva_weights, peft_init):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["tiny-llama"], rank_pattern=pattern, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
        model = get_peft_model(load_model(MODELS["tiny-llama"]), cfg)
        init(model, loader("tiny-llama", BATCH), show_progress_bar=False)
        pc = model.peft_config["default"]
        configs.append((pc.rank_pattern, pc.alpha_pattern, {k: a.shape[0] for k, a in _lora_a(model).items()}))
    assert configs[0] == configs[1], configs
    ranks = configs[0][2]
    assert {r for k, r in ranks.items() if "_proj" in k and "self_attn" in k and "o_proj" not in k} == {2}
    assert {r for k, r in ranks.items() if "down_proj" in k} == {6}


def test_empty_loader_raises_evas_error():
    model = load_model(MODELS["tiny-llama"])
    cfg = LoraConfig(r=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
    with pytest.raises(eva_lora.EvaError, match="data loader is empty"):
        eva_lora.get_eva_state_dict(model, loader("tiny-llama", 4, lines=[]), peft_config=cfg, show_progress_bar=False)


def test_nan_activations_raise_evas_error():
    model = load_model(MODELS["tiny-llama"])
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    cfg = LoraConfig(r=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
    with pytest.raises(eva_lora.EvaError, match=r"input of model\.layers\.1\.mlp\.gate_proj.*non-finite activation NaN"):
        eva_lora.get_eva_state_dict(model, loader("tiny-llama", 4), peft_config=cfg, show_progress_bar=False)


def test_unsupported_module_raises_evas_error():
    model = load_model(MODELS["tiny-llama"])
    cfg = LoraConfig(r=4, target_modules=["q_proj", "mlp"], init_lora_weights="eva", eva_config=EvaConfig())
    with pytest.raises(eva_lora.EvaError, match=r"module model\.layers\.0\.mlp \(LlamaMLP\) is not supported"):
        eva_lora.get_eva_state_dict(model, loader("tiny-llama", 4), peft_config=cfg, show_progress_bar=False)


# Out-of-range values as `eva init` spells them and as the package's options carry them (the
# knobs PEFT's configs hold, or get_eva_state_dict's keywords); tests/suite/errors.rs's
# SHARED_RANGE_ERRORS holds the same values with the whole message.
SHARED_RANGE_ERRORS = [
    ("--rank", "0", "r", 0),
    ("--rho", "0.5", "rho", 0.5),
    ("--rho", "inf", "rho", float("inf")),
    ("--tau", "1.5", "tau", 1.5),
    ("--tau", "-0.1", "tau", -0.1),
    ("--alpha", "0", "lora_alpha", 0.0),
    ("--lora-dropout", "1", "lora_dropout", 1.0),
    ("--batch-size", "0", "batch_size", 0),
    ("--max-steps", "0", "max_steps", 0),
    ("--sketch-size", "0", "sketch_size", 0),
    ("--rank-pattern", "a.fc=0", "rank_pattern", [("a.fc", 0)]),
]


def cli_error(tmp_path, flag, value):
    """`eva init`'s message for one bad flag value (validation comes before the source is read)."""
    out = subprocess.run(
        [eva_bin(), "init", "--synthetic", "layers=1,dim=8", "--out", str(tmp_path / "out"), f"{flag}={value}"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2, out.stderr
    prefix = "eva: error: "
    assert out.stderr.startswith(prefix), out.stderr
    return out.stderr[len(prefix):].rstrip("\n")


@pytest.mark.parametrize("flag,value,key,python_value", SHARED_RANGE_ERRORS)
def test_out_of_range_values_get_the_clis_messages(tmp_path, flag, value, key, python_value):
    """eva's validation is one function for the CLI and the package: the same bad value gives the
    same message text in both (the flag, then the package's name for the knob)."""
    with pytest.raises(eva_lora.EvaError) as raised:
        eva_lora._eva.Run([("a.fc", 8, 4)], [[0]], [[0.0] * 8], 1, "test", {key: python_value})
    assert str(raised.value) == cli_error(tmp_path, flag, value)


def test_the_drop_in_refuses_what_the_cli_refuses(tmp_path):
    """Through PEFT's configs: an EvaConfig changed after PEFT checked it (PEFT checks rho and tau
    only when it is made) reaches eva's validation, whose message is the CLI's."""
    eva_config = EvaConfig()
    eva_config.tau = 1.5
    model = load_model(MODELS["tiny-llama"])
    cfg = LoraConfig(r=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=eva_config)
    with pytest.raises(eva_lora.EvaError) as raised:
        eva_lora.get_eva_state_dict(model, loader("tiny-llama", 4), peft_config=cfg, show_progress_bar=False)
    assert str(raised.value) == cli_error(tmp_path, "--tau", "1.5")


def test_max_steps_caps_the_run(tmp_path):
    drop_in("bert", max_steps=2, report_path=tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == 2 and report["stop_reason"] == "max_steps", {k: report[k] for k in ("steps", "stop_reason")}


@pytest.mark.parametrize("name", ["tiny-llama", "bert"])
def test_same_components_as_a_float64_pca_of_pytorchs_inputs(name, tmp_path):
    """The hooks, masks, equal-input groups, statistics and final solves are exact for the
    activations PyTorch produced: with every layer accumulating to the end of the data
    (`refine_converged`), each `lora_A` row is, up to sign, the eigenvector of the centered
    float64 covariance of that layer's unmasked inputs over all the batches eva saw."""
    ours = drop_in(name, refine_converged=True, report_path=tmp_path / "r.json")
    steps = json.loads((tmp_path / "r.json").read_text())["steps"]
    model = load_model(MODELS[name])
    mods = dict(model.named_modules())
    sums, mask = {}, {}

    def hook_for(n):
        def hook(m, inp, out):
            x = inp[0][mask["m"]].double()
            s = sums.setdefault(n, [0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + x.shape[0], s[1] + x.sum(0), s[2] + x.T @ x

        return hook

    for n in ours:
        mods[n].register_forward_hook(hook_for(n))
    with torch.no_grad():
        for i, b in enumerate(loader(name, BATCH)):
            if i == steps:
                break
            mask["m"] = b["attention_mask"].bool()
            model(**b)
    worst = 0.0
    for n, a in ours.items():
        if a.shape[0] == 0:
            continue
        k, s, g = sums[n]
        mean = s / k
        w, v = torch.linalg.eigh(g / k - torch.outer(mean, mean))
        top = v[:, torch.argsort(w, descending=True)[: a.shape[0]]].T
        sign = torch.sign((top * a.double()).sum(1, keepdim=True))
        worst = max(worst, (a.double() - sign * top).abs().max().item())
    assert worst <= PCA_TOLERANCE, f"max |dA| = {worst}"


def test_the_forward_pass_stops_after_the_last_layer_that_accumulates():
    """A step's pass ends after the last input still hooked (the LM head never runs after the
    first pass); the adapter is the full passes' bit for bit, as the same rows are fed."""
    calls = {}

    def counted(stop):
        model = load_model(MODELS["tiny-llama"])
        calls[stop] = 0
        model.lm_head.register_forward_hook(lambda *_: calls.__setitem__(stop, calls[stop] + 1))
        cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
        return eva_lora.get_eva_state_dict(model, loader("tiny-llama", BATCH), peft_config=cfg, show_progress_bar=False, stop_forward_early=stop)

    cut, full = counted(True), counted(False)
    assert calls == {True: 1, False: 13}, calls
    assert cut.keys() == full.keys() and all(torch.equal(cut[k], full[k]) for k in full)


class _Swapping(torch.nn.Module):
    """Calls `a` then `b`, or `b` then `a` when the batch says so, then a tail."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.tail = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, swap):
        if swap:
            y = self.b(x) + self.a(x * 2)
        else:
            y = self.a(x * 2) + self.b(x)
        return self.tail(y)


def test_a_pass_in_another_order_is_not_cut_short():
    """When a later pass calls the hooked layers in another order than the first (a graph that
    is not static), it runs to the end and cuts stop: no rows are lost."""
    torch.manual_seed(1)
    batches = [{"x": torch.randn(64, 8) * (1 + i % 3), "swap": torch.tensor(i > 0)} for i in range(6)]
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["a", "b"], init_lora_weights="eva", eva_config=EvaConfig(tau=0.999999))
    out = {}
    for stop in (True, False):
        model = _Swapping()
        tails = [0]
        model.tail.register_forward_hook(lambda *_: tails.__setitem__(0, tails[0] + 1))
        state = eva_lora.get_eva_state_dict(
            model, batches, peft_config=cfg, forward_fn=lambda m, b: m(**b), prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=None, show_progress_bar=False, stop_forward_early=stop, refine_converged=True,
        )
        out[stop] = (state, tails[0])
    assert out[True][1] == out[False][1] == len(batches), (out[True][1], out[False][1])
    assert all(torch.equal(out[True][0][k], out[False][0][k]) for k in ("a", "b"))


def test_stats_device_is_checked():
    """`stats_device` says where the statistics live; asking for the GPU with CPU layer inputs,
    or for something else, raises eva's message."""
    with pytest.raises(eva_lora.EvaError, match="stats_device='cuda': the layer inputs are not on a GPU"):
        drop_in("tiny-llama", stats_device="cuda")
    with pytest.raises(eva_lora.EvaError, match="stats_device must be auto, cuda or cpu, found 'gpu'"):
        drop_in("tiny-llama", stats_device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_statistics_without_a_gpu_raise_evas_error():
    """The extension opens a GPU through eva's library probe: on a machine without one it fails
    with eva's error (what is missing), not a crash, before any collective."""
    with pytest.raises(eva_lora.EvaError, match="the CUDA driver library was not found"):
        eva_lora._eva.Gpu(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (docs/gpu.md)")
@pytest.mark.parametrize("side_stream", [False, True])
def test_cuda_inputs_stay_on_the_gpu_and_give_the_cpu_adapter(side_stream):
    """CUDA layer inputs go to eva's device statistics in place (`stats_device='cuda'` refuses to
    fall back to the host); on PyTorch's default stream and on a side stream (eva's stream waits
    for it, the allocator keeps the rows until eva has read them) the adapter is the CPU run's,
    up to the two devices' f32 rounding (the CLI bar)."""
    cpu = drop_in("tiny-llama")
    model = load_model(MODELS["tiny-llama"]).cuda()
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    before = torch.cuda.current_device()
    with torch.cuda.stream(stream):
        gpu = eva_lora.get_eva_state_dict(model, loader("tiny-llama", BATCH), peft_config=cfg, show_progress_bar=False, stats_device="cuda")
    # eva's calls put the caller's CUDA context back (issue 25, defect 3).
    assert torch.cuda.current_device() == before
    assert torch.empty(1, device="cuda").device.index == before
    assert {k: v.shape for k, v in gpu.items()} == {k: v.shape for k, v in cpu.items()}
    worst = max((gpu[k].cpu() - a).abs().max().item() for k, a in cpu.items() if a.numel())
    assert worst <= CLI_TOLERANCE, f"max |dA| = {worst}"


def test_batch_encoding_batches_give_the_dict_batches_adapter():
    """A tokenizer's BatchEncoding (a mapping, not a dict) works as PEFT's dict batches do."""
    from transformers import BatchEncoding

    model = load_model(MODELS["tiny-llama"])
    cfg = LoraConfig(r=4, target_modules=TARGETS["tiny-llama"], init_lora_weights="eva", eva_config=EvaConfig())
    plain = eva_lora.get_eva_state_dict(model, loader("tiny-llama", BATCH), peft_config=cfg, show_progress_bar=False)
    wrapped = [BatchEncoding(b) for b in loader("tiny-llama", BATCH)]
    ours = eva_lora.get_eva_state_dict(model, wrapped, peft_config=cfg, show_progress_bar=False)
    assert set(ours) == set(plain)
    for k in plain:
        assert torch.equal(ours[k], plain[k]), k


def test_batches_without_token_ids_use_every_token():
    """A vision model's batches (`pixel_values` only): every row of every layer input counts, and
    the components are a PCA of all of them (PEFT's helper fails here on `model_input.T`)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=16, patch_size=4)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g)} for _ in range(3)]
    cfg = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    rows = []
    query = next(m for n, m in model.named_modules() if n.endswith(".q_proj"))
    handle = query.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    state = eva_lora.get_eva_state_dict(model, batches, peft_config=cfg, show_progress_bar=False, estimator="exact", max_steps=3)
    (name, a), = state.items()
    x = torch.cat(rows).double()
    vecs = torch.linalg.eigh(torch.cov(x.T))[1][:, -a.shape[0]:]
    # Every token (17 per image, the CLS token included): the rows span the top components.
    assert a.shape == (2, 32)
    proj = a.double() @ vecs
    assert torch.linalg.svdvals(proj).min() > 0.999, name


def _cli_experts(theirs, config):
    """The CLI's adapter keyed as the drop-in's state dict: a parameter's lora_A by its path
    (PEFT keeps gate_up_proj's under `experts.base_layer` when down_proj is targeted too)."""
    out = {}
    for k, a in theirs.items():
        if k.endswith(".mlp.experts.base_layer"):
            out[k[: -len(".base_layer")] + ".gate_up_proj"] = a
        elif k.endswith(".mlp.experts"):
            out[k + ".down_proj"] = a
        else:
            out[k] = a
    assert {k for k in out if ".experts." in k} <= set(config["target_parameters"])
    return out


def test_moe_experts_get_the_clis_adapter(tmp_path):
    """Qwen3-MoE's experts through PEFT's target_parameters: each expert's rows of its
    parameter's lora_A come from the tokens routed to it, as `eva init --model` computes them on
    the same batches."""
    from common import EXPERTS

    model = load_model(MODELS["qwen3-moe"])
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["qwen3-moe"], target_parameters=EXPERTS, init_lora_weights="eva", eva_config=EvaConfig())
    ours = eva_lora.get_eva_state_dict(model, loader("qwen3-moe", BATCH), peft_config=cfg, show_progress_bar=False)
    theirs, config = cli_adapter("qwen3-moe", tmp_path / "cli", BATCH)
    theirs = _cli_experts(theirs, config)
    assert {k for k, v in ours.items() if v.shape[0] > 0} == set(theirs), (sorted(ours), sorted(theirs))
    worst = 0.0
    for k, a in theirs.items():
        assert ours[k].shape == a.shape, (k, ours[k].shape, a.shape)
        worst = max(worst, (ours[k] - a).abs().max().item())
    assert worst <= MOE_TOLERANCE, f"max |dA| = {worst}"


# The MoE fixture's forward (BF16 weights, q/k norms, routing) rounds differently in eva and
# PyTorch; measured: 8.7e-6 (attention of the last block), 4.2e-6 (experts' down_proj).
MOE_TOLERANCE = 3e-5


def test_moe_initialized_model_saves_and_loads_with_outputs_unchanged(tmp_path):
    """initialize_lora_eva_weights on a PeftModel with ParamWrappers: lora_A holds r rows per
    expert, B = 0, and the saved adapter loads back with the base model's outputs."""
    from common import EXPERTS

    base = load_model(MODELS["qwen3-moe"])
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["qwen3-moe"], target_parameters=EXPERTS, init_lora_weights="eva", eva_config=EvaConfig())
    model = get_peft_model(base, cfg)
    eva_lora.initialize_lora_eva_weights(model, loader("qwen3-moe", BATCH), show_progress_bar=False)
    batch = next(iter(loader("qwen3-moe", BATCH)))
    with torch.no_grad():
        got = model(**batch).logits
        with model.disable_adapter():
            want = model(**batch).logits
    assert torch.equal(got, want)
    model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(load_model(MODELS["qwen3-moe"]), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)
    wrappers = [m for m in fresh.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrappers and all(m.lora_A["default"].weight.shape[0] == m.r["default"] * m.num_experts for m in wrappers)

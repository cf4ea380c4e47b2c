"""LoRA (``peft:``, docs/lora.md): parity with ``peft`` on transformers' Qwen3, training at
TP 2 + SP, PP 2 and DP 2 against one rank, frozen base, adapter-only optimizer, checkpoints
(exact resume after SIGTERM and SIGKILL, a different base refused) and config errors.

Two tiny random ``Qwen3ForCausalLM`` (written here with transformers, two seeds) are converted
in-process; base ``a`` is what the runs adapt, base ``b`` is "another base". One 1-rank launch
converts both, checks the forward against ``peft`` and trains the references; one 2-rank launch
trains every parallel layout (and checks what the optimizer holds); the resume checks run the
real CLI (``python -m lov15_megatron.train``) and kill it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_hf_qwen3, watchdog
from tolerances import assert_close_fp32, assert_close_training, fp32_abs_tol, training_rel_tol

from lov15_megatron.runtime.launch import run_ranks

# Adapters wrap Megatron-Core's own linear layers and ride its DDP, distributed optimizer and
# checkpoints: what changes between Megatron-Core releases (the second environment runs these).
pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
SEQ, GLOBAL_BATCH, STEPS = 32, 4, 4
PEFT = "peft={rank: 4, alpha: 8.0}"  # every target of the language model
# Longest reductions: the 128 tokens of a step a weight gradient sums over (4 × 32); the MLP's
# 96 (hidden 64); the 250-word vocabulary's cross entropy counts as 9 (log_sum_exp_len).
REDUCTION_LEN = GLOBAL_BATCH * SEQ
FORWARD_REDUCTION_LEN = 96
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],  # the VLM's towers run TP without SP
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "cp2": ["parallel.context_parallel_size=2"],
    "dp2": [],
    # Full recompute of every layer: the first layer's input (a frozen embedding's output) needs
    # no gradient, yet its adapters must get theirs through the recomputed forward.
    "dp2_recompute": ["train.recompute.granularity=full", "train.recompute.num_layers=1"],
}


# ----------------------------------------------------------------------------- inside ranks


def _cfg(root: Path, overrides: list[str], base: str = "mc_a"):
    from lov15_megatron.config import apply_override, validate
    from lov15_megatron.convert.core import run_config_of_checkpoint

    cfg = run_config_of_checkpoint(root / base)
    for override in [
        "runtime.device=cpu", f"data.seq_length={SEQ}", "train.micro_batch_size=1",
        f"train.global_batch_size={GLOBAL_BATCH}", "optimizer.lr=1e-2", "logging.log_interval=1",
        f"checkpoint.pretrained={root / base}", PEFT, *overrides,
    ]:  # fmt: skip
        apply_override(cfg, override)
    validate(cfg)
    return cfg


def _random_b(global_name: str, layout, seed: int) -> torch.Tensor:
    """Test-only ``B`` init: random instead of zero (the same full matrix at every layout), so
    that the first step's gradients of ``A`` and ``B`` both count."""
    import zlib

    gen = torch.Generator().manual_seed(zlib.crc32(global_name.encode()))
    return 0.3 * torch.randn(layout.out_features, layout.rank, generator=gen)


def _train(root: Path, overrides: list[str], random_b: bool) -> dict:
    from lov15_megatron.models import lora
    from lov15_megatron.train import train

    initial_b = lora._initial_b
    if random_b:
        lora._initial_b = _random_b
    try:
        result = train(_cfg(root, overrides))
    finally:
        lora._initial_b = initial_b
    return {"losses": result.losses, "grad_norms": result.grad_norms}


def _convert(hf: Path, out: Path) -> None:
    from lov15_megatron.convert import core
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed

    distributed.initialize(core.converter_runtime_config())
    core.hf_to_mcore(get_family("qwen3"), str(hf), str(out))


def _peft_parity(root: Path) -> dict[str, torch.Tensor]:
    """Logits of (1) our base model, (2) ours with LoRA fresh from init, (3) ours and (4) peft's
    on transformers' Qwen3 with the same random adapters (one rank, fp32)."""
    import peft
    from transformers import Qwen3ForCausalLM

    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup

    cfg = _cfg(root, [])
    distributed.initialize(cfg)
    family = get_family("qwen3")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 250, (2, 16), generator=gen)
    positions = torch.arange(16).expand(2, 16)

    def logits(chunk) -> torch.Tensor:
        chunk.eval()
        with torch.no_grad():
            out = chunk(input_ids=ids, position_ids=positions, attention_mask=None)
        return out[..., :250].float()

    (plain,) = setup.build_model_chunks(_cfg(root, ["peft=null"]), family.build_model)
    checkpointing.load_model_weights([plain], root / "mc_a")
    (ours,) = setup.build_model_chunks(cfg, family.build_model)
    checkpointing.load_base_weights([ours], root / "mc_a")
    out = {"base": logits(plain), "fresh": logits(ours)}

    hf = Qwen3ForCausalLM.from_pretrained(root / "hf_a", dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    reference = peft.get_peft_model(hf, config)
    assert _adapt_alike(ours, reference, family.table(cfg), gen) == 2 * len(targets)
    out["ours"] = logits(ours)
    reference.eval()
    with torch.no_grad():
        out["peft"] = reference(input_ids=ids).logits.float()
    return out


def _adapt_alike(ours, reference, table, gen: torch.Generator) -> int:
    """Random global ``A``/``B`` into every adapted layer of ``ours`` and, through the mapping
    table's rows, the same into ``peft``'s modules of ``reference``: each fused layer's ``B``
    rows go to their HF modules by the weight's own transform (GroupedQKV for q/k/v, Concat for
    gate/up), and every HF part shares the one ``A``. Returns the number of HF modules set."""
    from lov15_megatron.models.lora import lora_modules, set_full_adapter

    count = 0
    for name, layer in lora_modules(ours):
        lay = layer.lora_layout
        a = torch.randn(lay.rank, lay.in_features, generator=gen) / lay.in_features**0.5
        b = 0.5 * torch.randn(lay.out_features, lay.rank, generator=gen)
        set_full_adapter(layer, a, b)
        row, hf_names = table.resolve(f"{name}.weight")
        for hf_name, b_part in zip(hf_names, row.transform.to_hf(b), strict=True):
            module = reference.base_model.model.get_submodule(hf_name.removesuffix(".weight"))
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b_part)
            count += 1
    return count


def _hf_targets(chunk, table) -> list[str]:
    """The HF module names of every adapted layer of ``chunk`` (through the mapping table)."""
    from lov15_megatron.models.lora import lora_modules

    names = [table.resolve(f"{name}.weight")[1] for name, _ in lora_modules(chunk)]
    return sorted(n.removesuffix(".weight") for hf_names in names for n in hf_names)


def _vlm_peft_parity(vlm_hf: str, vlm_mc: str) -> dict[str, torch.Tensor]:
    """Our VLM with adapters on all three towers against ``peft`` on our HF VLM (one rank)."""
    import peft

    from lov15_megatron.config import apply_override, validate
    from lov15_megatron.convert.core import run_config_of_checkpoint
    from lov15_megatron.models.qwen3.model import zero_vocab_padding
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup

    family = get_family("llava-ov-1.5")
    cfg = run_config_of_checkpoint(vlm_mc)
    for override in ["runtime.device=cpu", "data.seq_length=64", f"checkpoint.pretrained={vlm_mc}",
                     "peft={rank: 4, alpha: 8.0, towers: [language, vision, merger]}"]:  # fmt: skip
        apply_override(cfg, override)
    validate(cfg)
    distributed.initialize(cfg)
    (ours,) = setup.build_model_chunks(cfg, family.build_model)
    checkpointing.load_base_weights([ours], vlm_mc)
    zero_vocab_padding(ours, cfg.model.language.vocab_size)
    table = family.table(cfg)
    hf = family.hf_model_class().from_pretrained(vlm_hf, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=_hf_targets(ours, table))  # fmt: skip
    reference = peft.get_peft_model(hf, config)
    modules = _adapt_alike(ours, reference, table, torch.Generator().manual_seed(11))
    inputs = family.default_inputs(cfg)
    seq = inputs["input_ids"].shape[1]
    positions = torch.arange(seq).expand(inputs["input_ids"].shape[0], seq)
    ours.eval()
    reference.eval()
    with torch.no_grad():
        out = ours(attention_mask=None, position_ids=positions, **inputs)
        ref = reference(**inputs).logits.float()
    vocab = cfg.model.language.vocab_size
    return {"ours": out[..., :vocab].float(), "peft": ref, "modules": torch.tensor(modules)}


def single_rank(root: str, vlm_hf: str, vlm_mc: str) -> dict:
    """Convert both bases; the forward parities; the reference runs and a LoRA checkpoint (one
    process group throughout; each step rebuilds the model-parallel groups)."""
    from lov15_megatron.config import ConfigError

    root_ = Path(root)
    for name in ("a", "b"):
        _convert(root_ / f"hf_{name}", root_ / f"mc_{name}")
    try:  # the reference implementation (the dev extra installs it)
        import peft  # noqa: F401
    except ImportError:
        parity = vlm_parity = None  # the parity tests fail saying so; the others still run
    else:
        parity, vlm_parity = _peft_parity(root_), _vlm_peft_parity(vlm_hf, vlm_mc)
    out = {
        "parity": parity,
        "vlm_parity": vlm_parity,
        "reference": _train(root_, [f"train.train_iters={STEPS}"], random_b=True),
        "straight": _train(root_, [*RESUME_RUN, f"checkpoint.save={root_ / 'straight'}"], False),
    }
    try:  # a LoRA checkpoint is no base
        _train(root_, ["train.train_iters=1", f"checkpoint.pretrained={root_ / 'straight'}"], False)
    except ConfigError as e:
        out["lora_as_base"] = str(e)
    return out


def _optimizer_holds_only_adapters(root: Path, overrides: list[str]) -> dict:
    """Two steps with the real setup: what reaches DDP's grad buffers and the optimizer, and
    whether the base weights moved."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lov15_megatron.models.lora import is_adapter_key
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup, synthetic
    from lov15_megatron.training.step import train_step

    cfg = _cfg(root, overrides)
    distributed.initialize(cfg)
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, get_family("qwen3").build_model))
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    checkpointing.load_base_weights(model, root / "mc_a")
    params = {n: p for c in model for n, p in c.module.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    data = synthetic.synthetic_batches(cfg)
    for _ in range(2):
        train_step(cfg, data, model, optimizer, scheduler, setup.num_microbatches(cfg))
    state = torch.tensor(0)  # Adam's first-moment elements held by this DP rank
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        state += sum(s["exp_avg"].numel() for s in chained.optimizer.state.values())
    dist.all_reduce(state, group=parallel_state.get_data_parallel_group())
    adapters = [n for n in params if is_adapter_key(n)]
    result = {
        "adapters": adapters,
        "adapter_numel": sum(params[n].numel() for n in adapters),
        "optimizer_state_numel": int(state),
        "grad_buffers": sorted(n for n, p in params.items() if hasattr(p, "main_grad")),
        "trainable": sorted(n for n, p in params.items() if p.requires_grad),
        "base_moved": [n for n in params if n not in adapters and not torch.equal(before[n],
                                                                                  params[n])],
        "adapters_moved": [n for n in adapters if not torch.equal(before[n], params[n])],
    }  # fmt: skip
    return result


def _moe_attention_adapters(root: Path) -> dict:
    """A Qwen3-MoE LM at TP 2 + SP × EP 2 with adapters on attention (its experts take none):
    2 steps, a training checkpoint, 2 more; a fresh model that loads it continues identically."""
    from lov15_megatron.config import load_config
    from lov15_megatron.models.registry import family_for_config
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup, synthetic
    from lov15_megatron.training.step import train_step

    # The base is random and never loaded (the trainer's set-up without train()): a
    # checkpoint.pretrained is required by the config and unread here.
    moe = ["model.language.num_experts=4", "model.language.moe_ffn_hidden_size=32"]
    layout = [
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.expert_model_parallel_size=2",
        "parallel.expert_tensor_parallel_size=1",
    ]
    lora = ["peft={rank: 4, target_modules: [linear_qkv, linear_proj]}", "checkpoint.pretrained=x"]
    cfg = load_config("configs/tiny_gpt.yaml", ["runtime.device=cpu", *moe, *layout, *lora])

    distributed.initialize(cfg)

    def build() -> tuple:
        distributed.set_seed(cfg.runtime.seed)  # the same random base in both builds
        model = setup.wrap_ddp(
            cfg, setup.build_model_chunks(cfg, family_for_config(cfg).build_model)
        )
        optimizer = setup.build_optimizer(cfg, model)
        return model, optimizer, setup.build_scheduler(cfg, optimizer)

    def steps(state: tuple, data, n: int) -> list[float]:
        return [train_step(cfg, data, *state, setup.num_microbatches(cfg)).loss for _ in range(n)]

    first = build()
    data = synthetic.synthetic_batches(cfg)
    losses = steps(first, data, 2)
    checkpointing.save_checkpoint(root / "moe", 2, *first, {"iteration": 2})
    losses += steps(first, data, 2)
    second = build()
    checkpointing.load_checkpoint(root / "moe", *second)
    resumed = steps(second, synthetic.synthetic_batches(cfg, 2), 2)
    trainable = {n.split("layers.")[-1].split(".", 1)[-1] for c in first[0]
                 for n, p in c.module.named_parameters() if p.requires_grad}  # fmt: skip
    return {"losses": losses, "resumed": resumed, "trainable": sorted(trainable)}


def _fingerprints(root: Path) -> dict[str, str]:
    """The base's fingerprint as each layout computes it from its own shards."""
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup

    out = {}
    for name in ("tp2_sp", "pp2"):
        cfg = _cfg(root, LAYOUTS[name])
        distributed.initialize(cfg)
        chunks = setup.build_model_chunks(cfg, get_family("qwen3").build_model)
        out[name] = checkpointing.load_base_weights(chunks, root / "mc_a")["fingerprint"]
    return out


def two_ranks(root: str) -> dict:
    """Every layout, then the optimizer and MoE checks, in one world (its process group stays
    up from check to check: only the model-parallel groups are rebuilt)."""
    root_ = Path(root)
    runs = {
        name: _train(root_, [f"train.train_iters={STEPS}", *extra], random_b=True)
        for name, extra in LAYOUTS.items()
    }
    runs["optimizer"] = _optimizer_holds_only_adapters(root_, LAYOUTS["dp2"])
    runs["moe"] = _moe_attention_adapters(root_)
    runs["fingerprints"] = _fingerprints(root_)
    return runs


# ----------------------------------------------------------------------------- the test side


RESUME_RUN = ["train.train_iters=8", "checkpoint.save_interval=1"]
NO_PEFT = "the reference `peft` is not installed: pip install -e '.[dev]'"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vlm) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("lora")
    make_hf_qwen3(root / "hf_a", seed=0)
    make_hf_qwen3(root / "hf_b", seed=1)
    vlm_hf, vlm_mc = tiny_vlm  # the session's converted tiny VLM, only read here
    (single,) = run_ranks(1, single_rank, str(root), str(vlm_hf), str(vlm_mc))
    per_rank = run_ranks(2, two_ranks, str(root))
    return root, single, per_rank[0]


def test_forward_equals_peft_on_transformers_qwen3(runs):
    _, single, _ = runs
    logits = single["parity"]
    assert logits is not None, NO_PEFT
    # B = 0 at init: the adapted model is the base, bit for bit.
    assert torch.equal(logits["fresh"], logits["base"])
    assert_close_fp32(logits["ours"], logits["peft"], FORWARD_REDUCTION_LEN)
    # The adapters change the logits far beyond that bound (the comparison is not vacuous).
    shift = float((logits["ours"] - logits["base"]).abs().max())
    assert shift > 100 * fp32_abs_tol(FORWARD_REDUCTION_LEN, float(logits["peft"].abs().max()))


def test_vlm_forward_equals_peft_on_our_hf_vlm(runs):
    """Adapters on the language model, the Rice ViT (its stacked q/k/v: one HF module) and the
    merger; the longest reduction is the patch embedding's 588 inputs (as test_llava_ov)."""
    _, single, _ = runs
    logits = single["vlm_parity"]
    assert logits is not None, NO_PEFT
    # language: 2 layers × 7 HF modules; vision: 2 × (qkv, proj, fc1, fc2); merger: mlp.0, mlp.2
    assert int(logits["modules"]) == 14 + 8 + 2
    assert_close_fp32(logits["ours"], logits["peft"], 588)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(runs, layout):
    _, single, layouts = runs
    reference, got = single["reference"], layouts[layout]
    assert len(got["losses"]) == STEPS
    assert_close_training(reference["losses"], got["losses"], REDUCTION_LEN, f"{layout} loss")
    assert_close_training(reference["grad_norms"], got["grad_norms"], REDUCTION_LEN,
                          f"{layout} grad norm", grad_norm=True)  # fmt: skip
    # The adapters do train: the loss moves far more than the tolerance allows.
    losses = reference["losses"]
    assert max(losses) - min(losses) > 100 * training_rel_tol(STEPS, REDUCTION_LEN) * losses[0]


def test_only_adapters_train_and_the_base_stays(runs):
    _, _, layouts = runs
    opt = layouts["optimizer"]
    # 2 layers × (qkv, proj, fc1, fc2) × (A, B)
    assert len(opt["adapters"]) == 16
    assert opt["trainable"] == opt["grad_buffers"] == sorted(opt["adapters"])
    assert opt["optimizer_state_numel"] == opt["adapter_numel"]  # DP-sharded, summed over DP
    assert opt["base_moved"] == []
    assert sorted(opt["adapters_moved"]) == sorted(opt["adapters"])


def test_moe_attention_adapters_train_and_resume(runs):
    _, _, layouts = runs
    moe = layouts["moe"]
    assert moe["trainable"] == [
        "self_attention.linear_proj.lora_A", "self_attention.linear_proj.lora_B",
        "self_attention.linear_qkv.lora_A", "self_attention.linear_qkv.lora_B",
    ]  # fmt: skip
    assert moe["resumed"] == moe["losses"][2:]  # bit-identical after loading the checkpoint
    assert len(set(moe["losses"])) == 4


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``torch_dist`` checkpoint, read in this process without ranks."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lov15_megatron.checkpoint_dir import resolve

    reader = FileSystemReader(str(resolve(path)))
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def test_checkpoint_holds_adapters_and_names_its_base(runs):
    root, single, layouts = runs
    from lov15_megatron.checkpoint_dir import read_model_file, resolve

    saved = _read_checkpoint(root / "straight")
    model_keys = {k for k in saved if not k.startswith(("optimizer", "rng_state"))}
    assert model_keys and all(k.endswith((".lora_A", ".lora_B")) for k in model_keys), model_keys
    assert {k.rsplit(".", 2)[-2] for k in model_keys} == {
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
    }  # fmt: skip
    meta = read_model_file(root / "straight")["peft"]
    assert (meta["rank"], meta["alpha"], meta["towers"]) == (4, 8.0, ["language"])
    assert meta["base"]["path"] == str((root / "mc_a").resolve())
    assert len(meta["base"]["fingerprint"]) == 64
    # The same base gives the same fingerprint from any layout's shards.
    assert layouts["fingerprints"] == {"tp2_sp": meta["base"]["fingerprint"],
                                       "pp2": meta["base"]["fingerprint"]}  # fmt: skip
    latest = resolve(root / "straight")
    assert (
        single["lora_as_base"]
        == f"{latest} is a LoRA checkpoint (adapters only), not model weights"
    )


# ----------------------------------------------------------------------------- the real CLI


def _cli(config: Path, *overrides: str, stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """The trainer in a process group of its own (stderr into stdout unless asked apart)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lov15_megatron.train", "--config", str(config), *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        start_new_session=True,
    )  # fmt: skip


def _run_until(proc: subprocess.Popen, line_start: str, sig: signal.Signals) -> list[str]:
    """Read the trainer's lines; at the first starting with ``line_start`` send ``sig`` (to
    its whole process group for SIGKILL, as a node failure would)."""
    lines: list[str] = []
    with watchdog(proc, 600.0):
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(line_start):
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.send_signal(sig)
                break
        lines.extend(proc.stdout)
        proc.wait()
    return lines


def test_resume_exact_after_sigterm_and_sigkill_and_refuses_another_base(runs, tmp_path):
    from lov15_megatron.checkpoint_dir import LATEST
    from lov15_megatron.config import config_to_yaml

    root, single, _ = runs
    save = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(_cfg(root, [*RESUME_RUN, f"checkpoint.save={save}"])))

    # 1. SIGTERM during the run: the trainer saves the iteration it is in and stops (exit 0).
    proc = _cli(config)
    log = "".join(_run_until(proc, "iter 2/", signal.SIGTERM))
    assert proc.returncode == 0 and "SIGTERM received" in log, log[-2000:]
    stopped = int((save / LATEST).read_text())
    assert 2 <= stopped <= 5, stopped

    # 2. Resumed, then SIGKILLed (no handler runs) after a later iteration.
    proc = _cli(config)
    log = "".join(_run_until(proc, f"iter {stopped + 2}/", signal.SIGKILL))
    assert proc.returncode == -signal.SIGKILL, log[-2000:]
    assert f"resumed from {save} at iteration {stopped}" in log, log[-2000:]
    assert "LoRA base weights from" in log and "LoRA adapters on rank 0: 8 layers" in log

    # 3. The adapters onto another base: one error line (after the library warnings any run
    # prints while building the model and loading the base), no traceback, exit 2.
    proc = _cli(config, f"checkpoint.pretrained={root / 'mc_b'}", stderr=subprocess.PIPE)
    with watchdog(proc, 600.0):
        _, stderr = proc.communicate()
    assert proc.returncode == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in stderr and errors == stderr.splitlines()[-1:], stderr[-2000:]
    assert errors[0].startswith(f"config error: the adapters in {save} "), errors
    assert "holds other weights" in errors[0]

    # 4. Resumed to the end: bit-identical to the uninterrupted run.
    proc = _cli(config)
    with watchdog(proc, 600.0):
        out, err = proc.communicate()
    assert proc.returncode == 0, (out + err)[-2000:]
    assert int((save / LATEST).read_text()) == 8
    summary = json.loads((save / "train_summary.json").read_text())
    assert summary["last_loss"] == single["straight"]["losses"][-1]
    straight, resumed = _read_checkpoint(root / "straight"), _read_checkpoint(save)
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert different == [], different  # adapters and their Adam state


# ----------------------------------------------------------------------------- config errors


def test_config_errors_are_one_line():
    from lov15_megatron.config import ConfigError, load_config

    lm = ["checkpoint.pretrained=/base"]
    moe = ["model.language.num_experts=4", "model.language.moe_ffn_hidden_size=32"]
    cases = {
        "peft={type: qlora}": "peft.type: 'qlora' is not allowed",
        "peft={rank: 0}": "peft.rank=0 must be >= 1",
        "peft={dropout: 1.0}": "peft.dropout=1.0 must be in [0, 1)",
        "peft={target_modules: [q_proj]}": "peft.target_modules has unknown name(s) ['q_proj']",
        "peft={towers: [text]}": "peft.towers has unknown name(s) ['text']",
        "peft={towers: [vision]}": "peft.towers names ['vision'], but this is a language-only",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            load_config("configs/tiny_gpt.yaml", [override, *lm])
    with pytest.raises(ConfigError, match=r"^train.trainable=\['language'\] and peft are both"):
        load_config("configs/tiny_gpt.yaml", [PEFT, "train.trainable=[language]", *lm])
    with pytest.raises(ConfigError, match=r"^peft adapts a base model: set checkpoint.pretrained"):
        load_config("configs/tiny_gpt.yaml", [PEFT])
    with pytest.raises(ConfigError, match=r"language model's MLPs are experts"):
        load_config("configs/tiny_gpt.yaml", [PEFT, *moe, *lm])
    attention_only = "peft={target_modules: [linear_qkv, linear_proj]}"
    assert load_config("configs/tiny_gpt.yaml", [attention_only, *moe, *lm]).peft is not None

    # Through the trainer's command line: exit 2, one line on stderr, nothing else.
    res = subprocess.run(
        [sys.executable, "-m", "lov15_megatron.train", "--config", "configs/tiny_gpt.yaml",
         "runtime.device=cpu", "peft={rank: 4, towers: [merger]}", *lm],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.splitlines() == [
        "config error: peft.towers names ['merger'], but this is a language-only model "
        "(model.vision is null)"
    ]


# ----------------------------------------------------------------------------- the export

HF_ADAPTED = sorted(
    f"model.layers.{i}.{module}.weight"
    for i in range(2)
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
)  # fmt: skip


def test_export_merged_and_peft_adapter_agree_and_only_adapted_weights_change(runs, tmp_path):
    """``mcore-to-hf`` of the 8-step LoRA run: the merged export differs from the base it was
    converted from in exactly the 14 adapted HF matrices, each by a rank-≤4 change, and
    ``peft.PeftModel.from_pretrained(base, --adapter-dir)`` computes the merged model's logits."""
    import peft
    from helpers import ok, read_safetensors
    from transformers import AutoModelForCausalLM

    root, _, _ = runs
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    out = ok("mcore-to-hf", "--model", "qwen3", "--load-dir", str(root / "straight"),
             "--save-dir", str(merged_dir), "--adapter-dir", str(adapter_dir),
             "--hf-template", str(root / "hf_a"))  # fmt: skip
    assert f"peft-adapter: wrote {2 * len(HF_ADAPTED)} tensors" in out, out

    # Tensor by tensor: only the adapted matrices changed, each by a change of rank <= r = 4.
    base, merged = read_safetensors(root / "hf_a"), read_safetensors(merged_dir)
    assert merged.keys() == base.keys()
    assert sorted(k for k in base if not torch.equal(base[k], merged[k])) == HF_ADAPTED
    for name in HF_ADAPTED:
        sv = torch.linalg.svdvals(merged[name].double() - base[name].double())
        # The fp32 rounding of W + ΔW (≤ 2^-24·|W + ΔW| per element) bounds the spectral norm
        # of what is not ΔW by √(m·n)·2^-24·max|W + ΔW| (ΔW's own fp32 rounding, relative to
        # the far smaller |ΔW|, adds less; measured: σ_5 ≈ 1e-7 against a bound ≈ 3e-6).
        noise = merged[name].numel() ** 0.5 * 2**-24 * float(merged[name].abs().max())
        assert float(sv[4]) <= noise < 1e-3 * float(sv[0]), (name, sv[:6], noise)

    # The PEFT adapter on the base equals the merged export (fp32; the MLP's 96-long sums).
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    models = {
        "peft": peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(root / "hf_a", dtype=torch.float32), adapter_dir
        ),
        "merged": AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32),
        "base": AutoModelForCausalLM.from_pretrained(root / "hf_a", dtype=torch.float32),
    }
    logits = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits.float()
    assert_close_fp32(logits["peft"], logits["merged"], FORWARD_REDUCTION_LEN)
    shift = float((logits["merged"] - logits["base"]).abs().max())
    assert shift > 100 * fp32_abs_tol(FORWARD_REDUCTION_LEN, float(logits["peft"].abs().max()))


def test_lora_export_errors_are_one_line(runs, tmp_path):
    """Another base (its fingerprint differs: refused after reading it, nothing left behind), a
    base that is gone, and LoRA-only flags on a full checkpoint: exit 2, one line."""
    from helpers import cli

    root, _, _ = runs

    def refused(*args: str) -> str:
        out = cli("mcore-to-hf", "--model", "qwen3", "--save-dir", str(tmp_path / "hf"), *args)
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("*.tmp"))
        return lines[0]

    line = refused("--load-dir", str(root / "straight"), "--base-dir", str(root / "mc_b"))
    assert f"the base {root / 'mc_b'} holds other weights than the adapters" in line, line
    line = refused("--load-dir", str(root / "mc_a"), "--adapter-dir", str(tmp_path / "adapter"))
    assert line == f"error: --adapter-dir: {root / 'mc_a'} is not a LoRA checkpoint"

    fake = tmp_path / "lora" / "iter_0000004"  # names a base that is not there
    fake.mkdir(parents=True)
    (tmp_path / "lora" / "latest_checkpointed_iteration.txt").write_text("4")
    meta = {"model": "qwen3", "model_config": {}, "peft": {"type": "lora", "base": {"path": "B"}}}
    (fake / "lov15_model.json").write_text(json.dumps(meta))
    line = refused("--load-dir", str(tmp_path / "lora"))
    assert "the base B that" in line and "pass its new place with --base-dir" in line, line

"""Qwen3 HF ⇄ Megatron conversion through the real CLI, checked against transformers' Qwen3.

Tiny random ``Qwen3ForCausalLM`` checkpoints (tied and untied embeddings, vocab 250 so that
Megatron pads it) are converted with ``tools/convert_checkpoint.py``; ``verify`` runs the
Megatron model at TP=1, PP=2 and TP=2×PP=2 (untied) and TP=2 (tied) against the HF model
(fp32, max abs logit difference within ``fp32_abs_tol`` of ``tests/tolerances.py`` at the
largest logit); the round trip back to HF must be bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli, make_hf_qwen3, ok, read_safetensors, verify_layouts
from tolerances import assert_close_fp32, within_fp32
from transformers import Qwen3ForCausalLM

# The longest reduction is the MLP's 96 (hidden 64, sequences ≤ 16): docs/tolerances.md.
REDUCTION_LEN = 96


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    out = {}
    for tied in (False, True):
        name = "tied" if tied else "untied"
        make_hf_qwen3(root / f"hf_{name}", tied)
        line = ok("hf-to-mcore", "--model", "qwen3", "--hf-dir", str(root / f"hf_{name}"),
                  "--save-dir", str(root / f"mc_{name}"), "--tp", "2", "--pp", "2")  # fmt: skip
        assert "hf-to-mcore: wrote" in line
        out[name] = (root / f"hf_{name}", root / f"mc_{name}")
    return root, out


def _verify(hf: Path, mc: Path, tp: int, pp: int, *extra: str) -> dict:
    line = ok("verify", "--model", "qwen3", "--hf-dir", str(hf), "--load-dir", str(mc),
              "--tp", str(tp), "--pp", str(pp), *extra).strip().splitlines()[-1]  # fmt: skip
    return json.loads(line)


VERIFY_LAYOUTS = [(1, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def verified(converted):
    """``verify`` of the untied model at every layout in one launch of ranks."""
    _, models = converted
    return {"untied": verify_layouts("qwen3", *models["untied"], VERIFY_LAYOUTS)}


@pytest.mark.compat
@pytest.mark.parametrize("name,tp,pp", [("untied", tp, pp) for tp, pp in VERIFY_LAYOUTS])
def test_logit_parity_with_transformers(verified, name, tp, pp):
    result = verified[name][tp, pp]
    assert (result["tp"], result["pp"]) == (tp, pp)
    assert result["shape"] == [2, 16, 250]
    assert within_fp32(result["max_abs_diff"], result["max_rel_diff"], REDUCTION_LEN), result
    assert result["top1_agreement"] == 1.0, result


def test_verify_tied_tp2_with_user_inputs_and_dump(converted, tmp_path):
    _, models = converted
    hf_dir, mc_dir = models["tied"]
    ids = torch.tensor([[1, 5, 9, 249, 0, 17, 3]])
    torch.save({"input_ids": ids}, tmp_path / "in.pt")
    result = _verify(hf_dir, mc_dir, 2, 1, "--inputs", str(tmp_path / "in.pt"),
                     "--dump-logits", str(tmp_path / "logits.pt"))  # fmt: skip
    dumped = torch.load(tmp_path / "logits.pt")
    reference = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(ids).logits
    assert dumped.shape == (1, 7, 250) and result["shape"] == [1, 7, 250]
    assert_close_fp32(dumped, reference, REDUCTION_LEN)
    assert within_fp32(result["max_abs_diff"], result["max_rel_diff"], REDUCTION_LEN), result
    assert result["top1_agreement"] == 1.0


@pytest.mark.compat
@pytest.mark.parametrize("name", ["untied", "tied"])
def test_round_trip_is_bit_exact(converted, name, tmp_path):
    _, models = converted
    hf_dir, mc_dir = models[name]
    back = tmp_path / "back"
    # a tiny shard limit forces several shards and an index
    ok("mcore-to-hf", "--model", "qwen3", "--load-dir", str(mc_dir), "--save-dir", str(back),
       "--hf-template", str(hf_dir), "--max-shard-gb", "0.00005")  # fmt: skip
    original, exported = read_safetensors(hf_dir), read_safetensors(back)
    assert (back / "model.safetensors.index.json").exists()
    if name == "tied":  # an existing export is not replaced without --overwrite
        again = ["mcore-to-hf", "--model", "qwen3", "--load-dir", str(mc_dir), "--save-dir",
                 str(back), "--hf-template", str(hf_dir)]  # fmt: skip
        err = _fails(*again)
        assert f"--save-dir {back} exists and is not empty" in err and "--overwrite" in err
        assert read_safetensors(back).keys() == exported.keys()
        ok(*again, "--overwrite")
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    assert (back / "tokenizer_config.json").read_text() == (
        hf_dir / "tokenizer_config.json"
    ).read_text()
    assert not list(tmp_path.glob("*.tmp"))
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is (name == "tied")
    reloaded = Qwen3ForCausalLM.from_pretrained(back, dtype=torch.float32)
    reference = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.arange(12).view(1, 12)
    assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def _fails(*args: str) -> str:
    out = cli(*args)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    return out.stderr


def _conversion_errors(cases: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Runs in one rank: convert each (hf_dir, save_dir) case; return each error message."""
    from lov15_megatron.convert import core
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed

    distributed.initialize(core.converter_runtime_config())
    errors = {}
    for name, (hf_dir, save_dir) in cases.items():
        try:
            core.hf_to_mcore(get_family("qwen3"), hf_dir, save_dir)
            errors[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def test_bad_inputs_are_named(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from lov15_megatron.runtime.launch import run_ranks

    hf = tmp_path / "hf"
    make_hf_qwen3(hf, tied=False)
    weights = load_file(hf / "model.safetensors")

    def variant(name: str, tensors: dict, **config_changes) -> str:
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        config = {**json.loads((hf / "config.json").read_text()), **config_changes}
        (d / "config.json").write_text(json.dumps(config))
        return str(d)

    bad_shape = {**weights, "model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)}
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output's parent should be")
    cases = {
        "missing": variant(
            "missing", {k: v for k, v in weights.items() if "1.mlp.up_proj" not in k}
        ),
        "extra": variant(
            "extra", {**weights, "model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}
        ),
        "shape": variant("shape", bad_shape),
        "config": variant("config", weights, intermediate_size=128),
        "head": variant("head", weights, tie_word_embeddings=True),
        "truncated": variant("truncated", weights),
    }
    shard = Path(cases["truncated"]) / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5])  # an interrupted download
    outputs = {name: str(tmp_path / f"out_{name}") for name in cases}
    outputs["unwritable"] = str(blocker / "out")
    jobs = {name: (hf_dir, outputs[name]) for name, hf_dir in cases.items()}
    jobs["unwritable"] = (str(hf), outputs["unwritable"])
    (errors,) = run_ranks(1, _conversion_errors, jobs)

    assert (
        "model.layers.1.mlp.up_proj.weight" in errors["missing"] and "missing" in errors["missing"]
    )
    assert "unexpected" in errors["extra"] and "self_attn.rotary.inv_freq" in errors["extra"]
    assert all(s in errors["shape"] for s in ("self_attn.o_proj.weight", "(64, 32)", "(64, 64)"))
    assert "gate_proj.weight" in errors["config"] and "intermediate_size=128" in errors["config"]
    assert "'lm_head.weight' differs" in errors["head"]
    assert errors["truncated"].startswith(f"ConversionError: {shard}: not a readable safetensors")
    assert "cannot write" in errors["unwritable"] and outputs["unwritable"] in errors["unwritable"]
    for name, out in outputs.items():  # nothing left behind that looks like output
        assert not Path(out).exists() and not Path(out + ".tmp").exists(), name

    # the CLI turns them into one line on stderr and exit code 2
    err = _fails("hf-to-mcore", "--model", "qwen3", "--hf-dir", str(hf), "--save-dir",
                 str(tmp_path / "tp4"), "--tp", "4")  # fmt: skip
    assert "num_query_groups=2" in err and "tensor_model_parallel_size=4" in err
    assert not (tmp_path / "tp4").exists()
    err = _fails("mcore-to-hf", "--model", "qwen3", "--load-dir", str(hf), "--save-dir",
                 str(tmp_path / "x"))  # fmt: skip
    assert "lov15_model.json" in err and not (tmp_path / "x").exists()
    # verify checks the layout and the HF directory before any rank starts
    ok("hf-to-mcore", "--model", "qwen3", "--hf-dir", str(hf), "--save-dir", str(tmp_path / "mc"))
    err = _fails("verify", "--model", "qwen3", "--hf-dir", str(hf), "--load-dir",
                 str(tmp_path / "mc"), "--tp", "3")  # fmt: skip
    assert "tensor_model_parallel_size=3 does not divide" in err
    err = _fails("verify", "--model", "qwen3", "--hf-dir", str(tmp_path / "truncated"),
                 "--load-dir", str(tmp_path / "mc"))  # fmt: skip
    assert "not a readable safetensors file" in err
    # --layouts: a bad spelling, and --dump-logits with several layouts (in process: main)
    from lov15_megatron.cli.convert_checkpoint import main

    verify = ["verify", "--model", "qwen3", "--hf-dir", str(hf), "--load-dir", str(tmp_path / "mc")]
    capsys.readouterr()  # what came before (progress bars)
    for extra, message in [
        (["--layouts", "2x1", "2by1"], "--layouts: layout '2by1': expected TPxPP or TPxPPxEP"),
        (["--layouts", "1x1", "2x1", "--dump-logits", str(tmp_path / "l.pt")],
         "--dump-logits takes one layout, got 2"),
    ]:  # fmt: skip
        assert main([*verify, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "l.pt").exists()

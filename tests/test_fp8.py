"""fp8 training: the plan refuses it where it cannot run (CPU, pre-Ada/pre-Hopper GPUs, no torchao, fp32) with the
reason, and on a capable (faked) machine the conversion swaps exactly the block linears whose dims divide by 16.
The swapped model trains on this CPU (torch._scaled_mm has a CPU kernel) and its checkpoint loads into a model
without fp8."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_env
from helpers import _pkg
from plans import cpu_plan

from ghostvis_core.backends import RunFacts, plan_run
from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.gpt import GPT
from ghostvis_core.plan_banner import format_banner


def _with_torchao(env, version: str | None = "0.18.0"):
    return dataclasses.replace(env, packages={**env.packages, "torchao": _pkg("torchao", version)})


def _facts(fp8: str, dtype: str = "bfloat16", device: str = "cuda", **kw) -> RunFacts:
    return RunFacts(device, dtype, compiled=True, fp8=fp8, **kw)


@pytest.mark.parametrize(
    ("profile", "fp8", "device", "dtype", "torchao", "message"),
    [
        ("cpu", "tensorwise", "cpu", "float32", "0.18.0", "this run is on the CPU"),
        ("cpu", "rowwise", "cpu", "bfloat16", "0.18.0", "this run is on the CPU"),
        ("a100", "tensorwise", "cuda", "bfloat16", "0.18.0", "needs a GPU of sm89 \\(Ada\\) or newer; this is sm80"),
        ("t4", "tensorwise", "cuda", "bfloat16", "0.18.0", "sm89 \\(Ada\\) or newer; this is sm75"),
        ("v100", "rowwise", "cuda", "bfloat16", "0.18.0", "sm90 \\(Hopper\\) or newer; this is sm70"),
        ("rtx4090", "rowwise", "cuda", "bfloat16", "0.18.0", "fp8 rowwise needs a GPU of sm90 \\(Hopper\\)"),
        ("h100", "tensorwise", "cuda", "bfloat16", None, "torchao is not installed"),
        ("h100", "tensorwise", "cuda", "float32", "0.18.0", "runs under bf16 autocast, not float32"),
    ],
)
def test_fp8_is_refused_with_the_reason(profile, fp8, device, dtype, torchao, message):
    env = _with_torchao(make_env(profile), torchao)
    with pytest.raises(BackendUnavailableError, match=f"fp8={fp8} was requested but cannot run here: .*{message}"):
        plan_run(env, _facts(fp8, dtype, device))


def test_fp8_off_by_default_and_on_where_it_can_run():
    env = _with_torchao(make_env("h100"))
    assert plan_run(env, RunFacts("cuda", "bfloat16")).fp8.backend == "none"
    assert "fp8" not in format_banner(plan_run(env, RunFacts("cuda", "bfloat16")))
    plan = plan_run(env, _facts("tensorwise"))
    assert plan.fp8.backend == "tensorwise" and plan.fp8.label == "torchao 0.18.0 float8 tensorwise"
    assert "embedding, lm_head" in plan.fp8.reason
    assert "fp8: torchao 0.18.0 float8 tensorwise (requested;" in format_banner(plan)
    assert plan_run(env, _facts("rowwise")).fp8.backend == "rowwise"
    ada = plan_run(_with_torchao(make_env("rtx4090")), _facts("tensorwise"))  # sm89 has float8 tensor cores
    assert ada.fp8.backend == "tensorwise"
    fsdp = plan_run(env, _facts("tensorwise", world_size=2, fsdp=True))
    assert "all-gathers the weights in float8" in fsdp.fp8.reason
    with pytest.raises(ConfigError, match="fp8='e4m3'"):
        RunFacts("cuda", "bfloat16", fp8="e4m3")


def test_train_config_refuses_an_unknown_fp8_recipe():
    from ghostvis_core.train.config import TrainConfig

    with pytest.raises(ConfigError, match="fp8='fp8': expected one of none, tensorwise, rowwise"):
        TrainConfig(fp8="fp8")
    assert TrainConfig().apply_overrides(["fp8=rowwise"]).fp8 == "rowwise"


def _tiny(mlp_hidden: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=64, sequence_len=16,
                    mlp_hidden=mlp_hidden)
    return GPT(cfg, cpu_plan(cfg))


def _capable_choice():
    return plan_run(_with_torchao(make_env("h100")), _facts("tensorwise")).fp8


def test_selection_takes_block_linears_with_dims_divisible_by_16():
    from ghostvis_core.fp8 import select_fp8_linears

    converted, skipped = select_fp8_linears(_tiny())
    assert len(converted) == 14 and skipped == []  # 7 per block: q, k, v (16 wide), o, gate, up, down
    assert not any("lm_head" in n or "embed" in n for n in converted)
    converted, skipped = select_fp8_linears(_tiny(mlp_hidden=40))  # 40 % 16 = 8: the MLP stays bf16
    assert len(converted) == 8 and sorted(skipped) == sorted(
        f"model.layers.{i}.mlp.{name}_proj" for i in range(2) for name in ("gate", "up", "down"))


def test_conversion_swaps_those_linears_trains_and_saves_plain_weights(tmp_path):
    pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install torchao==0.18.0)")
    from safetensors.torch import load_file, save_file
    from torchao.float8.float8_linear import Float8Linear

    from ghostvis_core.fp8 import convert_to_fp8, describe_fp8

    model, plain = _tiny(mlp_hidden=40), _tiny(mlp_hidden=40)
    keys_before = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    assert describe_fp8(model, _capable_choice()).startswith(
        "fp8: torchao 0.18.0 float8 tensorwise on 8 block linears; 6 skipped")
    converted = convert_to_fp8(model, _capable_choice())
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert swapped == sorted(converted) and len(swapped) == 8
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys_before  # fp32, same keys

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, torch.roll(ids, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(ids, torch.roll(ids, -1, dims=1)).item()
    print(f"fp8 losses {losses}; bf16 first loss {ref:.4f}")
    assert abs(losses[0] - ref) / ref < 0.02  # same init: float8 GEMMs only round differently
    assert losses[-1] < losses[0]
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.grad is None and q.dtype == torch.float32

    save_file(model.state_dict(), tmp_path / "model.safetensors")
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)  # no fp8 in this model
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        fp8_logits, bf16_logits = model(ids), plain(ids)
    assert fp8_logits.shape == bf16_logits.shape and torch.isfinite(bf16_logits).all()


def test_none_converts_nothing():
    from ghostvis_core.fp8 import convert_to_fp8

    model = _tiny()
    assert convert_to_fp8(model, cpu_plan(model.config).fp8) == []
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="torchrun with gloo")
def test_fp8_under_fsdp2_trains_and_checkpoints_plain_weights(tmp_path):
    """2 gloo ranks: fp8 linears with float8 all-gather under FSDP2 and the sharded Muon train, and the gathered
    checkpoint is plain fp32 tensors that load into a model without fp8."""
    pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install torchao==0.18.0)")
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    out = tmp_path / "fsdp_fp8.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tests.parent}:{tests}"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tests / "fp8_fsdp_ranks.py"), str(out)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert "all-gathers the weights in float8" in got["all_gather"]
    assert got["losses"][1] < got["losses"][0]
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in got["state"].values())
    _tiny().load_state_dict(got["state"], strict=True)

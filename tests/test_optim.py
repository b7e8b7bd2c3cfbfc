"""Optimizers on CPU: parameter roles, one object over Muon + AdamW, exact state_dict round trip."""

from __future__ import annotations

import logging

import pytest
import torch
from plans import cpu_optimizer, cpu_plan

from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.gpt import GPT
from ghostvis_core.optim import split_params


def tiny(tied: bool = False) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=32,
        vocab_size=50,
        sequence_len=16,
        mlp_hidden=64,
        tie_embeddings=tied,
    )
    return GPT(cfg, cpu_plan(cfg))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, 16), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def train(model, opt, seeds):
    for s in seeds:
        ids, tgt = batch(s)
        model(ids, tgt).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_roles(tied):
    model = tiny(tied)
    parts = split_params(model)
    assert len(parts["matrix"]) == 2 * 7 and all(p.ndim == 2 for p in parts["matrix"])
    assert len(parts["embedding"]) == 1 and len(parts["head"]) == (0 if tied else 1)
    assert len(parts["scalar"]) == 2 * 2 + 1
    n = sum(p.numel() for ps in parts.values() for p in ps)
    assert n == model.num_params()


@pytest.mark.parametrize("backend", ["adamw", "muon"])
def test_state_dict_round_trip_resumes_bitwise(backend, caplog):
    cfg = OptimizerConfig(backend=backend, lr=1e-2, weight_decay=0.1)
    model_a = tiny()
    with caplog.at_level(logging.INFO, logger="ghostvis"):
        opt_a, description = cpu_optimizer(model_a, cfg)
    assert "Using optimizer backend:" in caplog.text and description in caplog.text
    assert ("Muon" in description) == (backend == "muon")
    assert all("initial_lr" in g and g["lr"] == g["initial_lr"] for g in opt_a.param_groups)
    train(model_a, opt_a, [0, 1, 2])
    model_state = {k: v.clone() for k, v in model_a.state_dict().items()}
    opt_state = opt_a.state_dict()
    torch.save(opt_state, buf := __import__("io").BytesIO())
    train(model_a, opt_a, [3, 4])

    model_b = tiny()
    model_b.load_state_dict(model_state)
    opt_b, _ = cpu_optimizer(model_b, cfg)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    train(model_b, opt_b, [3, 4])
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_lr_edits_reach_the_inner_optimizers():
    model = tiny()
    opt, _ = cpu_optimizer(model, OptimizerConfig(backend="muon", lr=1e-3, matrix_lr=2e-2))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "matrix": 2e-2,
        "head": 1e-3,
        "embedding": 1e-3,
        "scalar": 1e-3,
    }
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.clone() for p in model.parameters()]
    train(model, opt, [0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_loading_state_of_another_backend_is_a_clear_error():
    model = tiny()
    adamw, _ = cpu_optimizer(model, OptimizerConfig(backend="adamw"))
    muon, _ = cpu_optimizer(model, OptimizerConfig(backend="muon"))
    with pytest.raises(CheckpointError, match="same optimizer backend"):
        muon.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_muon_with_newton_schulz_matches_torch_muon(impl):
    """With torch.optim.Muon's coefficients, both implementations compute its update (measured: bitwise equal
    on this CPU; 2e-3 allows for batched bf16 GEMMs rounding differently elsewhere)."""
    from ghostvis_core.muon import NEWTON_SCHULZ, BatchedMuon, ReferenceMuon

    torch.manual_seed(0)
    shapes = [(24, 16), (24, 16), (16, 40), (16, 16)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    opt_ours = ReferenceMuon(ours, **kw) if impl == "reference" else BatchedMuon(ours, ns_coefficients=NEWTON_SCHULZ,
                                                                                  **kw)
    opt_ref = torch.optim.Muon(ref, **kw)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ref, ours, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt_ref.step()
        opt_ours.step()
    for p, q in zip(ref, ours, strict=True):
        diff = (p - q).abs().max().item()
        print(f"{impl} vs torch Muon {tuple(p.shape)}: max {diff:.2e}")
        assert diff < 2e-3
    assert opt_ours.state_dict()["state"].keys() == opt_ref.state_dict()["state"].keys()


def test_the_fused_muons_iteration_is_a_setting():
    """optim.muon_coefficients picks the fused Muon's iteration, so it can be compared with the reference's
    Newton-Schulz at equal math; the description says which runs."""
    from ghostvis_core.muon import NEWTON_SCHULZ, POLAR_EXPRESS, BatchedMuon

    model = tiny()
    for name, table, label in (("polar_express", POLAR_EXPRESS, "Polar Express"),
                               ("newton_schulz", NEWTON_SCHULZ, "Newton-Schulz")):  # fmt: skip
        opt, desc = cpu_optimizer(model, OptimizerConfig(backend="muon", muon_coefficients=name))
        (muon,) = [o for o in opt.optimizers if isinstance(o, BatchedMuon)]
        assert all(g["ns_coefficients"] == table for g in muon.param_groups)
        assert f"Muon ({label} per shape" in desc
    with pytest.raises(ConfigError, match="muon_coefficients"):
        OptimizerConfig(backend="muon", muon_coefficients="quintic")

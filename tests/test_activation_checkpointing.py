"""Activation checkpointing: the plan's choice, which blocks recompute, and bitwise-equal gradients to none
(fp32 CPU: the recomputed forward runs the same kernels on the same inputs)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_env

from ghostvis_core.backends import RunFacts, plan_run
from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import ConfigError
from ghostvis_core.gpt import GPT, checkpointed_layers
from ghostvis_core.plan_banner import format_banner

CFG = GPTConfig(n_layer=3, n_head=2, n_kv_head=1, n_embd=32, vocab_size=64, sequence_len=16, mlp_hidden=64)


def _plan(mode: str):
    return plan_run(make_env("cpu"), RunFacts("cpu", "float32", activation_checkpointing=mode))


def test_which_blocks_recompute():
    assert checkpointed_layers("none", 4) == frozenset()
    assert checkpointed_layers("full", 4) == {0, 1, 2, 3}
    assert checkpointed_layers("selective", 5) == {0, 2, 4}
    plan = _plan("selective")
    assert plan.activation_checkpointing.backend == "selective"
    assert "Activation checkpointing: every other block" in format_banner(plan)
    assert "Activation checkpointing" not in format_banner(_plan("none"))
    with pytest.raises(ConfigError, match="activation_checkpointing='some'"):
        RunFacts("cpu", "float32", activation_checkpointing="some")


def _grads(mode: str, packed: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = GPT(CFG, _plan(mode))
    with torch.no_grad():  # non-zero residual projections, so every block's gradient is non-trivial
        for block in model.model.layers:
            block.self_attn.o_proj.weight.normal_(0, 0.05)
            block.mlp.down_proj.weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(6)])[None].expand(2, 16) if packed else None
    calls = [0]
    for block in model.model.layers:  # count MLP forwards (module hooks do not fire in the recomputation)
        def counted(x, forward=block.mlp.forward):
            calls[0] += 1
            return forward(x)

        block.mlp.forward = counted
    loss = model(ids, torch.roll(ids, -1, dims=1), pos)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls[0]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradients_are_bitwise_equal_to_no_checkpointing(mode, packed):
    loss_ref, ref, calls_ref = _grads("none", packed)
    loss, got, calls = _grads(mode, packed)
    assert loss == loss_ref
    assert calls_ref == 3 and calls == 3 + len(checkpointed_layers(mode, 3))  # recomputed blocks run twice
    for name, g in ref.items():
        assert torch.equal(got[name], g), name
    assert all(g.abs().sum() > 0 for n, g in ref.items() if "layers" in n)


def test_no_recompute_without_grad():
    torch.manual_seed(0)
    model = GPT(CFG, _plan("full"))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        logits = model(ids)
    torch.manual_seed(0)
    assert torch.equal(logits, GPT(CFG, _plan("none"))(ids).detach())

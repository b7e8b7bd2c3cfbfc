"""The training-speed features on a CUDA GPU (run with `pytest -m gpu`): the compiled Muon against eager, fp8
block linears (torchao) compiled, activation checkpointing over compiled blocks."""

from __future__ import annotations

import pytest
import torch

from ghostvis_core.backends import RunFacts, plan_run
from ghostvis_core.config import GPTConfig
from ghostvis_core.env import probe_env
from ghostvis_core.gpt import GPT
from ghostvis_core.muon import BatchedMuon

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CFG = GPTConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=256, vocab_size=1024, sequence_len=256)


def _plan(**kw):
    return plan_run(probe_env(), RunFacts("cuda", "bfloat16", compiled=True, **kw))


def test_compiled_muon_matches_eager_on_cuda():
    torch.manual_seed(0)
    shapes = [(256, 256)] * 4 + [(768, 256)] * 2 + [(256, 768)] * 2
    start = [torch.randn(s, device="cuda") for s in shapes]

    def run(compile: bool):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = BatchedMuon(params, lr=0.02, weight_decay=0.1, compile=compile)
        for step in range(3):
            g = torch.Generator(device="cuda").manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        return params

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=0)


def _model(plan) -> GPT:
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = GPT(CFG, plan)
    with torch.no_grad():
        for block in m.model.layers:
            block.self_attn.o_proj.weight.normal_(0, 0.02)
            block.mlp.down_proj.weight.normal_(0, 0.02)
    return m


def _loss_and_grads(m: GPT, ids: torch.Tensor):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(ids, torch.roll(ids, -1, 1))
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in m.named_parameters()}


def test_fp8_compiled_trains_close_to_bf16():
    pytest.importorskip("torchao.float8", reason="torchao is not installed")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm89+")
    from torchao.float8.float8_linear import Float8Linear

    from ghostvis_core.fp8 import convert_to_fp8

    ids = torch.randint(0, CFG.vocab_size, (4, 256), device="cuda")
    ref = _model(_plan())
    ref.compile_blocks(dynamic=False)
    fp8_plan = _plan(fp8="tensorwise")
    m = _model(fp8_plan)
    assert len(convert_to_fp8(m, fp8_plan.fp8)) == 14
    m.compile_blocks(dynamic=False)
    loss_ref, _ = _loss_and_grads(ref, ids)
    loss, grads = _loss_and_grads(m, ids)
    print(f"bf16 {loss_ref:.4f} fp8 {loss:.4f}")
    assert abs(loss - loss_ref) / loss_ref < 0.02
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(isinstance(x, Float8Linear) for x in m.modules()) == 14
    assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # checkpoints keep the param dtype


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_over_compiled_blocks(mode):
    ids = torch.randint(0, CFG.vocab_size, (4, 256), device="cuda")
    ref = _model(_plan())
    ref.compile_blocks(dynamic=False)
    m = _model(_plan(activation_checkpointing=mode))
    m.compile_blocks(dynamic=False)
    torch.cuda.reset_peak_memory_stats()
    loss_ref, g_ref = _loss_and_grads(ref, ids)
    loss, g = _loss_and_grads(m, ids)
    assert loss == pytest.approx(loss_ref, rel=1e-3)
    for name, a in g_ref.items():
        torch.testing.assert_close(g[name], a, atol=2e-3, rtol=2e-2, msg=name)

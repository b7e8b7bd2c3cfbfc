"""GPT on a CUDA GPU with the plan's backends, bf16 autocast (run with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
from plans import cpu_plan, device_plan

from ghostvis_core.config import GPTConfig
from ghostvis_core.gpt import GPT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

V = 1000


def model(compiled: bool = False, **kw) -> GPT:
    """A bf16-autocast CUDA model (the plan made for bf16, eager or compiled) with random weights."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, vocab_size=V, sequence_len=256, **kw)
    with torch.device("cuda"):
        m = GPT(cfg, device_plan(cfg, "cuda", "bfloat16", compiled=compiled))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.05)
    return m


def test_cuda_loss_matches_fp32_cpu_model():
    m = model()
    ids = torch.randint(0, V, (2, 256), device="cuda")
    tgt = torch.roll(ids, -1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(ids, tgt)
    loss.backward()
    cpu = GPT(m.config, cpu_plan(m.config))
    cpu.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    ref = cpu(ids.cpu(), tgt.cpu())
    print(
        f"cuda bf16 loss {loss.item():.5f} vs cpu fp32 {ref.item():.5f}; plan {m.plan.attention['dense'].label}"
    )
    assert abs(loss.item() - ref.item()) < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_packed_equals_separate_on_cuda():
    m = model()
    ids = torch.randint(0, V, (1, 256), device="cuda")
    pos = torch.cat([torch.arange(100), torch.arange(156)]).cuda()[None]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = m(ids, position_ids=pos)
        a = m(ids[:, :100])
        b = m(ids[:, 100:])
    diff = (packed - torch.cat([a, b], 1)).abs().max().item()
    print(f"packed vs separate ({m.plan.attention['packed'].label}): max {diff:.3e}")
    assert diff < 5e-2


def test_kv_cache_decode_matches_full_forward_on_cuda():
    m = model().eval()
    ids = torch.randint(0, V, (2, 40), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = m(ids)
        cache = m.new_kv_cache(2, 64)
        pre = m.forward_with_cache(ids[:, :32], cache)
        steps = [m.forward_with_cache(ids[:, i : i + 1], cache) for i in range(32, 40)]
        out = m.generate(ids[:, :8], 16)
    got = torch.cat([pre, *steps], 1)
    diff = (got - full).abs().max().item()
    print(f"kv-cache decode ({m.plan.attention['decode'].label}) vs full: max {diff:.3e}")
    assert diff < 5e-2 and out.shape == (2, 24)


def test_compiled_blocks_match_eager():
    m = model()
    c = model(compiled=True).compile_blocks(dynamic=False)
    c.load_state_dict(m.state_dict())
    ids = torch.randint(0, V, (2, 256), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = m(ids, torch.roll(ids, -1, 1))
        compiled = c(ids, torch.roll(ids, -1, 1))
    print(f"compiled {compiled.item():.5f} eager {eager.item():.5f}")
    assert abs(compiled.item() - eager.item()) < 1e-2

"""Inference's fused projections (GPT.fuse_projections_): one q|k|v and one gate|up GEMM per layer give the
unfused model's logits (float64, 1e-12), keep the state dict (names, shapes, no extra storage), and the loader
(engine.cast_parameters_) applies them."""

from __future__ import annotations

import copy

import torch
from test_gpt import V, randomized, tiny_config

from ghostvis_core.batch_engine import Engine
from ghostvis_core.engine import cast_parameters_
from ghostvis_core.sampling import SamplingParams


def _pair(dtype=torch.float64):
    plain = randomized(tiny_config(n_head=4, n_kv_head=2), seed=3).to(dtype).eval()  # GQA: q and k/v differ
    return plain, copy.deepcopy(plain).fuse_projections_()


def test_fused_logits_equal_unfused_in_float64_full_forward_and_with_cache():
    plain, fused = _pair()
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), rtol=0, atol=1e-12)
        caches = [m.new_kv_cache(3, 16) for m in (plain, fused)]
        a, b = (m.forward_with_cache(ids, c) for m, c in zip((plain, fused), caches, strict=True))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
        step = ids[:, -1:]
        a, b = (m.forward_with_cache(step, c) for m, c in zip((plain, fused), caches, strict=True))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_fused_weights_are_the_parameters_themselves():
    plain, fused = _pair()
    assert list(fused.state_dict()) == list(plain.state_dict())  # HF names, nothing added
    for name, p in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], p), name
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    base = attn.qkv_weight.untyped_storage().data_ptr()
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == base  # views: no second copy of the weights
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    assert attn.qkv_weight.shape == (4 * 16 + 2 * 2 * 16, 64) and mlp.gate_up_weight.shape == (2 * 96, 64)
    with torch.no_grad():  # loading new weights into the parameters updates the fused GEMM's weight too
        fused.model.layers[0].self_attn.k_proj.weight.fill_(0.5)
    assert torch.all(attn.qkv_weight[64:96] == 0.5) and not torch.all(attn.qkv_weight[:64] == 0.5)


def test_loader_fuses_and_the_engine_answers_as_the_unfused_model():
    plain = randomized(tiny_config(sequence_len=48), seed=5).eval()
    served = cast_parameters_(copy.deepcopy(plain), "float32")
    assert all(b.self_attn.qkv_weight is not None and b.mlp.gate_up_weight is not None
               for b in served.model.layers)  # fmt: skip
    prompts = [[1, 5, 7], [2, 3, 4, 5, 6, 7, 8], [9]]
    want = [c.token_ids for c in Engine(plain).generate_many(prompts, SamplingParams(), 12, batch_size=2)]
    got = [c.token_ids for c in Engine(served).generate_many(prompts, SamplingParams(), 12, batch_size=2)]
    assert got == want

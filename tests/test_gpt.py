"""GPT on CPU: HF Llama parity, packed documents, loss semantics, KV cache, overfitting, configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plans import cpu_gpt, cpu_optimizer, cpu_plan

from ghostvis_core import gpt as gpt_mod
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.gpt import GPT
from ghostvis_core.model_configs import PRESETS, get_config, get_preset, get_vlm_small_config

V = 97  # odd vocab: no accidental power-of-two alignment


def tiny_config(**kw) -> GPTConfig:
    fields = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=V, sequence_len=64, mlp_hidden=96)
    fields.update(kw)
    return GPTConfig(**fields)


def randomized(config: GPTConfig, seed: int = 0) -> GPT:
    """A model with every weight random (init_weights zeroes output projections, which would hide bugs)."""
    torch.manual_seed(seed)
    model = GPT(config, cpu_plan(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


# ---------------------------------------------------------------------------------------------------------
# HF Llama parity: pins RoPE (rotate-half), GQA, RMSNorm and SwiGLU conventions and the key names.


@pytest.mark.parametrize("tied,n_kv_head", [(False, 4), (True, 2), (False, 1)])
def test_logits_match_transformers_llama(tied, n_kv_head):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_config(n_kv_head=n_kv_head, tie_embeddings=tied, rope_theta=500.0)
    ours = randomized(cfg).eval()
    hf_cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.sequence_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=tied,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.config._attn_implementation = "eager"
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 37))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    diff = (got - ref).abs()
    print(f"HF parity tied={tied} kv={n_kv_head}: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert got.dtype == torch.float32 and got.shape == (2, 37, V)
    assert diff.max() < 1e-5


def test_state_dict_keys_are_hf_llama_keys():
    keys = set(cpu_gpt(tiny_config(n_layer=1)).state_dict())
    assert keys == {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    }


# ---------------------------------------------------------------------------------------------------------
# Packed documents


def test_packed_documents_equal_separate_runs():
    model = randomized(tiny_config())
    torch.manual_seed(2)
    lengths = [[9, 14, 1], [24]]
    ids = torch.randint(0, V, (2, 24))
    tgt = torch.randint(0, V, (2, 24))
    tgt[0, 3] = -100
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = model(ids, position_ids=pos)
        packed_loss = model(ids, tgt, position_ids=pos, loss_reduction="sum")
        sep_loss = torch.zeros(())
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                sep = model(ids[b : b + 1, start : start + n])
                diff = (packed[b, start : start + n] - sep[0]).abs().max()
                assert diff < 1e-5, f"row {b} doc at {start}: {diff}"
                sep_loss += model(
                    ids[b : b + 1, start : start + n], tgt[b : b + 1, start : start + n], loss_reduction="sum"
                )
                start += n
        # dense attention over the same packed row would leak across documents: the test must see it
        leaky = model(ids)
    assert (leaky[0, 9:23] - packed[0, 9:23]).abs().max() > 1e-3
    print(f"packed loss {packed_loss.item():.6f} vs separate {sep_loss.item():.6f}")
    torch.testing.assert_close(packed_loss, sep_loss, atol=1e-4, rtol=1e-5)


def test_position_ids_of_one_document_match_dense():
    model = randomized(tiny_config())
    ids = torch.randint(0, V, (2, 20))
    pos = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=pos), model(ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Loss


def test_loss_matches_fp32_cross_entropy_across_chunks(monkeypatch):
    from ghostvis_core import linear_cross_entropy as ce_mod

    monkeypatch.setattr(ce_mod, "CE_CHUNK_ROWS", 7)  # 2 x 20 rows -> 6 chunks, last one partial
    model = randomized(tiny_config(tie_embeddings=True))
    ids = torch.randint(0, V, (2, 20))
    tgt = torch.randint(0, V, (2, 20))
    tgt[:, :5] = -100
    for reduction in ("mean", "sum"):
        model.zero_grad()
        loss = model(ids, tgt, loss_reduction=reduction)
        loss.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = F.cross_entropy(model(ids).view(-1, V), tgt.view(-1), ignore_index=-100, reduction=reduction)
        ref.backward()
        print(f"{reduction}: loss {loss.item():.6f} ref {ref.item():.6f}")
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_fully_masked_targets_give_zero_loss_not_nan():
    model = randomized(tiny_config())
    ids = torch.randint(0, V, (2, 16))
    loss = model(ids, torch.full_like(ids, -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in model.parameters())
    with torch.no_grad():
        assert model(ids, torch.full_like(ids, -100)).item() == 0.0


def test_bad_loss_reduction_is_a_config_error():
    model = cpu_gpt(tiny_config(n_layer=1))
    ids = torch.randint(0, V, (1, 8))
    with pytest.raises(ConfigError, match="loss_reduction"):
        model(ids, ids, loss_reduction="avg")


# ---------------------------------------------------------------------------------------------------------
# Decode


def test_kv_cache_greedy_equals_recompute():
    model = randomized(tiny_config(), seed=3).eval()
    prompt = torch.randint(0, V, (2, 7))
    cached = model.generate(prompt, 12)
    recomputed = model.generate(prompt, 12, use_cache=False)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, recomputed)


def test_kv_cache_chunked_prefill_matches_full_forward():
    model = randomized(tiny_config(), seed=4).eval()
    ids = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 20)
        a = model.forward_with_cache(ids[:, :6], cache)
        b = model.forward_with_cache(ids[:, 6:11], cache)  # several tokens after a filled prefix
        c = model.forward_with_cache(ids[:, 11:12], cache)
        d = model.forward_with_cache(ids[:, 12:], cache)
    torch.testing.assert_close(torch.cat([a, b, c, d], dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 15


def test_kv_cache_of_a_bf16_training_model_under_autocast_and_without():
    """A training process's model (fp32 parameters, a bf16 plan) decodes with a bf16 cache: under autocast
    (bf16 keys) and without it (fp32 activations cast at the cache, the output cast back)."""
    cfg = tiny_config()
    model = GPT(cfg, cpu_plan(cfg, dtype="bfloat16")).eval()
    ids = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(ids)
            cache = model.new_kv_cache(2, 20)
            steps = [model.forward_with_cache(ids[:, :9], cache)]
            steps += [model.forward_with_cache(ids[:, i : i + 1], cache) for i in range(9, 15)]
            out = model.generate(ids[:, :4], 6)
        assert cache.k.dtype == torch.bfloat16 and out.shape == (2, 10)
        diff = (torch.cat(steps, 1) - full).abs().max().item()
        print(f"autocast bf16: cached vs full max |diff| {diff:.2e}")
        assert diff < 5e-2
        plain = model.new_kv_cache(2, 20)
        y = model.forward_with_cache(ids, plain)
    assert y.dtype == torch.float32 and plain.k.dtype == torch.bfloat16
    assert (y - model(ids)).abs().max().item() < 5e-2


def test_sampling_top_k_stays_in_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    picks = gpt_mod._sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(picks.flatten().tolist()) == {1, 2}


# ---------------------------------------------------------------------------------------------------------
# Training


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = cpu_gpt(tiny_config(n_embd=64, n_head=2, n_kv_head=1, mlp_hidden=128))
    opt, _ = cpu_optimizer(model, OptimizerConfig(backend="adamw", lr=1e-2))
    ids = torch.randint(0, V, (4, 32))
    tgt = torch.roll(ids, -1, dims=1)
    first = None
    for _ in range(60):
        loss = model(ids, tgt)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"overfit: {first:.3f} -> {loss.item():.3f}")
    assert first > 4.0 and loss.item() < 0.5


def test_num_params_and_flops():
    model = cpu_gpt(tiny_config())
    c = model.config
    emb = V * c.n_embd
    per_layer = (
        2 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_kv_head * c.head_dim + 3 * c.n_embd * c.mlp_hidden
    )
    per_layer += 2 * c.n_embd
    total = c.n_layer * per_layer + c.n_embd + 2 * emb
    assert model.num_params() == total
    assert model.num_params(exclude_embedding=True) == total - emb
    matmul = c.n_layer * (per_layer - 2 * c.n_embd) + emb  # the layers' linears and lm_head, no norms
    attn = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    assert model.flops_per_token() == 6 * matmul + attn
    tied = cpu_gpt(tiny_config(tie_embeddings=True))
    assert tied.num_params() == total - emb
    assert tied.flops_per_token() == model.flops_per_token()
    # frozen layers cost what backward still computes: with only the head training, no layer needs a
    # gradient (forward only: 2N, attention's forward) and the head computes its weight gradient, not its
    # input's (4N)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    assert model.flops_per_token() == 2 * (matmul - emb) + 4 * emb + attn / 3
    model.model.embed_tokens.weight.requires_grad_(True)  # now every layer's input needs a gradient
    assert model.flops_per_token() == 4 * (matmul - emb) + 6 * emb + attn


# ---------------------------------------------------------------------------------------------------------
# Backends, configs, presets


def test_explicit_flash_request_on_cpu_raises_one_clear_error():
    with pytest.raises(BackendUnavailableError, match="flash") as info:
        cpu_gpt(tiny_config(attn_backend="flash"))
    message = str(info.value)
    # One line naming the request, why it cannot run here, and both ways out.
    assert "\n" not in message and message.startswith("attention backend 'flash_attn' was requested")
    assert "FlashAttention-2 needs a CUDA GPU" in message
    assert "Fix: `ghostvis install flash-attn`" in message and "attn_backend=auto" in message


def test_seed_api_and_d20_size_on_meta():
    with torch.device("meta"):
        model = cpu_gpt(
            GPTConfig(n_layer=20, n_head=12, n_embd=1536, use_flash_attn=True, use_fused_kernels=True)
        )
        d20 = cpu_gpt(get_config(20))
    assert model.config.vocab_size == 65536 and model.config.sequence_len == 2048
    assert d20.config.mlp_hidden == 3456 and d20.config.n_head == 10 and d20.config.head_dim == 128
    assert 563e6 < d20.num_params() < 565e6  # REFERENCE.md's d20 reference model: 564M


def test_config_validation_and_round_trip():
    cfg = tiny_config()
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig(n_layer=1, n_head=4, n_embd=64).n_kv_head == 4
    with pytest.raises(ConfigError, match="did you mean 'n_head'"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_heads": 4})
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig(n_layer=1, n_head=5, n_embd=64)
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig(n_layer=1, n_head=4, n_kv_head=3, n_embd=64)
    with pytest.raises(ConfigError, match="attn_backend"):
        GPTConfig(n_layer=1, n_head=4, n_embd=64, attn_backend="fa3")
    with pytest.raises(ConfigError, match="n_layer"):
        GPTConfig(n_layer=0, n_head=4, n_embd=64)
    opt = OptimizerConfig(lr=3e-4, betas=[0.8, 0.95])
    assert OptimizerConfig.from_dict(opt.to_dict()) == opt and opt.resolved_matrix_lr == 3e-4
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        OptimizerConfig.from_dict({"weight_decy": 0.1})
    with pytest.raises(ConfigError, match="backend"):
        OptimizerConfig(backend="sgd")


def test_presets():
    assert {"tiny", "small", "d12", "d20", "d26"} <= set(PRESETS)
    for name, (description, factory) in PRESETS.items():
        cfg = factory()
        assert description and cfg.head_dim in (64, 128), name
    assert get_preset("d12").n_embd == 768
    vlm = get_vlm_small_config(8)
    assert vlm.tie_embeddings and vlm.head_dim == 64 and vlm.n_kv_head < vlm.n_head
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        get_preset("tinny")


def test_low_precision_residual_under_cpu_autocast():
    model = randomized(tiny_config())
    ids = torch.randint(0, V, (2, 20))
    tgt = torch.roll(ids, -1, 1)
    ref = model(ids, tgt).item()
    model.config.low_precision_residual = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, tgt)
    loss.backward()
    print(f"bf16 residual loss {loss.item():.4f} vs fp32 {ref:.4f}")
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 0.05 * ref


def test_compile_blocks_only_compiles_and_matches_eager(caplog):
    import logging

    from ghostvis_core.kernels import dispatch

    config = tiny_config()
    model = randomized(config)
    ids = torch.randint(0, V, (2, 20))
    tgt = torch.roll(ids, -1, 1)
    ref = model(ids, tgt)
    ref.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    with pytest.raises(AssertionError, match="compiled=True"):
        model.compile_blocks(backend="eager", dynamic=False)  # an eager plan cannot be compiled
    compiled = GPT(config, cpu_plan(config, compiled=True))
    compiled.load_state_dict(model.state_dict())
    with caplog.at_level(logging.INFO, logger="ghostvis"):
        compiled.compile_blocks(backend="eager", dynamic=False)
    assert caplog.records == []  # the banner (from the plan) says what runs; compile_blocks logs nothing
    assert compiled.plan.compiled and compiled.model.norm._fn is dispatch.rms_norm_torch
    loss = compiled(ids, tgt)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(compiled.lm_head.weight.grad, ref_grad)
    # the backend is resolved outside traced code: no functools cache that dynamo would warn about
    assert not hasattr(dispatch.triton_import_error, "cache_clear")


def test_dense_rope_is_cached_and_matches_positions():
    model = randomized(tiny_config())
    cos, sin = model._dense_rope(12, torch.device("cpu"))
    ref_cos, ref_sin = gpt_mod.rope_cos_sin(torch.arange(12).expand(3, 12), model.inv_freq)
    assert cos.shape == (1, 12, 1, model.config.head_dim // 2)
    torch.testing.assert_close(cos.expand_as(ref_cos), ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin.expand_as(ref_sin), ref_sin, atol=0, rtol=0)
    assert model._dense_rope(12, torch.device("cpu"))[0] is cos
    ids = torch.randint(0, V, (3, 12))
    explicit = model(ids, position_ids=torch.arange(12).expand(3, 12))
    torch.testing.assert_close(model(ids), explicit)
    model.init_weights()
    assert not model._rope_cache
    with torch.inference_mode():
        model(ids)
    assert not model._rope_cache  # inference tensors are never cached for a later training forward

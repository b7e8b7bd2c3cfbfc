"""Vision tower on CPU: parity with transformers' SiglipVisionModel, presets, config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from plans import cpu_plan

from ghostvis_core.errors import ConfigError
from ghostvis_core.vision import VisionTower, normalize_pixels
from ghostvis_core.vision_config import VISION_PRESETS, VisionConfig, VLMConfig, get_vision_config

# fp32 with the same weights: |ours - HF| <= PARITY_RTOL * max|HF| (random weights of std 0.2 grow the
# activations to ~10, so an absolute 1e-5 would be a tighter bound at that scale than fp32 rounding allows).
PARITY_RTOL = 1e-5


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter random, norm weights near 1 (zero-init biases and projections would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        is_norm_weight = "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight")
        p.copy_(1.0 + noise if is_norm_weight else noise)
    return module


def hf_siglip_config(cfg: VisionConfig, attn_implementation: str = "eager"):
    """transformers' SiglipVisionConfig with our tower's shape (no pooling head: LLaVA never uses it)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        layer_norm_eps=cfg.layer_norm_eps,
        num_channels=cfg.num_channels,
        vision_use_head=False,
        attn_implementation=attn_implementation,
    )


def assert_parity(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Print max and mean |got - ref| (the parity report) and assert the max is within PARITY_RTOL."""
    diff, scale = (got - ref).abs(), float(ref.abs().max())
    print(f"{name}: max abs diff {diff.max():.2e}, mean {diff.mean():.2e} (max |ref| {scale:.1f})")
    assert float(diff.max()) <= PARITY_RTOL * max(scale, 1.0)


@pytest.mark.parametrize("hf_attention", ["eager", "sdpa"])
def test_tower_matches_transformers_siglip(hf_attention):
    from transformers import SiglipVisionModel

    cfg = get_vision_config("tiny", num_layers=3)
    ours = randomize_(VisionTower(cfg, cpu_plan())).eval()
    # eager: HF's explicit softmax(QK^T)V, independent of the SDPA kernel our CPU plan runs
    hf = SiglipVisionModel(hf_siglip_config(cfg, hf_attention)).eval()
    assert hf.config._attn_implementation == hf_attention
    # Flat names in transformers 5: our state dict is HF's as is (the identity prefix).
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    gen = torch.Generator().manual_seed(1)
    pixels = normalize_pixels(torch.rand(3, 3, cfg.image_size, cfg.image_size, generator=gen), cfg)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        pre = ours(pixels)
        post = ours(pixels, apply_post_norm=True)
    assert pre.shape == (3, cfg.num_image_tokens, cfg.hidden_size) == (3, 16, 64)
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert_parity(f"tower vs HF {hf_attention} hidden_states[-1]", pre, out.hidden_states[-1])
    assert_parity(f"tower + post-norm vs HF {hf_attention} last_hidden_state", post, out.last_hidden_state)
    # hidden_states[-1] really is before the post norm (the two outputs differ), so the test pins the choice
    assert (out.hidden_states[-1] - out.last_hidden_state).abs().max() > 0.1


def test_state_dict_keys_are_siglip_keys():
    keys = set(VisionTower(get_vision_config("tiny", num_layers=1), cpu_plan()).state_dict())
    layer = "encoder.layers.0."
    parts = ["embeddings.patch_embedding", "post_layernorm"]
    parts += [layer + p for p in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")]
    parts += [f"{layer}self_attn.{n}_proj" for n in ("q", "k", "v", "out")]
    expected = {f"{p}.{w}" for p in parts for w in ("weight", "bias")}
    expected.add("embeddings.position_embedding.weight")
    assert keys == expected


def test_siglip_base_preset_matches_hf_siglip_base():
    from transformers import SiglipVisionModel

    cfg = get_vision_config("siglip-base-224")
    assert cfg.num_image_tokens == 196 and cfg.head_dim == 64
    # On the meta device nothing is allocated or initialised: counting 86M parameters is instant.
    with torch.device("meta"):
        ours = VisionTower(cfg, cpu_plan()).num_params()
        hf_no_head = SiglipVisionModel(hf_siglip_config(cfg)).num_parameters()
        hf_cfg = hf_siglip_config(cfg)
        hf_cfg.vision_use_head = True
        hf_with_head = SiglipVisionModel(hf_cfg).num_parameters()
    print(f"siglip-base-224: ours {ours:,}; HF tower {hf_no_head:,}, with its pooling head {hf_with_head:,}")
    assert ours == hf_no_head
    assert 85e6 < ours < 87e6  # google/siglip-base-patch16-224's vision tower: 86M without the head


def test_flops_per_image_counts_matmuls_and_attention():
    cfg = get_vision_config("tiny")
    tower = VisionTower(cfg, cpu_plan())
    P, W, F, L = cfg.num_image_tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    patch, encoder = 3 * cfg.patch_size**2 * W, L * (4 * W * W + 2 * W * F)
    # the patch conv reads pixels, which need no gradient: forward and weight gradient only
    assert tower.flops_per_image() == 4 * patch * P + 6 * encoder * P + 12 * L * P * P * W
    for p in tower.parameters():  # frozen: the forward alone
        p.requires_grad_(False)
    assert tower.flops_per_image() == 2 * (patch + encoder) * P + 4 * L * P * P * W


def test_normalize_pixels_maps_unit_range_to_minus_one_one():
    cfg = get_vision_config("tiny")
    x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    y = normalize_pixels(x, cfg)
    assert torch.equal(y[0], torch.full_like(y[0], -1.0)) and torch.equal(y[1], torch.ones_like(y[1]))


def test_wrong_image_shape_is_a_config_error():
    tower = VisionTower(get_vision_config("tiny"), cpu_plan())
    with pytest.raises(ConfigError, match=r"\(N, 3, 32, 32\), got \(1, 3, 24, 24\)"):
        tower(torch.zeros(1, 3, 24, 24))


# ---------------------------------------------------------------------------------------------------------
# Configs


def test_vision_config_round_trips_through_json_dicts():
    import json

    cfg = get_vision_config("tiny", image_mean=(0.4, 0.5, 0.6))
    again = VisionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.image_mean == (0.4, 0.5, 0.6)
    assert set(VISION_PRESETS) == {"tiny", "siglip-base-224"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"patch_size": 7}, "patch_size=7 does not divide image_size=32"),
        ({"num_heads": 3}, "hidden_size=64 is not divisible by num_heads=3"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"layer_norm_eps": float("nan")}, r"layer_norm_eps must be in \(0, 1\)"),
        ({"image_std": (0.5, 0.5)}, "image_std must be 3 numbers"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std must be positive"),
    ],
)
def test_vision_config_rejects_bad_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_vision_config("tiny", **overrides)


def test_unknown_keys_and_presets_name_the_fix():
    with pytest.raises(ConfigError, match="did you mean 'patch_size'"):
        VisionConfig.from_dict({**VISION_PRESETS["tiny"], "patch_sise": 8})
    with pytest.raises(ConfigError, match="did you mean 'siglip-base-224'"):
        get_vision_config("siglip-base")


def test_vlm_config_resolves_projector_and_checks_the_image_token():
    from ghostvis_core.config import GPTConfig

    text = GPTConfig(n_layer=1, n_head=2, n_embd=48, vocab_size=97, sequence_len=64)
    cfg = VLMConfig(text=text, vision=get_vision_config("tiny"), image_token_id=96)
    assert cfg.projector_hidden == 48 and cfg.num_image_tokens == 16
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"image_token_id=97 must be a token id in \[0, 97\)"):
        VLMConfig(text=text, vision=get_vision_config("tiny"), image_token_id=97)
    short = GPTConfig(n_layer=1, n_head=2, n_embd=48, vocab_size=97, sequence_len=16)
    with pytest.raises(ConfigError, match="one image is 16 tokens"):
        VLMConfig(text=short, vision=get_vision_config("tiny"), image_token_id=1)

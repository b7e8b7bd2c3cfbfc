"""VLM on CPU: parity with transformers' LlavaForConditionalGeneration, image placement, no loss on images,
several images per sample and per batch, packed rows, and the image-count check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_vision import assert_parity, cpu_plan, hf_siglip_config, randomize_

from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import ConfigError
from ghostvis_core.vision import normalize_pixels
from ghostvis_core.vision_config import VLMConfig, get_vision_config
from ghostvis_core.vlm import VLM, hf_llava_key

V = 97  # odd vocab, as in test_gpt
IMAGE_ID = V - 1
P = 16  # tokens per image of the tiny tower (32 px, patch 8)


def tiny_vlm_config(tied: bool = False) -> VLMConfig:
    # Text width 48 != tower width 64, so a projector with its dimensions swapped cannot pass.
    shape = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=48, mlp_hidden=80)
    text = GPTConfig(**shape, vocab_size=V, sequence_len=64, rope_theta=500.0, tie_embeddings=tied)
    return VLMConfig(text=text, vision=get_vision_config("tiny"), image_token_id=IMAGE_ID)


def tiny_vlm(seed: int = 0, tied: bool = False) -> VLM:
    return randomize_(VLM(tiny_vlm_config(tied), cpu_plan()), seed=seed, std=0.15).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    """n random normalised 32 px RGB images (N, 3, 32, 32)."""
    pixels = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return normalize_pixels(pixels, get_vision_config("tiny"))


def row(spec: list, seed: int = 0) -> torch.Tensor:
    """Token ids of one sample: an int n is n random text ids, "img" one expanded <image> (P image ids)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.full((P,), IMAGE_ID)
    return torch.cat([image if s == "img" else torch.randint(0, IMAGE_ID, (s,), generator=gen) for s in spec])


def next_token_targets(ids_T: torch.Tensor, last: int = 5) -> torch.Tensor:
    """Pre-shifted targets: targets[t] = ids[t+1], the final one a text token."""
    return torch.cat([ids_T[1:], torch.tensor([last])])


def hf_llama_config(t: GPTConfig):
    """transformers' LlamaConfig with our decoder's shape (the field mapping an HF export writes)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.n_embd,
        intermediate_size=t.mlp_hidden,
        num_hidden_layers=t.n_layer,
        num_attention_heads=t.n_head,
        num_key_value_heads=t.n_kv_head,
        max_position_embeddings=t.sequence_len,
        rms_norm_eps=t.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        tie_word_embeddings=t.tie_embeddings,
    )


def hf_llava(cfg: VLMConfig):
    """transformers' LLaVA with our shapes: SigLIP tower, features from the last layer before post-norm."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=hf_siglip_config(cfg.vision),
        text_config=hf_llama_config(cfg.text),
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=cfg.text.tie_embeddings,
        # eager (explicit softmax) in both sub-models: independent of the SDPA kernel our CPU plan runs.
        # Set here, on the top config: LLaVA overrides what the sub-configs say.
        attn_implementation="eager",
    )
    model = LlavaForConditionalGeneration(config).eval()
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model.model.vision_tower.config._attn_implementation == "eager"
    return model


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers' LLaVA: pins the key mapping, feature layer, GELU flavour and image placement.


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llava(tied):
    ours = tiny_vlm(tied=tied)
    hf = hf_llava(ours.config)
    state = {hf_llava_key(k): v for k, v in ours.state_dict().items()}
    if tied:  # HF ties lm_head to the embedding and does not list it among the keys it expects
        assert torch.equal(state.pop("lm_head.weight"), state["model.language_model.embed_tokens.weight"])
    missing, unexpected = hf.load_state_dict(state, strict=not tied)
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])
    # Two images in sample 0, one in sample 1: images are consumed in order of appearance across the batch.
    ids = torch.stack([row([3, "img", 4, "img", 5]), row([10, "img", 18], seed=1)])
    pixels = images(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels)
    assert got.shape == (2, 44, V) and got.dtype == torch.float32
    assert_parity(f"VLM vs HF LLaVA logits (tied={tied})", got, ref)


def test_hf_llava_key_layouts():
    keys = set(VLM(tiny_vlm_config(), cpu_plan()).state_dict())
    hf_keys = set(hf_llava(tiny_vlm_config()).state_dict())
    assert {hf_llava_key(k) for k in keys} == hf_keys
    export = {hf_llava_key(k, "export") for k in keys}
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.bias" in export
    assert "language_model.lm_head.weight" in export and "multi_modal_projector.linear_2.bias" in export
    assert "language_model.model.layers.1.mlp.down_proj.weight" in export


# ---------------------------------------------------------------------------------------------------------
# Image placement and the loss


def test_image_features_sit_at_the_image_positions():
    model = tiny_vlm()
    ids = torch.stack([row([3, "img", 4, "img", 5]), row([10, "img", 18], seed=1)])
    pixels = images(3)
    seen = []
    first_layer = model.language_model.model.layers[0]
    hook = first_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids, pixels)
        feats = model.image_features(pixels)
        text = model.language_model.model.embed_tokens(ids)
    hook.remove()
    x = seen[0]  # what the first decoder layer receives
    assert torch.equal(x[0, 3:19], feats[0]) and torch.equal(x[0, 23:39], feats[1])
    assert torch.equal(x[1, 10:26], feats[2])
    image = ids == IMAGE_ID
    assert torch.equal(x[~image], text[~image])
    # each image's features are its own: the tower sees images independently of their batch neighbours
    with torch.no_grad():
        alone = model.image_features(pixels[1:2])[0]
    assert torch.allclose(alone, feats[1], atol=1e-6)


def test_no_loss_is_taken_on_images():
    model = tiny_vlm()
    ids = torch.stack([row([3, "img", 4, "img", 5]), row([10, "img", 18], seed=1)])
    targets = torch.stack([next_token_targets(r) for r in ids])
    pixels = images(3)
    # targets where the input is an image, or where the target is the image token (the token before it)
    dropped = (ids == IMAGE_ID) | (targets == IMAGE_ID)
    assert int(dropped.sum()) == 3 * P + 3
    # whatever the data puts at the image positions is ignored
    image = ids == IMAGE_ID
    scrambled = targets.clone()
    scrambled[image] = torch.randint(0, IMAGE_ID, (3 * P,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss = model(ids, pixels, targets)
        loss_scrambled = model(ids, pixels, scrambled)
        logits = model(ids, pixels)
    expected = F.cross_entropy(logits[~dropped], targets[~dropped])
    print(f"loss {loss:.6f}, scrambled image targets {loss_scrambled:.6f}, reference {expected:.6f}")
    assert torch.equal(loss, loss_scrambled)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_gradients_reach_the_tower_and_projector():
    model = tiny_vlm().train()
    ids = row([3, "img", 5])[None]
    model(ids, images(1), next_token_targets(ids[0])[None]).backward()
    for part in (model.vision_tower.embeddings.patch_embedding, model.multi_modal_projector.linear_1):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


def test_packed_row_with_images_equals_samples_one_by_one():
    model = tiny_vlm()
    a, b = row([4, "img", 6]), row(["img", 2, "img", 9], seed=1)
    ta, tb = next_token_targets(a, last=3), next_token_targets(b, last=4)
    pa, pb = images(1, seed=2), images(2, seed=3)
    with torch.no_grad():
        separate = model(a[None], pa, ta[None], loss_reduction="sum") + model(
            b[None], pb, tb[None], loss_reduction="sum"
        )
        positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
        packed = model(
            torch.cat([a, b])[None], torch.cat([pa, pb]), torch.cat([ta, tb])[None], positions, "sum"
        )
    print(f"packed sum {packed:.6f} vs one by one {separate:.6f}: diff {(packed - separate).abs():.2e}")
    assert torch.allclose(packed, separate, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Image-token count checks


def test_more_images_than_image_tokens_is_a_config_error():
    model = tiny_vlm()
    ids = row([3, "img", 5])[None]
    with pytest.raises(ConfigError, match=r"16 image tokens \(id 96\) but 2 image\(s\) were given"):
        model(ids, images(2))
    with pytest.raises(ConfigError, match="16 image tokens .* but 0 image"):
        model(ids)


def test_an_image_cut_across_rows_is_a_config_error():
    model = tiny_vlm()
    # 16 + 3 image tokens in row 0 and 13 in row 1: the total fits two images, the rows do not
    ids = torch.stack([row([3, "img", 2]), torch.cat([row([1]), torch.full((13,), IMAGE_ID), row([7])])])
    ids[0, :3] = IMAGE_ID
    with pytest.raises(ConfigError, match="row 0 holds 19 image tokens, not a multiple of 16"):
        model(ids, images(2))


def test_flops_follow_what_trains_with_the_projector_alone_training():
    """freeze=vision,llm (vision_pretrain's default): the tower runs forward only, the projector's first linear
    computes its weight gradient but not its input's, and the frozen language model still carries the gradient back to the
    projector (forward and input gradients: 4N, attention 3x its forward), lm_head included."""
    from ghostvis_core.train.freeze import apply_freeze, parse_freeze

    model = tiny_vlm()
    full_token, full_image = model.flops_per_token(), model.flops_per_image()
    apply_freeze(model, parse_freeze("vision,llm"))
    tower, lm, c = model.vision_tower, model.language_model, model.config.text
    P, W, L = tower.config.num_image_tokens, tower.config.hidden_size, tower.config.num_layers
    enc = sum(m.weight.numel() for m in tower.encoder.modules() if isinstance(m, torch.nn.Linear))
    patch = tower.embeddings.patch_embedding.weight.numel()
    proj1, proj2 = (lin.weight.numel() for lin in (model.multi_modal_projector.linear_1,
                                                    model.multi_modal_projector.linear_2))  # fmt: skip
    # linear_1 reads the frozen tower's output (no input gradient); linear_2 reads linear_1's (6N)
    assert model.flops_per_image() == 2 * (patch + enc) * P + 4 * L * P * P * W + (4 * proj1 + 6 * proj2) * P
    lm_matmul = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    attn = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    assert model.flops_per_token() == 4 * lm_matmul + attn
    assert model.flops_per_token() < full_token and model.flops_per_image() < full_image

"""The VLM's training side on CPU: checkpoints of kind vlm, starting from HF SigLIP / Llama folders, freezing
and per-part learning rates, vision_pretrain and image chat_sft through the trainer, and `infer --image`.

Image data comes from tests/vlm_data_stand_in.py (patched in for setup.build_image_data)."""

from __future__ import annotations

import pytest
import torch
from plans import cpu_plan
from test_train_config import tiny_config
from test_vlm import hf_llama_config, images, tiny_vlm, tiny_vlm_config
from vlm_data_stand_in import stand_in_build_image_data

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.data.shapes import ShapesTask
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.gpt import GPT
from ghostvis_core.models import from_checkpoint
from ghostvis_core.optim import build_optimizer
from ghostvis_core.train import setup
from ghostvis_core.train.freeze import apply_freeze, parse_freeze
from ghostvis_core.train.loop import train
from ghostvis_core.vlm import VLM

TINY_TEXT = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_kv_head": 1}


@pytest.fixture
def stand_in_images(monkeypatch):
    monkeypatch.setattr(setup, "build_image_data", stand_in_build_image_data)


def save_vlm(tmp_path, model: VLM):
    state = ckpt.TrainState(step=1, model_kind="vlm", model_config=model.config.to_dict(), data_format="image-chat")
    return ckpt.save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), optimizer_state={},
                                state=state.to_dict(), keep_last=0)


# ---- checkpoints -------------------------------------------------------------------------------------------

def test_vlm_checkpoint_round_trip_and_kind_refusal(tmp_path):
    model = tiny_vlm(seed=3)
    step_dir = save_vlm(tmp_path, model)
    loaded = VLM.from_checkpoint(step_dir, cpu_plan())
    assert loaded.config == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert isinstance(from_checkpoint(step_dir, cpu_plan()), VLM)  # the factory follows model_kind
    with pytest.raises(CheckpointError, match="holds a vlm model, not a gpt model"):
        GPT.from_checkpoint(step_dir, cpu_plan())


# ---- freezing and per-part learning rates ------------------------------------------------------------------

def test_freeze_subsets_set_requires_grad_and_optimizer_groups():
    model = tiny_vlm()
    trainable, frozen = apply_freeze(model, parse_freeze("vision,llm"))
    assert trainable == sum(p.numel() for p in model.multi_modal_projector.parameters())
    assert trainable + frozen == model.num_params()
    opt, _ = build_optimizer(model, OptimizerConfig(backend="adamw"), cpu_plan(optimizer="adamw"))
    assert {g["name"] for g in opt.param_groups} == {"projector.matrix", "projector.scalar"}
    # llm:1 keeps the last decoder block, the final norm and lm_head; the tower's post_layernorm never trains
    apply_freeze(model, parse_freeze("vision,llm:1"))
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    lm = {n for n in trainable_names if n.startswith("language_model.")}
    assert lm and all(n.startswith(("language_model.model.layers.1.", "language_model.model.norm.",
                                    "language_model.lm_head.")) for n in lm)
    assert not any(n.startswith("vision_tower.") for n in trainable_names)
    apply_freeze(model, parse_freeze(""))
    assert not model.vision_tower.post_layernorm.weight.requires_grad
    assert model.vision_tower.encoder.layers[0].mlp.fc1.weight.requires_grad


@pytest.mark.parametrize("bad, message", [
    ("eyes", "unknown part 'eyes'"), ("llm:x", "needs a block count"), ("llm,llm:1", "not both"),
])
def test_freeze_bad_values_are_one_message(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_freeze(bad)


def test_freeze_refuses_parts_the_model_lacks_and_llm_n_out_of_range():
    gpt = GPT(tiny_vlm_config().text, cpu_plan())
    with pytest.raises(ConfigError, match="no vision part"):
        apply_freeze(gpt, parse_freeze("vision"))
    with pytest.raises(ConfigError, match="has 2 blocks"):
        apply_freeze(tiny_vlm(), parse_freeze("llm:3"))


def test_frozen_weights_stay_bitwise_and_part_lrs_reach_the_groups():
    model = tiny_vlm().train()
    apply_freeze(model, parse_freeze("vision,llm:1"))
    cfg = OptimizerConfig(backend="adamw", lr=1e-3, projector_lr=1e-1, llm_lr=1e-2)
    opt, description = build_optimizer(model, cfg, cpu_plan(optimizer="adamw"))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"projector.matrix": 1e-1, "projector.scalar": 1e-1, "llm.matrix": 1e-2, "llm.scalar": 1e-2}
    assert "per-part lr projector 0.1, llm 0.01" in description
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.cat([torch.full((16,), model.config.image_token_id), torch.randint(0, 90, (20,))])[None]
    targets = torch.cat([ids[0, 1:], torch.tensor([3])])[None]
    for _ in range(3):
        model(ids, images(1), targets).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
    assert not any(p in opt.state for n, p in model.named_parameters() if n in frozen)


def test_muon_part_lr_covers_the_matrices():
    model = tiny_vlm()
    apply_freeze(model, parse_freeze("llm"))
    opt, _ = build_optimizer(model, OptimizerConfig(backend="muon", vision_lr=5e-4),
                             cpu_plan(optimizer="muon"))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["vision.matrix"] == 5e-4 and lrs["vision.scalar"] == 5e-4 and lrs["projector.matrix"] == 1e-3


# ---- the trainer: vision_pretrain, image chat_sft, HF folders ----------------------------------------------

def vlm_cfg(tmp_path, **kw):
    fields = dict(recipe="vision_pretrain", run="vision_pretrain", model=dict(TINY_TEXT), pack_max_length=48,
                  num_steps=8, save_every=0)
    return tiny_config(tmp_path, **{**fields, **kw})


def first_last(result):
    return result.losses[0][1], result.losses[-1][1]


def test_vision_pretrain_then_image_chat_sft(tmp_path, stand_in_images):
    base = train(tiny_config(tmp_path, run="base_train", num_steps=6, save_every=0))
    # the LLM of a 6-step base run knows too little for the projector alone to move the loss in 8 steps,
    # so it trains too here (the default freeze=vision,llm is checked in the HF-folder test below)
    vp = train(vlm_cfg(tmp_path, init_from=str(base.checkpoint), freeze="vision"))
    first, last = first_last(vp)
    assert last < first - 0.3, vp.losses
    state = ckpt.TrainState.read(vp.checkpoint)
    assert (state.model_kind, state.data_format, state.model_config["vision"]["image_size"]) == ("vlm", "image-chat", 32)
    base_w = ckpt.load_model_state(base.checkpoint)
    vp_w = ckpt.load_model_state(vp.checkpoint)
    assert set(vp_w) == {"language_model." + k for k in base_w} | {k for k in vp_w if not k.startswith("language_")}
    # the tower is frozen: still its seeded init, identical to a fresh VLM's of the same seed
    torch.manual_seed(0)  # the run's seed: the trainer seeds before building the model
    fresh = VLM(setup.VLMConfig.from_dict(state.model_config), cpu_plan())
    assert all(torch.equal(vp_w["vision_tower." + k], v) for k, v in fresh.vision_tower.state_dict().items())

    sft = train(tiny_config(tmp_path, recipe="chat_sft", run="image_sft", init_from=str(vp.checkpoint),
                            model=dict(TINY_TEXT), pack_max_length=48, num_steps=8, save_every=0, freeze="vision,llm:1"))
    first, last = first_last(sft)
    assert last < first - 0.3, sft.losses
    sft_state = ckpt.TrainState.read(sft.checkpoint)
    assert (sft_state.model_kind, sft_state.data_format, sft_state.recipe) == ("vlm", "image-chat", "chat_sft")
    sft_w = ckpt.load_model_state(sft.checkpoint)
    assert torch.equal(sft_w["language_model.model.layers.0.mlp.up_proj.weight"],
                       vp_w["language_model.model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(sft_w["language_model.model.layers.1.mlp.up_proj.weight"],
                           vp_w["language_model.model.layers.1.mlp.up_proj.weight"])

    # ghostvis infer --image: an answer, identical with and without the KV cache; bad inputs one message each
    from ghostvis_core.engine import generate_text, load_for_inference

    image = tmp_path / "scene.png"
    ShapesTask(32, 0, "heldout").sample(0).image.save(image)
    loaded = load_for_inference(str(sft.checkpoint))
    cached = generate_text(loaded, "What colour is the circle?", 12, image=image)
    fresh = generate_text(loaded, "What colour is the circle?", 12, image=image, use_cache=False)
    assert cached == fresh and cached.strip()
    with pytest.raises(ConfigError, match="no such image file"):
        generate_text(loaded, "hi", 4, image=tmp_path / "nope.png")
    with pytest.raises(ConfigError, match="is a text model"):
        generate_text(load_for_inference(str(base.checkpoint)), "hi", 4, image=image)


def test_vlm_generate_cache_matches_no_cache_greedy():
    model = tiny_vlm(seed=1)
    ids = torch.cat([torch.tensor([5, 7]), torch.full((16,), model.config.image_token_id), torch.tensor([9, 11])])
    pix = images(1)
    cached = model.generate(ids[None], pix, 10)
    fresh = model.generate(ids[None], pix, 10, use_cache=False)
    assert torch.equal(cached, fresh)
    # the image matters: another image gives other logits at the first generated position
    assert not torch.equal(model(ids[None], pix)[0, -1], model(ids[None], images(1, seed=9))[0, -1])


def test_gpt_prefill_from_embeddings_equals_token_prefill():
    gpt = tiny_vlm(seed=2).language_model
    idx = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    by_tokens = gpt.generate(idx, 8)
    by_embeds = gpt.generate(idx, 8, embed=gpt.model.embed_tokens)
    assert torch.equal(by_tokens, by_embeds)


def test_vision_init_from_siglip_and_init_from_llama_folders(tmp_path, stand_in_images):
    from test_vision import hf_siglip_config
    from transformers import LlamaForCausalLM, SiglipVisionModel

    from ghostvis_core.data import default_tokenizer
    from ghostvis_core.vision_config import get_vision_config

    vocab = default_tokenizer(4096).vocab_size
    torch.manual_seed(0)
    SiglipVisionModel(hf_siglip_config(get_vision_config("tiny", num_layers=1))).save_pretrained(tmp_path / "siglip")
    text = GPTConfig(**TINY_TEXT, vocab_size=vocab + 3, sequence_len=64, mlp_hidden=96)
    LlamaForCausalLM(hf_llama_config(text)).save_pretrained(tmp_path / "llama")
    cfg = vlm_cfg(tmp_path, init_from=str(tmp_path / "llama"), num_steps=2, model={})
    cfg = cfg.apply_overrides([f"vision.init_from={tmp_path / 'siglip'}"])
    result = train(cfg)
    state = ckpt.TrainState.read(result.checkpoint)
    assert state.model_config["vision"]["num_layers"] == 1
    assert state.model_config["text"]["vocab_size"] == vocab + 3
    saved = ckpt.load_model_state(result.checkpoint)
    from ghostvis_core.hf_import import read_hf_llama, read_hf_siglip_vision

    _, tower = read_hf_siglip_vision(tmp_path / "siglip")
    _, llm = read_hf_llama(tmp_path / "llama")
    # tower and LLM frozen by default: the checkpoint holds the HF tensors exactly
    assert all(torch.equal(saved["vision_tower." + k], v) for k, v in tower.items())
    assert all(torch.equal(saved["language_model." + k], v) for k, v in llm.items())

    # an explicit preset that disagrees with the folder's tower; a Llama vocab smaller than the tokenizer's
    with pytest.raises(ConfigError, match="vision=siglip-base-224 has image_size=224"):
        train(cfg.apply_overrides(["vision=siglip-base-224", "run=x2"]))
    small = GPTConfig(**TINY_TEXT, vocab_size=vocab - 1, sequence_len=64, mlp_hidden=96)
    LlamaForCausalLM(hf_llama_config(small)).save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match="smaller than the tokenizer's"):
        train(vlm_cfg(tmp_path, init_from=str(tmp_path / "small"), run="x3", model={}))


def test_vision_pretrain_from_scratch_warns(tmp_path, stand_in_images):
    import logging

    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append  # the ghostvis logger does not propagate, so listen on it directly
    logging.getLogger("ghostvis").addHandler(handler)
    try:
        result = train(vlm_cfg(tmp_path, init_from="none", num_steps=2, freeze=""))
    finally:
        logging.getLogger("ghostvis").removeHandler(handler)
    assert any("init_from=none: the language model starts from random weights" in r.getMessage() for r in seen)
    assert result.step == 2


def test_vision_pretrain_resume_mid_epoch_with_image_workers_is_bitwise(tmp_path):
    """The real image pipeline (built-in shapes captions, pixels decoded in 2 DataLoader workers): a run
    resumed from its step-4 checkpoint replays steps 5..8 with bit-identical losses."""
    cfg = vlm_cfg(tmp_path, init_from="none", freeze="", num_steps=8, save_every=4, run="full")
    full = train(cfg)
    assert [s for s, _ in full.losses] == list(range(1, 9))
    resumed = train(vlm_cfg(tmp_path, init_from="none", freeze="", num_steps=8, save_every=4, run="branch",
                            resume=str(cfg.run_dir / "step_000004")))
    assert resumed.losses == full.losses[4:]


def test_vision_pretrain_starts_from_the_base_run_by_default(tmp_path):
    with pytest.raises(CheckpointError, match=r"starts from a base_train model, but run 'base_train' has no checkpoint"):
        train(vlm_cfg(tmp_path))
    with pytest.raises(ConfigError, match="init_from=none: recipe chat_sft cannot start from random weights"):
        train(tiny_config(tmp_path, recipe="chat_sft", run="sft", init_from="none"))

"""HF interop on CPU: folders transformers saves read into our models, and our exports load in transformers.

Random models built and saved inside each test (no hub): read_hf_llama / read_hf_siglip_vision against HF's
forward, export_text / export_vlm against AutoModelForCausalLM / LlavaForConditionalGeneration (logits and
greedy tokens), the exported tokenizer and processor against ours, and one message naming the folder and the
key for every bad folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_vision import assert_parity, cpu_plan, hf_siglip_config, randomize_
from test_vlm import hf_llama_config, hf_llava

from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.export import export_text, export_vlm
from ghostvis_core.gpt import GPT
from ghostvis_core.hf_import import read_hf_llama, read_hf_siglip_vision
from ghostvis_core.tokenizer import Tokenizer
from ghostvis_core.vision import VisionTower, normalize_pixels
from ghostvis_core.vision_config import VisionConfig, VLMConfig, get_vision_config
from ghostvis_core.vlm import VLM

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it?"}]},
    {"role": "assistant", "content": "a red circle"},
    {"role": "user", "content": "and 12 more?"},
]


def ours(config):
    """The one place this file builds our models (GPT takes cpu_plan() once the plan is required)."""
    if isinstance(config, VLMConfig):
        model = VLM(config, cpu_plan())
    elif isinstance(config, VisionConfig):
        model = VisionTower(config, cpu_plan())
    else:
        model = GPT(config, cpu_plan(config))
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    words = "a red blue green circle square triangle at top left right bottom what colour is it small big"
    texts = [" ".join(words.split()[i % 7:]) + f" {i}" for i in range(200)]
    return Tokenizer.train(texts, 300)


def text_config(vocab_size: int, tied: bool = False) -> GPTConfig:
    # GQA, a non-default theta and eps, an odd vocab: a field the mapping drops cannot pass unnoticed.
    return GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=48, mlp_hidden=80, vocab_size=vocab_size,
                     sequence_len=64, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tied)


def vlm_config(tok: Tokenizer, tied: bool = False) -> VLMConfig:
    # a model vocab above the tokenizer's (padding rows) is allowed; <image> is the tokenizer's own id
    return VLMConfig(text=text_config(tok.vocab_size + 3, tied), vision=get_vision_config("tiny"),
                     image_token_id=tok.image_id)


def random_ids(n: int, high: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(9, high, (1, n), generator=torch.Generator().manual_seed(seed))  # past the specials


def images(n: int, cfg: VisionConfig, seed: int = 1) -> torch.Tensor:
    pixels = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    return normalize_pixels(pixels, cfg)


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens by full forwards (no cache): the plainest reference for HF's generate."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def until_eos(ids: list[int], start: int, eos: int) -> list[int]:
    """The generated part of ids up to and including the first eos (HF's generate stops there)."""
    new = ids[start:]
    return new[: new.index(eos) + 1] if eos in new else new


def save_hf(model, folder):
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# HF Llama folder -> our GPT


@pytest.mark.parametrize("tied", [False, True])
def test_read_hf_llama_matches_transformers(tmp_path, tied):
    from transformers import LlamaForCausalLM

    cfg = text_config(97, tied)
    hf_cfg = hf_llama_config(cfg)
    hf_cfg._attn_implementation = "eager"  # explicit softmax: independent of the SDPA kernel our plan runs
    hf = randomize_(LlamaForCausalLM(hf_cfg), seed=1, std=0.15).eval()
    folder = save_hf(hf, tmp_path / "llama")
    got_cfg, state = read_hf_llama(folder)
    assert got_cfg == cfg
    model = ours(got_cfg)
    model.load_state_dict(state, strict=True)
    ids = random_ids(24, 97)
    with torch.no_grad():
        assert_parity(f"read_hf_llama GPT vs HF Llama logits (tied={tied})", model(ids), hf(ids).logits)


def test_read_hf_llama_reads_shards_and_legacy_rope_theta(tmp_path, tok):
    cfg = text_config(tok.vocab_size)
    model = randomize_(ours(cfg), seed=4)
    folder = export_text(model.state_dict(), cfg, tok, tmp_path / "one")
    # Split into two shards with an index, and write RoPE the transformers 4 way (top-level rope_theta).
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf = json.loads((folder / "config.json").read_text())
    del hf["rope_parameters"]
    (folder / "config.json").write_text(json.dumps(hf))
    got_cfg, state = read_hf_llama(folder)
    assert got_cfg == cfg and got_cfg.rope_theta == 500.0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# Our GPT -> export_text -> transformers


@pytest.mark.parametrize("tied", [False, True])
def test_export_text_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, tok, tied):
    from transformers import AutoModelForCausalLM

    cfg = text_config(tok.vocab_size + 3, tied)
    model = randomize_(ours(cfg), seed=2, std=0.15)
    out = export_text(model.state_dict(), cfg, tok, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left beside it
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied) and len(f.keys()) == 20 + (not tied)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["max_position_embeddings"] == 64
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id] and gen["bos_token_id"] == tok.bos_id

    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.rope_parameters["rope_theta"] == 500.0
    ids = random_ids(20, tok.vocab_size)
    with torch.no_grad():
        assert_parity(f"export_text vs HF Llama logits (tied={tied})", model(ids), hf(ids).logits)
        hf_tokens = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    our_tokens = greedy(model, ids, 8)
    print("greedy tokens, ours:", our_tokens[0, 20:].tolist(), "HF:", hf_tokens[0, 20:].tolist())
    expected = until_eos(our_tokens[0].tolist(), 20, tok.eos_id)
    assert hf_tokens[0, 20:20 + len(expected)].tolist() == expected and len(expected) >= 2
    # and back: the export reads as the same config and tensors
    back_cfg, back = read_hf_llama(out)
    assert back_cfg == cfg and all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_exported_tokenizer_renders_the_chat_as_encode_chat(tmp_path, tok):
    from transformers import AutoTokenizer

    cfg = text_config(tok.vocab_size)
    out = export_text(ours(cfg).state_dict(), cfg, tok, tmp_path / "export")
    hf_tok = AutoTokenizer.from_pretrained(out)
    specials = (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token)
    assert specials == ("<|bos|>", "<|assistant_end|>", "<|pad|>")
    assert hf_tok.model_max_length == 64 and hf_tok.convert_tokens_to_ids("<image>") == tok.image_id
    for prompt in (False, True):
        ids, _ = tok.encode_chat(CHAT, add_generation_prompt=prompt)
        hf_ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=prompt, tokenize=True,
                                            return_dict=False)
        assert list(hf_ids) == ids and ids.count(tok.bos_id) == 1
    # BOS: the template writes it and the tokenizer's post-processor adds one more to any plain call, so a
    # rendered chat tokenized as a string starts with two (pass ids, or add_special_tokens=False).
    rendered = tok.render_chat(CHAT)
    assert hf_tok(rendered).input_ids[:2] == [tok.bos_id, tok.bos_id]
    assert hf_tok(rendered, add_special_tokens=False).input_ids == tok.encode_chat(CHAT)[0]
    assert hf_tok("a red circle").input_ids == [tok.bos_id, *tok.encode("a red circle")]


# ---------------------------------------------------------------------------------------------------------
# Our VLM -> export_vlm -> transformers' LLaVA and LlavaProcessor


def expand_images(ids: list[int], image_id: int, num_tokens: int) -> torch.Tensor:
    """(1, T) ids with every <image> expanded to num_tokens copies (what the data pipeline does)."""
    out = [t for i in ids for t in ([i] * num_tokens if i == image_id else [i])]
    return torch.tensor([out])


@pytest.mark.parametrize("tied", [False, True])
def test_export_vlm_loads_in_transformers_llava_with_same_logits(tmp_path, tok, tied):
    from transformers import LlavaForConditionalGeneration

    cfg = vlm_config(tok, tied)
    model = randomize_(ours(cfg), seed=3, std=0.15)
    out = export_vlm(model.state_dict(), cfg, tok, tmp_path / "vlm")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    prefixes = ("vision_tower.vision_model.", "language_model.model.", "multi_modal_projector.linear_")
    assert all(k.startswith(prefixes) or k == "language_model.lm_head.weight" for k in keys)
    assert ("language_model.lm_head.weight" in keys) == (not tied)
    assert "vision_tower.vision_model.post_layernorm.weight" in keys
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert (hf_cfg["image_token_index"], hf_cfg["vision_feature_layer"]) == (tok.image_id, -1)
    assert hf_cfg["vision_feature_select_strategy"] == "full" and hf_cfg["projector_hidden_act"] == "gelu"

    hf = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.model.language_model.config._attn_implementation == "eager"
    assert hf.model.vision_tower.config._attn_implementation == "eager"
    chat = [CHAT[1], {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}]
    chat_ids, _ = tok.encode_chat(chat, add_generation_prompt=True)
    ids = expand_images(chat_ids, tok.image_id, cfg.num_image_tokens)
    pixels = images(2, cfg.vision)
    with torch.no_grad():
        got, ref = model(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits
    assert got.shape == (1, ids.shape[1], cfg.text.vocab_size)
    assert_parity(f"export_vlm vs HF LLaVA logits (tied={tied})", got, ref)
    # the tower reads back from the export (vision_tower.vision_model.* layout) unchanged
    back_cfg, back = read_hf_siglip_vision(out)
    assert back_cfg == cfg.vision
    assert all(torch.equal(back[k], v) for k, v in model.vision_tower.state_dict().items())


def test_exported_processor_expands_image_and_normalises_like_the_tower(tmp_path, tok):
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    cfg = vlm_config(tok)
    out = export_vlm(ours(cfg).state_dict(), cfg, tok, tmp_path / "vlm")
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaProcessor"
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    prompt = tok.render_chat([CHAT[1]], add_generation_prompt=True)
    batch = processor(text=prompt, images=Image.fromarray(rgb), return_tensors="pt", add_special_tokens=False)
    ids, _ = tok.encode_chat([CHAT[1]], add_generation_prompt=True)
    assert batch["input_ids"].tolist() == expand_images(ids, tok.image_id, 16).tolist()
    # a 32 px image needs no resize: the processor's pixels are exactly normalize_pixels of [0, 1] pixels
    expected = normalize_pixels(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, cfg.vision)
    assert_parity("LlavaProcessor pixels vs normalize_pixels", batch["pixel_values"], expected)


# ---------------------------------------------------------------------------------------------------------
# HF SigLIP towers (alone, in a SiglipModel, in a LLaVA) -> our VisionTower


def hf_tower_folder(kind: str, cfg: VisionConfig, tok: Tokenizer, folder):
    """A random HF model of `kind` saved to folder, and its SiglipVisionModel (the reference tower)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    vision = hf_siglip_config(cfg)
    if kind == "siglip_vision_model":
        vision.vision_use_head = True  # the pooling head is saved and must be dropped
        hf = SiglipVisionModel(vision)
        tower = hf
    elif kind == "siglip":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        hf = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config=text,
                                      attn_implementation="eager"))
        tower = hf.vision_model
    else:
        hf = hf_llava(vlm_config(tok))
        tower = hf.model.vision_tower
    randomize_(tower, seed=5, std=0.15)
    save_hf(hf, folder)
    return tower.eval()


@pytest.mark.parametrize("kind", ["siglip_vision_model", "siglip", "llava"])
def test_read_hf_siglip_vision_matches_the_hf_tower(tmp_path, tok, kind):
    cfg = get_vision_config("tiny")
    hf_tower = hf_tower_folder(kind, cfg, tok, tmp_path / kind)
    got_cfg, state = read_hf_siglip_vision(tmp_path / kind)
    assert got_cfg == cfg
    tower = ours(got_cfg)
    tower.load_state_dict(state, strict=True)
    pixels = images(2, cfg)
    with torch.no_grad():
        out = hf_tower(pixel_values=pixels, output_hidden_states=True)
        assert_parity(f"read_hf_siglip_vision ({kind}) vs HF hidden_states[-1]", tower(pixels),
                      out.hidden_states[-1])
        post = tower(pixels, apply_post_norm=True)
    assert_parity(f"read_hf_siglip_vision ({kind}) + post-norm vs HF", post, out.last_hidden_state)


# ---------------------------------------------------------------------------------------------------------
# Bad folders: one message naming the folder and the key


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(folder, drop=(), **replace):
    tensors = load_file(folder / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def llama_folder(tmp_path, tok):
    cfg = text_config(tok.vocab_size)
    return export_text(ours(cfg).state_dict(), cfg, tok, tmp_path / "llama")


@pytest.fixture
def siglip_folder(tmp_path):
    cfg = get_vision_config("tiny", num_layers=1)
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_siglip_config(cfg).to_dict()))
    save_file(ours(cfg).state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    assert read_hf_siglip_vision(folder)[0] == cfg  # the unbroken folder reads
    return folder


LLAMA_BREAKAGES = {
    "missing folder": (lambda f: f.rename(f.with_name("moved")), CheckpointError, "no such folder"),
    "no config": (lambda f: (f / "config.json").unlink(), CheckpointError, "no config.json"),
    "no weights": (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), CheckpointError,
                   "no model.safetensors or model.safetensors.index.json (found pytorch_model.bin"),
    "wrong model_type": (lambda f: edit_json(f / "config.json", model_type="mistral"), ConfigError,
                         "key 'model_type' is 'mistral'"),
    "attention bias": (lambda f: edit_json(f / "config.json", attention_bias=True), ConfigError,
                       "key 'attention_bias' is true"),
    "rope scaling": (lambda f: edit_json(f / "config.json", rope_parameters={"rope_type": "llama3",
                     "rope_theta": 5e5, "factor": 8.0}), ConfigError,
                     "key 'rope_parameters' has rope_type 'llama3'"),
    "head_dim": (lambda f: edit_json(f / "config.json", head_dim=32), ConfigError, "key 'head_dim' is 32"),
    "missing tensor": (lambda f: edit_tensors(f, drop=["model.layers.1.mlp.up_proj.weight"]), CheckpointError,
                       "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    "bad shape": (lambda f: edit_tensors(f, model__norm__weight=torch.ones(47)), CheckpointError,
                  r"tensor 'model.norm.weight' has shape [47], the config implies [48]"),
    "bias tensor": (lambda f: edit_tensors(f, model__layers__0__self_attn__q_proj__bias=torch.zeros(48)),
                    CheckpointError, "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
    "bad config value": (lambda f: edit_json(f / "config.json", num_key_value_heads=3), ConfigError,
                         "GPTConfig.n_kv_head=3 must divide n_head=2"),
}


SIGLIP_BREAKAGES = {
    "wrong model_type": (lambda f: edit_json(f / "config.json", model_type="clip_vision_model"), ConfigError,
                         "key 'model_type' is 'clip_vision_model'"),
    "clip tower in llava": (lambda f: edit_json(f / "config.json", model_type="llava",
                            vision_config={"model_type": "clip_vision_model"}), ConfigError,
                            "key 'vision_config.model_type' is 'clip_vision_model'"),
    "quick_gelu": (lambda f: edit_json(f / "config.json", hidden_act="quick_gelu"), ConfigError,
                   "key 'hidden_act' of the vision model is 'quick_gelu'"),
    "missing tensor": (lambda f: edit_tensors(f, drop=["encoder.layers.0.mlp.fc1.bias"]), CheckpointError,
                       "missing tensor 'encoder.layers.0.mlp.fc1.bias'"),
    "no tower": (lambda f: edit_tensors(f, drop=["embeddings.patch_embedding.weight"]), CheckpointError,
                 "missing tensor 'vision_model.embeddings.patch_embedding.weight'"),
    "bad shape": (lambda f: edit_tensors(f, embeddings__position_embedding__weight=torch.zeros(9, 64)),
                  CheckpointError, "tensor 'embeddings.position_embedding.weight' has shape [9, 64], the "
                  "config implies [16, 64]"),
}


BREAKAGES = {("llama", case): spec for case, spec in LLAMA_BREAKAGES.items()}
BREAKAGES.update({("siglip", case): spec for case, spec in SIGLIP_BREAKAGES.items()})
READERS = {"llama": read_hf_llama, "siglip": read_hf_siglip_vision}


@pytest.mark.parametrize("kind,case", list(BREAKAGES), ids=[f"{k}-{c}" for k, c in BREAKAGES])
def test_bad_folder_names_the_folder_and_the_key(request, kind, case):
    folder = request.getfixturevalue(f"{kind}_folder")
    breakage, error, message = BREAKAGES[kind, case]
    breakage(folder)
    with pytest.raises(error) as info:
        READERS[kind](folder)
    print(info.value)
    assert str(info.value).startswith(str(folder)) and message in str(info.value)


def test_a_llama_folder_is_not_a_siglip_folder(llama_folder):
    with pytest.raises(ConfigError, match="key 'model_type' is 'llama'; read_hf_siglip_vision reads"):
        read_hf_siglip_vision(llama_folder)


# ---------------------------------------------------------------------------------------------------------
# Export refusals


def test_export_refuses_an_existing_folder_unless_overwrite_then_replaces_it_whole(tmp_path, tok):
    cfg = text_config(tok.vocab_size)
    state = ours(cfg).state_dict()
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(ConfigError, match=r"out already exists \(a folder\).*overwrite=True"):
        export_text(state, cfg, tok, out)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]  # untouched
    export_text(state, cfg, tok, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the temp nor the old folder is left


def test_export_refuses_what_hf_could_not_load(tmp_path, tok):
    cfg = vlm_config(tok)
    state = ours(cfg).state_dict()
    other_image = VLMConfig(text=cfg.text, vision=cfg.vision, image_token_id=tok.image_id + 1)
    with pytest.raises(ConfigError, match=f"image_token_id is {tok.image_id + 1} but the tokenizer"):
        export_vlm(state, other_image, tok, tmp_path / "a")
    small = text_config(tok.vocab_size - 1)
    with pytest.raises(ConfigError, match=f"tokenizer has {tok.vocab_size} tokens but the model's vocab"):
        export_text(ours(small).state_dict(), small, tok, tmp_path / "b")
    # a state that is not this config's: named by key before anything is written
    text = text_config(tok.vocab_size)
    with pytest.raises(CheckpointError, match="export: tensor 'model.embed_tokens.weight' has shape"):
        export_text(ours(text_config(tok.vocab_size + 1)).state_dict(), text, tok, tmp_path / "c")
    wide = VLMConfig(text=cfg.text, vision=cfg.vision, image_token_id=tok.image_id, projector_hidden=64)
    with pytest.raises(ConfigError, match="projector_hidden=64 differs from the text width 48"):
        export_vlm(ours(wide).state_dict(), wide, tok, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []

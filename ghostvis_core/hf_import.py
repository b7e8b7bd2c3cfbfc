"""Read local Hugging Face folders (`save_pretrained` layout) into our configs and state dicts.

`read_hf_llama(folder)` -> (GPTConfig, state_dict) for a LlamaForCausalLM folder;
`read_hf_siglip_vision(folder)` -> (VisionConfig, state_dict) for a SiglipVisionModel folder, a full
SiglipModel folder (its vision half) or a LLaVA folder (its vision tower). Our parameter names are HF's
(gpt.py, vision.py), so reading is a prefix strip plus a check of every shape against the one table of
shapes a config implies (`llama_param_shapes`, `siglip_param_shapes`, shared with export.py).
Safetensors only: nothing is ever unpickled.

Every problem is one message naming the folder and the key: a missing folder, config.json or weights file
(CheckpointError), a model type or feature our models cannot represent (ConfigError), a missing tensor or a
shape mismatch (CheckpointError).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.vision_config import SIGLIP_MEAN, SIGLIP_STD, VisionConfig

__all__ = ["read_hf_llama", "read_hf_siglip_vision", "llama_param_shapes", "siglip_param_shapes"]

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# HF's config defaults for keys a config.json may omit (LlamaConfig / SiglipVisionConfig, transformers 5).
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "head_dim": None,
}
_SIGLIP_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# Where the tower's tensors sit, per model_type, most specific first: legacy/export layout, the flat layout
# transformers 5 saves by default, and its in-memory layout (save_original_format=False).
_TOWER_PREFIXES = {
    "siglip_vision_model": ("vision_model.", ""),
    "siglip": ("vision_model.",),
    "llava": ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
              "model.vision_tower."),
}


# ---------------------------------------------------------------------------------------------------------
# Shapes a config implies (one table for import and export)


def llama_param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our GPT / HF LlamaForCausalLM safetensors; lm_head.weight only when untied."""
    C, D, F, V = config.n_embd, config.head_dim, config.mlp_hidden, config.vocab_size
    H, K = config.n_head, config.n_kv_head
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H * D, C),
            p + "self_attn.k_proj.weight": (K * D, C),
            p + "self_attn.v_proj.weight": (K * D, C),
            p + "self_attn.o_proj.weight": (C, H * D),
            p + "mlp.gate_proj.weight": (F, C),
            p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F),
            p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,),
        })
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def siglip_param_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our VisionTower / HF SiglipVisionModel without its pooling head (flat names)."""
    W, F, p = config.hidden_size, config.intermediate_size, config.patch_size
    shapes = {
        "embeddings.patch_embedding.weight": (W, config.num_channels, p, p),
        "embeddings.patch_embedding.bias": (W,),
        "embeddings.position_embedding.weight": (config.num_image_tokens, W),
        "post_layernorm.weight": (W,),
        "post_layernorm.bias": (W,),
    }
    for i in range(config.num_layers):
        pre = f"encoder.layers.{i}."
        for name, out_in in (
            ("self_attn.q_proj", (W, W)), ("self_attn.k_proj", (W, W)), ("self_attn.v_proj", (W, W)),
            ("self_attn.out_proj", (W, W)), ("mlp.fc1", (F, W)), ("mlp.fc2", (W, F)),
        ):
            shapes[pre + name + ".weight"] = out_in
            shapes[pre + name + ".bias"] = (out_in[0],)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{norm}.weight"] = (W,)
            shapes[f"{pre}{norm}.bias"] = (W,)
    return shapes


def check_state_shapes(
    where: str, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> None:
    """CheckpointError naming `where` and the key unless `state` holds exactly `shapes`' keys and shapes."""
    for key, shape in shapes.items():
        if key not in state:
            raise CheckpointError(f"{where}: missing tensor {key!r} (shape {list(shape)} expected)")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {list(state[key].shape)}, "
                f"the config implies {list(shape)}"
            )
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all) that the config does not describe"
        )


# ---------------------------------------------------------------------------------------------------------
# Folder, config and weights


def _read_config(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give a local Hugging Face model folder "
                              "(written by save_pretrained)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return folder, hf


def _expect_model_type(folder: Path, hf: dict, accepted: tuple[str, ...], what: str) -> str:
    model_type = hf.get("model_type")
    if model_type not in accepted:
        raise ConfigError(
            f"{folder}: config.json key 'model_type' is {model_type!r}; {what} reads {', '.join(accepted)}"
        )
    return model_type


def _weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards an index names)."""
    index_path = folder / WEIGHTS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text("utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from e
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / WEIGHTS_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
    hint = (f" (found {pickled[0]}, a pickle we never load: re-save it with save_pretrained(..., "
            "safe_serialization=True))" if pickled else "")
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{hint}")


def _load_tensors(folder: Path, index: dict[str, Path], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{our key: tensor} for names = {our key: key in the files}; a missing key names the folder and key."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, theirs in names.items():
        if theirs not in index:
            raise CheckpointError(f"{folder}: missing tensor {theirs!r}")
        by_file.setdefault(index[theirs], []).append((ours, theirs))
    state = {}
    for path, pairs in by_file.items():
        if not path.is_file():
            raise CheckpointError(f"{folder}: {path.name} (named by {WEIGHTS_INDEX}) does not exist")
        with safe_open(path, framework="pt") as f:
            for ours, theirs in pairs:
                state[ours] = f.get_tensor(theirs)
    return state


def _build(folder: Path, cls, **fields):
    """cls(**fields), a validation error prefixed with the folder it came from."""
    try:
        return cls(**fields)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Llama


def _rope_theta(folder: Path, hf: dict) -> float:
    """rope_theta from transformers 5's rope_parameters or the legacy top level; only default RoPE."""
    params = hf.get("rope_parameters")
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
        key = "rope_scaling"
    else:
        key = "rope_parameters"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{folder}: config.json key {key!r} is not one flat RoPE setting: {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{folder}: config.json key {key!r} has rope_type {rope_type!r}; GhostVis's GPT has only the "
            "default (unscaled) RoPE"
        )
    return float(params.get("rope_theta", 10000.0))


def read_hf_llama(folder: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, state_dict) of a local LlamaForCausalLM folder; the state loads into GPT(config) strictly.

    A tied model's lm_head.weight is the embedding tensor itself (as GPT.state_dict lists it). Tensors keep
    the dtype they are stored in.
    """
    folder, hf = _read_config(folder)
    _expect_model_type(folder, hf, ("llama",), "read_hf_llama")
    get = {k: hf.get(k, default) for k, default in _LLAMA_DEFAULTS.items()}
    for key in ("attention_bias", "mlp_bias"):
        if get[key]:
            raise ConfigError(f"{folder}: config.json key {key!r} is true; GhostVis's GPT has no biases")
    if get["hidden_act"] != "silu":
        raise ConfigError(f"{folder}: config.json key 'hidden_act' is {get['hidden_act']!r}; GhostVis's GPT "
                          "uses SwiGLU with silu")
    hidden, heads = get["hidden_size"], get["num_attention_heads"]
    if get["head_dim"] is not None and get["head_dim"] * heads != hidden:
        raise ConfigError(f"{folder}: config.json key 'head_dim' is {get['head_dim']}, not hidden_size / "
                          f"num_attention_heads = {hidden} / {heads}; GhostVis's GPT needs that")
    config = _build(
        folder, GPTConfig,
        n_layer=get["num_hidden_layers"], n_head=heads, n_kv_head=get["num_key_value_heads"] or heads,
        n_embd=hidden, vocab_size=get["vocab_size"], sequence_len=get["max_position_embeddings"],
        rope_theta=_rope_theta(folder, hf), tie_embeddings=bool(get["tie_word_embeddings"]),
        mlp_hidden=get["intermediate_size"], norm_eps=get["rms_norm_eps"],
    )
    index = _weight_index(folder)
    shapes = llama_param_shapes(config)
    state = _load_tensors(folder, index, {k: k for k in shapes})
    # HF leaves lm_head out of a tied file (some writers keep a copy); old writers saved rotary inv_freq.
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    present = {k: state.get(k, torch.empty(0)) for k in index if k not in ignored and "rotary_emb" not in k}
    check_state_shapes(str(folder), present, shapes)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return config, state


# ---------------------------------------------------------------------------------------------------------
# SigLIP vision tower


def _image_normalization(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the folder's image processor config when it has one, else SigLIP's."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from e
            data = data.get("image_processor", data) if isinstance(data, dict) else {}
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return SIGLIP_MEAN, SIGLIP_STD


def read_hf_siglip_vision(folder: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(VisionConfig, state_dict) of the SigLIP tower in a SiglipVisionModel, SiglipModel or LLaVA folder.

    The state loads into VisionTower(config) strictly; the pooling head (`head.*`), which a LLaVA tower never
    uses, is dropped.
    """
    folder, hf = _read_config(folder)
    model_type = _expect_model_type(folder, hf, tuple(_TOWER_PREFIXES), "read_hf_siglip_vision")
    vision = hf if model_type == "siglip_vision_model" else hf.get("vision_config")
    tower_type = vision.get("model_type", "siglip_vision_model") if isinstance(vision, dict) else None
    if tower_type != "siglip_vision_model":
        raise ConfigError(f"{folder}: config.json key 'vision_config.model_type' is {tower_type!r}; "
                          "GhostVis's tower is SigLIP (siglip_vision_model)")
    get = {k: vision.get(k, default) for k, default in _SIGLIP_DEFAULTS.items()}
    if get["hidden_act"] != "gelu_pytorch_tanh":
        raise ConfigError(f"{folder}: config.json key 'hidden_act' of the vision model is "
                          f"{get['hidden_act']!r}; GhostVis's tower uses gelu_pytorch_tanh (SigLIP)")
    mean, std = _image_normalization(folder)
    config = _build(
        folder, VisionConfig,
        image_size=get["image_size"], patch_size=get["patch_size"], hidden_size=get["hidden_size"],
        num_layers=get["num_hidden_layers"], num_heads=get["num_attention_heads"],
        intermediate_size=get["intermediate_size"], layer_norm_eps=get["layer_norm_eps"],
        num_channels=get["num_channels"], image_mean=mean, image_std=std,
    )
    index = _weight_index(folder)
    probe = "embeddings.patch_embedding.weight"
    candidates = _TOWER_PREFIXES[model_type]
    prefix = next((p for p in candidates if p + probe in index), None)
    if prefix is None:
        raise CheckpointError(f"{folder}: missing tensor {candidates[0] + probe!r} (the vision tower's patch "
                              f"embedding; looked under the prefixes {', '.join(map(repr, candidates))})")
    shapes = siglip_param_shapes(config)
    state = _load_tensors(folder, index, {k: prefix + k for k in shapes})
    # Everything else under the tower's prefix must be ours or the pooling head; other prefixes (the text
    # model of SiglipModel, LLaVA's language model and projector) are not the tower's business.
    present = {k: state.get(k[len(prefix):], torch.empty(0)) for k in index
               if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    check_state_shapes(str(folder), present, {prefix + k: s for k, s in shapes.items()})
    return config, state

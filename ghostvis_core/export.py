"""Export to Hugging Face folders that transformers and vLLM load with no custom code.

`export_text(state, GPTConfig, tokenizer, out_dir)` writes a `LlamaForCausalLM`; `export_vlm(state, VLMConfig,
tokenizer, out_dir)` a `LlavaForConditionalGeneration` with a SigLIP tower, in the safetensors layout both
transformers 5 and vLLM accept (ARCHITECTURE.md, Export): `vision_tower.vision_model.*`,
`language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.linear_{1,2}.*`
(the mapping is `vlm.hf_llava_key(key, "export")`). A folder holds:

    config.json              architectures set; max_position_embeddings = the model's sequence_len
    model.safetensors        safetensors only; a tied lm_head is left out (HF and vLLM re-tie it)
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (Tokenizer.save: the one chat template)
    generation_config.json   bos / eos / pad ids (eos: the end-of-assistant token)
    processor_config.json, preprocessor_config.json   VLM only: LlavaProcessor + SiglipImageProcessor, so
                             the processor expands `<image>` to the tower's token count

Export works from objects (a state dict, its config and a Tokenizer), not from checkpoint folders, and
needs no transformers. The folder is written beside OUT_DIR and renamed into place: a reader never sees a
half-written export, and an existing OUT_DIR is refused unless overwrite=True, then replaced whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ghostvis_core.atomic import atomic_dir
from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.hf_import import WEIGHTS_FILE, check_state_shapes, llama_param_shapes, siglip_param_shapes
from ghostvis_core.tokenizer import ASSISTANT_END, Tokenizer
from ghostvis_core.vision_config import VisionConfig, VLMConfig
from ghostvis_core.vlm import hf_llava_key

__all__ = ["export_text", "export_vlm", "hf_llama_config_dict", "hf_siglip_config_dict"]

# SiglipImageProcessor's resampling filter (PIL.Image.BICUBIC); the data pipeline should resize the same way.
BICUBIC = 3


# ---------------------------------------------------------------------------------------------------------
# config.json contents


def hf_llama_config_dict(config: GPTConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """LlamaForCausalLM's config.json for our GPTConfig (every field our GPT's math depends on, explicit).

    tokenizer None (random weights in a benchmark): no special-token ids.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        # What the model was trained for: vLLM derives max_model_len from it and refuses longer prompts.
        "max_position_embeddings": config.sequence_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # transformers 4 readers look here; 5 folds it into rope_parameters
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        **(_token_ids(tokenizer) if tokenizer is not None else {}),
    }


def hf_siglip_config_dict(config: VisionConfig) -> dict[str, Any]:
    """SiglipVisionConfig's fields for our VisionConfig (as LLaVA's vision_config)."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_channels": config.num_channels,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": config.layer_norm_eps,
        "vision_use_head": False,
    }


def _hf_llava_config(config: VLMConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    text = hf_llama_config_dict(config.text, tokenizer)
    del text["architectures"]
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": hf_siglip_config_dict(config.vision),
        "image_token_index": config.image_token_id,
        "image_seq_length": config.num_image_tokens,
        "projector_hidden_act": "gelu",  # exact erf GELU, our MultiModalProjector's
        "multimodal_projector_bias": True,
        # The last encoder layer before post_layernorm (HF's hidden_states[-1]), every patch (no CLS to drop).
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": config.text.tie_embeddings,
        **_token_ids(tokenizer),
    }


def _eos_ids(tokenizer: Tokenizer) -> list[int]:
    # The end-of-assistant token is also the tokenizer's eos (tokenizer.eos_id); dict.fromkeys keeps one copy
    # of each id should the two ever differ.
    return list(dict.fromkeys([tokenizer.token_id(ASSISTANT_END), tokenizer.eos_id]))


def _token_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    eos = _eos_ids(tokenizer)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tokenizer.pad_id}


def _processor_configs(config: VLMConfig, tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    """processor_config.json (transformers 5: LlavaProcessor with the image processor nested) and
    preprocessor_config.json (the image processor alone, as transformers 4 and vLLM's readers look for it)."""
    v = config.vision
    image_processor = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": v.image_size, "width": v.image_size},
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
        "do_convert_rgb": True,
    }
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": tokenizer.id_to_token(config.image_token_id),
        # (image_size / patch_size)^2 tokens per <image>: "full" drops nothing (SigLIP has no CLS token)
        "patch_size": v.patch_size,
        "vision_feature_select_strategy": "full",
        "num_additional_image_tokens": 0,
    }
    return {
        "processor_config.json": {**processor, "image_processor": image_processor},
        "preprocessor_config.json": {**image_processor, "processor_class": "LlavaProcessor"},
    }


# ---------------------------------------------------------------------------------------------------------
# Checks and writing


def _check_tokenizer(config: GPTConfig, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"export: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}; ids past the embedding would break transformers and vLLM: export with "
            "the tokenizer the model was trained with"
        )


def _untie(state: dict[str, torch.Tensor], head: str, embed: str, tied: bool) -> dict[str, torch.Tensor]:
    """The state without the tied head (HF expects it absent and re-ties; vLLM fails on both, #6758)."""
    if not tied or head not in state:
        return state
    if not torch.equal(state[head], state[embed]):
        raise CheckpointError(f"export: the config ties embeddings but {head!r} differs from {embed!r}; "
                              "the state does not belong to this config")
    return {k: v for k, v in state.items() if k != head}


def _tensors_for_file(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """CPU contiguous detached copies for safetensors, and the dtype name config.json records."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"export: the state mixes dtypes {sorted(dtypes)}; cast it to one dtype first")
    return tensors, dtypes.pop()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_export(out_dir: str | os.PathLike, overwrite: bool, files: dict[str, dict[str, Any]],
                  tensors: dict[str, torch.Tensor], tokenizer: Tokenizer, max_length: int,
                  extra_files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write config/json files, model.safetensors and the tokenizer into a temp folder, then rename it."""
    final = Path(out_dir)
    if final.exists() and not (overwrite and final.is_dir()):
        what = "a file" if not final.is_dir() else "a folder"
        fix = ", or pass overwrite=True (--overwrite) to replace it" if final.is_dir() else ""
        raise ConfigError(f"export: {final} already exists ({what}); choose a new OUT_DIR{fix}")
    with atomic_dir(final) as tmp:  # replaces an existing folder whole (overwrite=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(tmp)
        tok_config_path = tmp / "tokenizer_config.json"
        tok_config = json.loads(tok_config_path.read_text("utf-8"))
        # transformers' default is "unbounded"; the model's context is the honest bound
        _write_json(tok_config_path, {**tok_config, "model_max_length": max_length})
        for name, obj in {**files, **(extra_files or {})}.items():
            _write_json(tmp / name, obj)
    return final


def _generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": _eos_ids(tokenizer),
            "pad_token_id": tokenizer.pad_id}


def export_text(model_state: dict[str, torch.Tensor], config: GPTConfig, tokenizer: Tokenizer,
                out_dir: str | os.PathLike, *, overwrite: bool = False,
                extra_files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a GPT's state dict as an HF LlamaForCausalLM folder at out_dir; returns its path.

    extra_files: more JSON files written into the folder in the same atomic step (name -> object)."""
    _check_tokenizer(config, tokenizer)
    state = _untie(dict(model_state), "lm_head.weight", "model.embed_tokens.weight", config.tie_embeddings)
    check_state_shapes("export", state, llama_param_shapes(config))
    tensors, dtype = _tensors_for_file(state)
    files = {
        "config.json": {**hf_llama_config_dict(config, tokenizer), "dtype": dtype},
        "generation_config.json": _generation_config(tokenizer),
    }
    return _write_export(out_dir, overwrite, files, tensors, tokenizer, config.sequence_len, extra_files)


def _vlm_param_shapes(config: VLMConfig) -> dict[str, tuple[int, ...]]:
    """Our VLM's state-dict keys and shapes (lm_head only when untied)."""
    W, Hp, C = config.vision.hidden_size, config.projector_hidden, config.text.n_embd
    shapes = {f"language_model.{k}": s for k, s in llama_param_shapes(config.text).items()}
    shapes.update({f"vision_tower.{k}": s for k, s in siglip_param_shapes(config.vision).items()})
    shapes.update({
        "multi_modal_projector.linear_1.weight": (Hp, W), "multi_modal_projector.linear_1.bias": (Hp,),
        "multi_modal_projector.linear_2.weight": (C, Hp), "multi_modal_projector.linear_2.bias": (C,),
    })
    return shapes


def export_vlm(model_state: dict[str, torch.Tensor], config: VLMConfig, tokenizer: Tokenizer,
               out_dir: str | os.PathLike, *, overwrite: bool = False,
               extra_files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a VLM's state dict as an HF LlavaForConditionalGeneration folder (SigLIP tower); returns it.

    extra_files: as export_text."""
    _check_tokenizer(config.text, tokenizer)
    if config.projector_hidden != config.text.n_embd:
        raise ConfigError(
            f"export: projector_hidden={config.projector_hidden} differs from the text width "
            f"{config.text.n_embd}; LLaVA's projector has only that width, so this VLM cannot be "
            "exported as LLaVA"
        )
    if tokenizer.image_id != config.image_token_id:
        raise ConfigError(
            f"export: the VLM's image_token_id is {config.image_token_id} but the tokenizer's <image> is "
            f"{tokenizer.image_id}; LLaVA's image_token_index must be the tokenizer's <image> id"
        )
    state = _untie(dict(model_state), "language_model.lm_head.weight",
                   "language_model.model.embed_tokens.weight", config.text.tie_embeddings)
    check_state_shapes("export", state, _vlm_param_shapes(config))
    tensors, dtype = _tensors_for_file({hf_llava_key(k, "export"): v for k, v in state.items()})
    files = {
        "config.json": {**_hf_llava_config(config, tokenizer), "dtype": dtype},
        "generation_config.json": _generation_config(tokenizer),
        **_processor_configs(config, tokenizer),
    }
    return _write_export(out_dir, overwrite, files, tensors, tokenizer, config.text.sequence_len, extra_files)

"""Prompts of vision (VLM) runs for the batched engine: a chat whose user turns may hold images becomes token
ids with each `<image>` expanded to the tower's P tokens, and, when images are present, the input embeddings
(1, T, C) with each image's features spliced in at its run (VLM.embed), which the engine prefills from.

Images are re-encoded for every turn of a chat that keeps them (the tower is small next to the decode)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ghostvis_core.errors import ConfigError


def user_turn(text: str, image: bool) -> dict:
    """A user message: the text alone, or an image part then "\\n" + text (the layout of LLaVA training data)."""
    if not image:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + text}]}


def chat_ids(loaded, messages: list[dict]) -> list[int]:
    """Template ids of a VLM chat ending in the assistant's start, every `<image>` expanded to P ids."""
    from ghostvis_core.data.image_dataset import expand_image_tokens

    tok = loaded.tokenizer
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    return expand_image_tokens(ids, mask, tok.image_id, loaded.model.config.num_image_tokens)[0].tolist()


def image_prompt(loaded, ids: list[int], images: Sequence[str | Path]):
    """The engine prompt of `ids`: the ids themselves without images, else embeddings (1, T, C) with the
    images' features (in order) at the expanded `<image>` runs; a missing or unreadable image is one error."""
    if not images:
        return ids
    pixels = _pixels(loaded, images)
    with torch.no_grad():
        return loaded.model.embed(torch.tensor([ids], device=pixels.device), pixels)


def batch_prompt(loaded, text: str, image: Path | None):
    """The engine prompt of one --batch-file line on a vision run: the chat ids of a user turn, and with an image
    a LazyPrompt whose embeddings are made when the request gets a row (the tower runs in the scheduler's
    thread, and no batch holds every image's features at once)."""
    from ghostvis_core.scheduler import LazyPrompt

    ids = chat_ids(loaded, [user_turn(text, image is not None)])
    if image is None:
        return ids
    return LazyPrompt(lambda: image_prompt(loaded, ids, [image]), len(ids))


def require_vision_run(loaded, what: str) -> None:
    """One message when `what` (an image the user gave) meets a run trained on text only."""
    if loaded.data_format != "image-chat":
        raise ConfigError(f"{what}: run {loaded.checkpoint.parent} is a text model ({loaded.recipe}, "
                          "trained on text only) and cannot see images; pick a vision run (vision_pretrain or an "
                          "image chat_sft) or drop the image")


def _pixels(loaded, images: Sequence[str | Path]) -> torch.Tensor:
    """(N, C, S, S) pixels of the images for the tower, on the model's device and in its dtype."""
    from ghostvis_core.data.images import load_image

    vision = loaded.model.config.vision
    for path in images:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such image file")
    param = next(loaded.model.parameters())
    pixels = torch.stack([load_image(p, vision.image_size, vision.image_mean, vision.image_std) for p in images])
    return pixels.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def generate_vlm_text(loaded, prompt: str, max_new_tokens: int, sampling, image: str | Path | None,
                      use_cache: bool = True, warn_capped: bool = True) -> str:  # fmt: skip
    """engine.generate_text for a vision run: one user turn (with `image` when given) through the engine;
    use_cache=False recomputes through VLM.generate (the reference path: greedy or top-k only)."""
    require_vision_run(loaded, f"--image {image}")
    if not prompt.strip():
        raise ConfigError("the prompt is empty: pass some text (--prompt TEXT)")
    if image is not None and not Path(image).is_file():
        raise ConfigError(f"--image {image}: no such image file")
    ids = chat_ids(loaded, [user_turn(prompt, image is not None)])
    images = [image] if image is not None else []
    if use_cache:
        request = image_prompt(loaded, ids, images)
        return loaded.engine.generate_many([request], sampling, max_new_tokens, batch_size=1,
                                           warn_capped=warn_capped)[0].text  # fmt: skip
    return _recompute_reference(loaded, ids, images, max_new_tokens, sampling)


def _recompute_reference(loaded, ids: list[int], images: list, max_new_tokens: int, sampling) -> str:
    """VLM.generate without a cache: every step runs the whole sequence (tests compare the engine to it)."""
    from ghostvis_core.models import text_config

    if sampling.top_p < 1 or sampling.stop:
        raise ConfigError("--top-p and --stop need the KV-cache engine; drop them for the recompute reference")
    limit = text_config(loaded.model.config).sequence_len
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    if max_new_tokens < 1:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context is {limit}: shorten it")
    param = next(loaded.model.parameters())
    pixels = _pixels(loaded, images) if images else None
    generator = torch.Generator(device=param.device).manual_seed(sampling.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=param.device)
    out = loaded.model.generate(idx, pixels, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                                generator=generator, use_cache=False)  # fmt: skip
    new = out[0, len(ids):].tolist()
    stops = set(loaded.stop_token_ids)
    for i, token in enumerate(new):
        if token in stops:
            new = new[:i]
            break
    return loaded.tokenizer.decode(new, skip_special=True)

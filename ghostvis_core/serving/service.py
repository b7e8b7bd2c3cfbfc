"""The served model: requests in the API's terms become engine requests on one shared scheduler.

Chat messages go through the run's one chat template (tokenizer.encode_chat, as training and `ghostvis infer`
render them); each image part becomes an `<image>` expanded to the tower's tokens per image
(data/image_dataset.expand_image_tokens), and the prompt is prefilled by embeddings (VLM.embed: the image
features spliced into the text) inside the scheduler's thread. /v1/completions continues plain text after BOS,
or takes token ids as they are.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ghostvis_core.batch_engine import Engine
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.models import language_model
from ghostvis_core.sampling import SamplingParams
from ghostvis_core.scheduler import Completion, Request, Scheduler
from ghostvis_core.serving.limits import ApiError, ServeLimits, image_pixels
from ghostvis_core.serving.schemas import ChatCompletionRequest, CompletionRequest, ImageContent


@dataclass
class Prepared:
    """A prompt ready for the engine: token ids (images expanded) and the images' pixels (N, 3, S, S)."""

    ids: list[int]
    pixels: torch.Tensor | None = None


class ServedModel:
    """One model behind the API: its engine, its scheduler (started by `start()`), and prompt building.

    model: a GPT or a VLM; tokenizer None for a random-weight benchmark model (token-id prompts only).
    max_model_len: cache slots per row, prompt and reply together (default and most: the model's context).
    kv_cache_dtype: the engine's cache storage, auto or fp8 (kv_cache.py).
    """

    def __init__(self, model, tokenizer, name: str, *, is_chat: bool, stop_token_ids=(), batch_size: int = 8,
                 sync_every: int = 8, limits: ServeLimits | None = None, max_model_len: int | None = None,
                 kv_cache_dtype: str = "auto"):  # fmt: skip
        self.model = model
        self.lm = language_model(model)
        self.vlm = model if self.lm is not model else None
        self.tokenizer = tokenizer
        self.name = name
        self.is_chat = is_chat
        self.limits = limits or ServeLimits()
        banned = (self.vlm.config.image_token_id,) if self.vlm is not None else ()
        self.engine = Engine(self.lm, tokenizer, stop_token_ids=stop_token_ids, banned_token_ids=banned,
                             kv_cache_dtype=kv_cache_dtype)
        self.context_len = self.lm.config.sequence_len
        if max_model_len is not None:
            if not 2 <= max_model_len <= self.context_len:
                raise ConfigError(f"--max-model-len must be in 2..{self.context_len} (the model's context), got "
                                  f"{max_model_len}")
            self.context_len = max_model_len
        self.scheduler = Scheduler(self.engine, batch_size, self.context_len, sync_every)

    @classmethod
    def from_loaded(cls, loaded, name: str | None = None, **kwargs) -> ServedModel:
        """Serve an engine.LoadedModel (load_for_inference, or bench's random_model)."""
        if name is None:
            name = loaded.checkpoint.parent.name if loaded.checkpoint is not None else loaded.recipe
        stops = loaded.stop_token_ids if loaded.tokenizer is not None else ()
        return cls(loaded.model, loaded.tokenizer, name, is_chat=loaded.is_chat and loaded.tokenizer is not None,
                   stop_token_ids=stops, **kwargs)  # fmt: skip

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    # -- prompts --------------------------------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> Prepared:
        if self.tokenizer is None:
            raise ApiError(400, f"model {self.name} has no tokenizer (random weights): use /v1/completions with "
                           "a prompt of token ids", param="messages")  # fmt: skip
        if not self.is_chat:
            raise ApiError(400, f"model {self.name} is a base model (trained on plain text, not chats): use "
                           "/v1/completions", param="messages")  # fmt: skip
        messages, pixels = [], []
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for j, part in enumerate(m.content):
                if isinstance(part, ImageContent):
                    pixels.append(self._pixels(part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
            messages.append({"role": m.role, "content": parts})
        try:
            ids, mask = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        if not pixels:
            return Prepared(ids)
        from ghostvis_core.data.image_dataset import expand_image_tokens

        P = self.vlm.config.num_image_tokens
        expanded = expand_image_tokens(ids, mask, self.tokenizer.image_id, P)[0].tolist()
        return Prepared(expanded, torch.stack(pixels))

    def _pixels(self, url: str, param: str) -> torch.Tensor:
        if self.vlm is None:
            raise ApiError(400, f"model {self.name} is a text model and cannot see images: drop the image_url "
                           "part, or serve a vision run", param=param, code="images_not_supported")  # fmt: skip
        v = self.vlm.config.vision
        return image_pixels(url, self.limits, param, v.image_size, v.image_mean, v.image_std)

    def completion_prompt(self, req: CompletionRequest) -> Prepared:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            vocab = self.lm.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            return Prepared(list(prompt))
        if self.tokenizer is None:
            raise ApiError(400, f"model {self.name} has no tokenizer (random weights): send the prompt as token "
                           "ids", param="prompt")  # fmt: skip
        return Prepared([self.tokenizer.bos_id, *self.tokenizer.encode(prompt)])

    # -- generation -----------------------------------------------------------------------------------------

    def budget(self, num_prompt: int, max_tokens: int | None) -> int:
        """Tokens the request may generate; ApiError for an empty or too long prompt or max_tokens too high."""
        limit = self.limits.max_prompt_tokens or self.context_len - 1
        if num_prompt == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if num_prompt > min(limit, self.context_len - 1):
            raise ApiError(400, f"the prompt is {num_prompt} tokens; this server takes at most "
                           f"{min(limit, self.context_len - 1)} (the model's context is {self.context_len})",
                           param="messages", code="context_length_exceeded")  # fmt: skip
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {self.limits.max_tokens} "
                           "(--max-tokens)", param="max_tokens")  # fmt: skip
        return min(max_tokens or self.limits.max_tokens, self.context_len - num_prompt)

    def sampling(self, req) -> SamplingParams:
        if req.n != 1:
            raise ApiError(400, f"n={req.n}: this server makes one choice per request (n=1)", param="n")
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        try:
            return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                                  stop=req.stop_strings(), ignore_eos=req.ignore_eos)  # fmt: skip
        except ConfigError as e:
            raise ApiError(400, str(e).replace("--", ""), param="stop") from None

    def submit(self, prepared: Prepared, sampling: SamplingParams, budget: int, *,
               on_text: Callable[[str], None] | None, on_tokens: Callable[[list[int]], None] | None,
               on_finish: Callable[[Completion], None], on_error: Callable[[BaseException], None]) -> Request:
        """Queue a request on the shared scheduler; returns it (cancel() frees its row)."""
        prompt: object = prepared.ids
        if prepared.pixels is not None:
            vlm, ids, pixels = self.vlm, prepared.ids, prepared.pixels

            def prompt() -> torch.Tensor:  # runs in the scheduler's thread, on the model's device
                param = next(vlm.parameters())
                idx = torch.tensor([ids], dtype=torch.long, device=param.device)
                return vlm.embed(idx, pixels.to(device=param.device, dtype=param.dtype))

        request = Request(prompt, len(prepared.ids), budget, sampling, on_text=on_text, on_tokens=on_tokens,
                          on_finish=on_finish, on_error=on_error)  # fmt: skip
        return self.scheduler.submit(request)

    def describe(self) -> dict:
        """The model's entry in /v1/models."""
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "ghostvis",
                "max_model_len": self.context_len, "vocab_size": self.lm.config.vocab_size, "vision": self.vlm is not None,
                "tokenizer": self.tokenizer is not None}  # fmt: skip

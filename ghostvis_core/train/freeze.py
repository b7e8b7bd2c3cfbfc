"""Freezing parts of a model: `freeze=vision,projector,llm` or `freeze=llm:N`.

Parts are optim.model_part's: vision (a VLM's tower), projector, llm (a GPT, or a VLM's text decoder).
`llm:N` freezes the language model except its last N decoder blocks, its final norm and lm_head (with tied
embeddings the shared matrix is lm_head, so it trains). A frozen parameter gets requires_grad False, so it is
in no optimizer group and has no optimizer state (optim.split_params skips it).

The tower's post_layernorm is always frozen: the projector reads the last encoder layer before it (LLaVA's
vision_feature_layer=-1), so it is on no gradient path, and DDP would wait forever for its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghostvis_core.errors import ConfigError
from ghostvis_core.optim import MODEL_PARTS, model_part


@dataclass(frozen=True)
class FreezeSpec:
    """Parsed freeze setting: whole parts frozen, and for llm:N the number of trailing blocks kept."""

    parts: frozenset[str]
    llm_trainable_blocks: int | None = None
    """N of llm:N (the llm is then not in `parts`), else None."""

    def describe(self) -> str:
        """'vision, llm' / 'llm except its last 2 blocks' / 'nothing'."""
        names = [p for p in MODEL_PARTS if p in self.parts]
        if self.llm_trainable_blocks is not None:
            names.append(f"llm except its last {self.llm_trainable_blocks} block(s)")
        return ", ".join(names) or "nothing"


def parse_freeze(text: str | None) -> FreezeSpec:
    """FreezeSpec of a `freeze=` value ("" or None: nothing); ConfigError naming the bad item."""
    parts: set[str] = set()
    keep = None
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("llm:"):
            n = item[len("llm:"):]
            if not n.isdigit():
                raise ConfigError(f"freeze={text}: {item!r} needs a block count, e.g. llm:2 (all but the last 2 "
                                  "decoder blocks frozen)")
            keep = int(n)
        elif item in MODEL_PARTS:
            parts.add(item)
        else:
            raise ConfigError(f"freeze={text}: unknown part {item!r}; use any of {', '.join(MODEL_PARTS)} "
                              "or llm:N (comma-separated)")
    if keep is not None and "llm" in parts:
        raise ConfigError(f"freeze={text}: give llm or llm:N, not both")
    return FreezeSpec(frozenset(parts), keep)


def apply_freeze(model: torch.nn.Module, spec: FreezeSpec) -> tuple[int, int]:
    """Set requires_grad per `spec` on the raw (unwrapped) model; returns (trainable, frozen) parameter counts.

    Call it before the model is wrapped (DDP / FSDP2 read requires_grad when they wrap).
    """
    names = dict(model.named_parameters())
    present = {model_part(n) for n in names}
    missing = sorted((spec.parts | ({"llm"} if spec.llm_trainable_blocks is not None else set())) - present)
    if missing:
        raise ConfigError(f"freeze: this model has no {missing[0]} part (its parts: "
                          f"{', '.join(p for p in MODEL_PARTS if p in present)}); drop {missing[0]} from freeze")
    keep_llm = _llm_trainable_names(model, spec.llm_trainable_blocks)
    for name, p in names.items():
        part = model_part(name)
        frozen = part in spec.parts or (keep_llm is not None and part == "llm" and name not in keep_llm)
        p.requires_grad_(not frozen)
    post_norm = getattr(getattr(model, "vision_tower", None), "post_layernorm", None)
    if post_norm is not None:
        post_norm.requires_grad_(False)
    # a tied weight is one Parameter under two names: requires_grad is its last setting; count it once
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return trainable, sum(p.numel() for p in unique) - trainable


def _llm_trainable_names(model: torch.nn.Module, n: int | None) -> set[str] | None:
    """Parameter names llm:N keeps trainable (last n blocks, final norm, lm_head), or None without llm:N."""
    if n is None:
        return None
    from ghostvis_core.models import language_model

    gpt = language_model(model)
    prefix = "language_model." if gpt is not model else ""
    layers = gpt.model.layers
    if not 0 < n <= len(layers):
        raise ConfigError(f"freeze=llm:{n}: the language model has {len(layers)} blocks; N must be 1.."
                          f"{len(layers)} (freeze=llm freezes all of it)")
    keep = [f"model.layers.{i}." for i in range(len(layers) - n, len(layers))] + ["model.norm.", "lm_head."]
    # tied: lm_head.weight is the embedding, listed by named_parameters under its first name
    tied_head = {name for name, p in gpt.named_parameters() if p is gpt.lm_head.weight}
    return {prefix + name for name, _ in gpt.named_parameters()
            if any(name.startswith(k) for k in keep) or name in tied_head}

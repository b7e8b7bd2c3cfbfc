"""Named model presets: nanochat-style depth scaling and the small VLM text decoder.

`get_config(depth)` follows nanochat: width = 64 * depth, heads of 128 channels, so depth alone sets the
model size (d12: 768 wide, d20: 1280 wide / 564M parameters at vocab 65536, d26: 1664 wide).
"""

from __future__ import annotations

from collections.abc import Callable

from ghostvis_core.config import GPTConfig
from ghostvis_core.errors import ConfigError, closest_match


def get_config(depth: int, vocab_size: int = 65536, **overrides) -> GPTConfig:
    """nanochat-style decoder: n_layer=depth, n_embd=64*depth, head_dim 128, plain MHA, untied."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2 or depth % 2:
        raise ConfigError(
            f"depth must be an even integer >= 2 (n_embd = 64*depth, heads of 128), got {depth!r}"
        )
    n_embd = 64 * depth
    n_head = max(1, n_embd // 128)
    fields = dict(n_layer=depth, n_head=n_head, n_kv_head=n_head, n_embd=n_embd, vocab_size=vocab_size)
    fields.update(overrides)
    return GPTConfig(**fields)


def get_vlm_small_config(depth: int = 8, vocab_size: int = 16384, **overrides) -> GPTConfig:
    """Text decoder of a small VLM: n_embd=64*depth, heads of 64, 2x GQA, tied embeddings, modest vocab."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2 or depth % 2:
        raise ConfigError(
            f"depth must be an even integer >= 2 (n_embd = 64*depth, heads of 64), got {depth!r}"
        )
    n_embd = 64 * depth
    n_head = depth  # head_dim 64
    n_kv_head = n_head // 2 if n_head % 2 == 0 else n_head
    fields = dict(
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        sequence_len=2048,
        tie_embeddings=True,
    )
    fields.update(overrides)
    return GPTConfig(**fields)


def _tiny(vocab_size: int = 4096, **overrides) -> GPTConfig:
    """4 layers, 256 wide, 4 heads of 64 (2 KV heads), tied: trains on a laptop CPU in a minute."""
    fields = dict(
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        n_embd=256,
        vocab_size=vocab_size,
        sequence_len=256,
        tie_embeddings=True,
    )
    fields.update(overrides)
    return GPTConfig(**fields)


PRESETS: dict[str, tuple[str, Callable[..., GPTConfig]]] = {
    "tiny": ("CPU demo: 4 layers x 256, heads of 64, 2 KV heads, tied, vocab 4096 (4.2M params)", _tiny),
    "small": (
        "small VLM text decoder: 8 layers x 512, heads of 64, 2x GQA, tied, vocab 16384 (32M params)",
        lambda **kw: get_vlm_small_config(8, **kw),
    ),
    "d12": (
        "nanochat d12: 12 layers x 768, 6 heads of 128, vocab 65536 (186M params)",
        lambda **kw: get_config(12, **kw),
    ),
    "d20": (
        "nanochat d20: 20 layers x 1280, 10 heads of 128, vocab 65536 (564M params)",
        lambda **kw: get_config(20, **kw),
    ),
    "d26": (
        "nanochat d26: 26 layers x 1664, 13 heads of 128, vocab 65536 (1.09B params)",
        lambda **kw: get_config(26, **kw),
    ),
}


def get_preset(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a named preset (see PRESETS); unknown names raise ConfigError listing the presets."""
    if name not in PRESETS:
        close = closest_match(name, PRESETS)
        hint = f" (did you mean '{close}'?)" if close else ""
        raise ConfigError(f"unknown model preset '{name}'{hint}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name][1](**overrides)

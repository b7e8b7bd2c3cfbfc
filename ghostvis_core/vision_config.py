"""Configs of the vision tower and of the VLM: documented, validated dataclasses that round-trip through JSON.

`VisionConfig` describes the SigLIP-compatible ViT in `vision.py` (field names follow transformers'
`SiglipVisionConfig` where they mean the same thing, so an HF config maps field by field); `VLMConfig` holds a
text decoder config, a tower config, the projector width and the `<image>` token id (`vlm.py`). Validation
and unknown-key handling are config.py's, so every config error reads the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ghostvis_core.config import GPTConfig, _check_positive_int, _check_unit_interval, _from_known_keys
from ghostvis_core.errors import ConfigError, did_you_mean

# SigLIP normalises pixels to [-1, 1]: (x - 0.5) / 0.5 per channel (its image processor's mean and std).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(kw_only=True)
class VisionConfig:
    """Shape of the SigLIP-compatible vision tower (`ghostvis_core.vision.VisionTower`)."""

    image_size: int
    """Side of the square input image in pixels (SigLIP's image_size); images are resized to it."""
    patch_size: int
    """Side of one square patch (the conv kernel and stride); must divide image_size."""
    hidden_size: int
    """Width of the tower's residual stream (SigLIP's hidden_size)."""
    num_layers: int
    """Number of encoder layers (SigLIP's num_hidden_layers)."""
    num_heads: int
    """Attention heads; head_dim = hidden_size // num_heads (64 keeps every attention backend and vLLM's
    CPU attention open)."""
    intermediate_size: int
    """Hidden width of the tanh-GELU MLP (SigLIP's intermediate_size)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm (SigLIP's layer_norm_eps)."""
    num_channels: int = 3
    """Input channels (3 for RGB)."""
    image_mean: tuple[float, ...] = SIGLIP_MEAN
    """Per-channel mean subtracted from pixels in [0, 1] before the tower (SigLIP: 0.5)."""
    image_std: tuple[float, ...] = SIGLIP_STD
    """Per-channel std the centred pixels are divided by (SigLIP: 0.5, so pixels land in [-1, 1])."""

    def __post_init__(self) -> None:
        name = "VisionConfig"
        sizes = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        for key in (*sizes, "num_channels"):
            _check_positive_int(name, key, getattr(self, key))
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"VisionConfig.patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                "pick an image size that is a multiple of the patch size"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(
                f"VisionConfig.hidden_size={self.hidden_size} is not divisible by num_heads="
                f"{self.num_heads}; pick num_heads so that hidden_size // num_heads is the head dim "
                f"(e.g. num_heads={max(1, self.hidden_size // 64)})"
            )
        _check_unit_interval(name, "layer_norm_eps", self.layer_norm_eps)
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if isinstance(value, list):  # JSON gives lists
                value = tuple(value)
                setattr(self, key, value)
            if (
                not isinstance(value, tuple)
                or len(value) != self.num_channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ConfigError(
                    f"VisionConfig.{key} must be {self.num_channels} numbers (one per channel), got {value!r}"
                )
        if not all(0 < s < float("inf") for s in self.image_std):
            raise ConfigError(f"VisionConfig.image_std must be positive and finite, got {self.image_std!r}")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes: grid_size^2 (no CLS token, as SigLIP; vLLM counts the same)."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        out = dataclasses.asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        """Build from a dict; unknown keys raise ConfigError with a did-you-mean hint."""
        return _from_known_keys(cls, data)


# head_dim 32 (tiny) and 64 (base): both in vLLM's CPU attention list and FlashAttention's.
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128
    ),
    "siglip-base-224": dict(
        image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),
}
"""tiny: 16 tokens of width 64 for CPU tests and the laptop demo; siglip-base-224: the tower of
google/siglip-base-patch16-224 (196 tokens, 86M parameters without the pooling head)."""


def get_vision_config(name: str, **overrides) -> VisionConfig:
    """The named vision preset, with field overrides."""
    if name not in VISION_PRESETS:
        raise ConfigError(
            f"unknown vision preset {name!r}; choose one of {', '.join(VISION_PRESETS)}"
            + did_you_mean(name, VISION_PRESETS)
        )
    return VisionConfig(**{**VISION_PRESETS[name], **overrides})


@dataclass(kw_only=True)
class VLMConfig:
    """A LLaVA-style VLM (`ghostvis_core.vlm.VLM`): tower -> projector -> text decoder."""

    text: GPTConfig
    """The language model (a dict is accepted and built into a GPTConfig)."""
    vision: VisionConfig
    """The vision tower (a dict is accepted and built into a VisionConfig)."""
    image_token_id: int
    """Id of the `<image>` placeholder; each image is expanded at data time to vision.num_image_tokens
    consecutive copies of it. Must be below text.vocab_size (a LLaVA export stores it as
    image_token_index)."""
    projector_hidden: int | None = None
    """Hidden width of the projector (linear_1's output); None means text.n_embd, the only width LLaVA's
    projector has (any other width trains but cannot be exported as LLaVA). Resolved in __post_init__."""

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = GPTConfig.from_dict(self.text)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if not isinstance(self.text, GPTConfig) or not isinstance(self.vision, VisionConfig):
            raise ConfigError("VLMConfig.text must be a GPTConfig and VLMConfig.vision a VisionConfig")
        if self.projector_hidden is None:
            self.projector_hidden = self.text.n_embd
        _check_positive_int("VLMConfig", "projector_hidden", self.projector_hidden)
        tid = self.image_token_id
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < self.text.vocab_size:
            raise ConfigError(
                f"VLMConfig.image_token_id={tid!r} must be a token id in [0, {self.text.vocab_size}) "
                "(below text.vocab_size: the <image> token is a row of the embedding)"
            )
        if self.vision.num_image_tokens >= self.text.sequence_len:
            raise ConfigError(
                f"VLMConfig: one image is {self.vision.num_image_tokens} tokens, which does not fit "
                f"text.sequence_len={self.text.sequence_len} with any text; raise sequence_len or the "
                "patch size"
            )

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image (the tower's patch count)."""
        return self.vision.num_image_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, the text and vision configs nested."""
        return {
            "text": self.text.to_dict(),
            "vision": self.vision.to_dict(),
            "image_token_id": self.image_token_id,
            "projector_hidden": self.projector_hidden,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        """Build from a dict (nested text/vision dicts); unknown keys raise ConfigError."""
        return _from_known_keys(cls, data)

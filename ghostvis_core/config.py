"""Model and optimizer configs: documented, validated dataclasses that round-trip through JSON.

`GPTConfig` describes the Llama-compatible decoder in `gpt.py`; `OptimizerConfig` the optimizer built by
`optim.build_optimizer`. Both validate in `__post_init__` and raise `ConfigError` naming the field and the fix,
and `from_dict` rejects unknown keys with a did-you-mean hint (a typo in a config file is an error, not a
silently ignored key).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ghostvis_core.backend_names import ATTN_REQUESTS, NORM_REQUESTS, OPTIMIZER_REQUESTS
from ghostvis_core.errors import ConfigError, closest_match


def default_mlp_hidden(n_embd: int) -> int:
    """Llama's SwiGLU width: 8/3 * n_embd rounded up to a multiple of 128 (d=1280 -> 3456)."""
    # 8/3 keeps the 3-matrix SwiGLU MLP at the parameter count of a 4x two-matrix MLP;
    # multiples of 128 keep the matmuls on full tensor-core tiles.
    return 128 * math.ceil(8 * n_embd / 3 / 128)


def _unknown_keys_error(cls_name: str, unknown: list[str], known: list[str]) -> ConfigError:
    hints = []
    for key in unknown:
        close = closest_match(key, known)
        hints.append(f"'{key}'" + (f" (did you mean '{close}'?)" if close else ""))
    return ConfigError(
        f"{cls_name}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(sorted(known))}"
    )


def _from_known_keys(cls, data: dict[str, Any]):
    """cls(**data), after rejecting keys that are not fields of the dataclass."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise _unknown_keys_error(cls.__name__, unknown, known)
    return cls(**data)


def _check_positive_int(cls_name: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{cls_name}.{name} must be a positive integer, got {value!r}")


def _check_unit_interval(cls_name: str, name: str, value: Any) -> None:
    # a chained comparison is False for NaN, which `value <= 0` alone lets through
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{cls_name}.{name} must be in (0, 1), got {value!r}")


def _check_choice(cls_name: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{cls_name}.{name}={value!r} is not one of {', '.join(choices)}")


@dataclass(kw_only=True)
class GPTConfig:
    """Shape and backend requests of the Llama-compatible decoder (`ghostvis_core.gpt.GPT`)."""

    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Number of query heads; head_dim = n_embd // n_head (64 or 128 keeps every attention backend open)."""
    n_embd: int
    """Width of the residual stream (Llama's hidden_size)."""
    n_kv_head: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_head (plain multi-head attention).
    Must divide n_head. Resolved to an int in __post_init__."""
    vocab_size: int = 65536
    """Token vocabulary size (rows of the embedding and of lm_head)."""
    sequence_len: int = 2048
    """Longest training sequence (tokens per row); generation may run past it, RoPE has no table limit."""
    rope_theta: float = 10000.0
    """RoPE base: inv_freq = 1 / rope_theta^(arange(0, head_dim, 2) / head_dim) (Llama's rope_theta)."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with lm_head (Llama's tie_word_embeddings)."""
    mlp_hidden: int | None = None
    """SwiGLU hidden width (Llama's intermediate_size); None means 8/3 * n_embd rounded up to a multiple
    of 128, which gives nanochat-d20 width (1280) 3456 and 564M parameters at vocab 65536 untied.
    Resolved to an int in __post_init__."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's rsqrt (Llama's rms_norm_eps)."""
    use_flash_attn: bool = True
    """Allow FlashAttention-2 where the backend plan finds it usable; False keeps it out of every case."""
    use_fused_kernels: bool = True
    """Allow the fused Triton/apex RMSNorm and SwiGLU kernels; False uses the PyTorch formulas."""
    attn_backend: str = "auto"
    """Attention request (backend_names.AttnRequest): auto|flash|cudnn|sdpa_flash|efficient|flex|math, or a
    concrete backend name (flash_attn, sdpa_cudnn, ...). Anything but auto is a hard request: planning the run
    raises BackendUnavailableError when this machine can't run it."""
    norm_backend: str = "auto"
    """RMSNorm request: auto|triton|apex|torch (explicit requests are hard, like attn_backend)."""
    low_precision_residual: bool = False
    """Under autocast, keep the residual stream in the autocast dtype (bf16) instead of fp32, as nanochat
    does. Measured +1.2% tok/s at d20 on an H200; off by default because bf16 residual sums lose precision
    with depth."""

    def __post_init__(self) -> None:
        name = "GPTConfig"
        for key in ("n_layer", "n_head", "n_embd", "vocab_size", "sequence_len"):
            _check_positive_int(name, key, getattr(self, key))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive_int(name, "n_kv_head", self.n_kv_head)
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick n_head so that n_embd // n_head is the head dim (e.g. n_head={max(1, self.n_embd // 128)})"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"GPTConfig: head_dim={self.head_dim} must be even for RoPE; change n_head")
        if self.n_head % self.n_kv_head != 0:
            raise ConfigError(
                f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (grouped-query attention)"
            )
        if self.mlp_hidden is None:
            self.mlp_hidden = default_mlp_hidden(self.n_embd)
        _check_positive_int(name, "mlp_hidden", self.mlp_hidden)
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        _check_unit_interval(name, "norm_eps", self.norm_eps)
        for key in ("tie_embeddings", "use_flash_attn", "use_fused_kernels", "low_precision_residual"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"GPTConfig.{key} must be true or false, got {getattr(self, key)!r}")
        _check_choice(name, "attn_backend", self.attn_backend, ATTN_REQUESTS)
        _check_choice(name, "norm_backend", self.norm_backend, NORM_REQUESTS)
        if self.attn_backend in ("flash", "flash_attn") and not self.use_flash_attn:
            raise ConfigError(
                f"GPTConfig: attn_backend={self.attn_backend!r} contradicts use_flash_attn=False; drop one of them"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (resolved values, so config.json is explicit)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict (e.g. config.json); unknown keys raise ConfigError with a did-you-mean hint."""
        return _from_known_keys(cls, data)


@dataclass(kw_only=True)
class OptimizerConfig:
    """Optimizer choice and hyper-parameters for `ghostvis_core.optim.build_optimizer`."""

    backend: str = "auto"
    """auto|adamw|muon|apex_adam. auto takes the backend plan's choice. muon: torch.optim.Muon on the 2-D
    hidden matrices (attention and MLP projections) and AdamW on embeddings, lm_head and norm weights.
    adamw: torch AdamW on everything (fused=True on CUDA, foreach on CPU). apex_adam: apex FusedAdam."""
    lr: float = 1e-3
    """AdamW learning rate (every parameter under adamw/apex_adam; embeddings, lm_head, norms under muon)."""
    matrix_lr: float | None = None
    """Muon learning rate for the hidden matrices; None means the same as lr. Muon runs with
    adjust_lr_fn="match_rms_adamw" (update RMS scaled to AdamW's, 0.2 * sqrt(max(rows, cols))), so one lr
    scale serves both optimizers."""
    weight_decay: float = 0.0
    """Decoupled weight decay on 2-D matrices (hidden projections and lm_head); embeddings and norm weights
    never decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.95
    """Muon momentum (Nesterov)."""
    muon_impl: str = "fused"
    """fused: Polar Express over stacked same-shape matrices, compiled with the blocks, each rank
    orthogonalising its share (ghostvis_core/muon.py). reference: the previous eager Newton-Schulz version, kept
    to compare losses against."""
    muon_coefficients: str = "polar_express"
    """The fused Muon's iteration: polar_express (Amsel et al. 2025, as nanochat) or newton_schulz (torch.optim.Muon's
    quintic, the reference's), so the implementation can be compared with the reference at equal math."""
    vision_lr: float | None = None
    """Learning rate of every vision-tower parameter of a VLM (Muon matrices included); None = lr / matrix_lr."""
    projector_lr: float | None = None
    """Learning rate of the VLM's projector; None = lr / matrix_lr (nanoVLM trains it ~100x the backbones')."""
    llm_lr: float | None = None
    """Learning rate of the language model (a GPT's every parameter, a VLM's text decoder); None = lr /
    matrix_lr."""

    def __post_init__(self) -> None:
        _check_choice("OptimizerConfig", "backend", self.backend, OPTIMIZER_REQUESTS)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        for key in ("lr", "weight_decay", "eps"):
            value = getattr(self, key)
            # a chained comparison is False for NaN, which a plain `value < 0` check lets through
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"OptimizerConfig.{key} must be a finite number >= 0, got {value!r}")
        for key in ("matrix_lr", "vision_lr", "projector_lr", "llm_lr"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf
            ):
                raise ConfigError(f"OptimizerConfig.{key} must be a number >= 0 or null, got {value!r}")
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)
        ):
            raise ConfigError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        _check_choice("OptimizerConfig", "muon_impl", self.muon_impl, ("fused", "reference"))
        _check_choice("OptimizerConfig", "muon_coefficients", self.muon_coefficients,
                      ("polar_express", "newton_schulz"))
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"OptimizerConfig.momentum must be in [0, 1), got {self.momentum!r}")

    @property
    def resolved_matrix_lr(self) -> float:
        """Muon lr: matrix_lr, or lr when it is None."""
        return self.lr if self.matrix_lr is None else self.matrix_lr

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerConfig:
        """Build from a dict; unknown keys raise ConfigError with a did-you-mean hint."""
        return _from_known_keys(cls, data)

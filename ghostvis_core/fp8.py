"""fp8 training of the block linears through torchao's float8 training (`convert_to_float8_training`).

Whether fp8 runs is the plan's decision (backends._choose_fp8: a CUDA GPU of sm89+, sm90+ for rowwise, bf16
autocast, torchao present; a request that cannot run is an error there). This module only applies it: each
selected `nn.Linear` becomes a torchao `Float8Linear` (an nn.Linear subclass with the same `weight`, so the
optimizer roles, the state-dict keys and the parameter dtype are unchanged). Its forward casts input and weight to
float8 e4m3 with a dynamic scale (amax per tensor for tensorwise, per row for rowwise), multiplies with
`torch._scaled_mm` and casts the gradient (e5m2 under tensorwise) for the two backward GEMMs.

Selected: linears inside the decoder blocks (`...layers.N.self_attn.*_proj`, `...layers.N.mlp.*_proj`) whose
in and out features are both divisible by 16 (torch._scaled_mm's requirement). Left in the compute dtype: the
embedding, lm_head (its chunked loss multiplies the weight itself), the norms, the vision tower and projector
(small GEMMs where the casts cost more than they save) and any linear of odd size.

Checkpoints: the weights stay in the parameters' dtype, so a checkpoint of an fp8 run is an ordinary one and a
run without fp8 (or `ghostvis infer`) loads it. Under FSDP2 with tensorwise scaling the weights are all-gathered
in float8 (torchao's enable_fsdp_float8_all_gather; half the bytes of bf16).
"""

from __future__ import annotations

import dataclasses
import re

import torch.nn as nn

from ghostvis_core.backends import Choice
from ghostvis_core.errors import BackendUnavailableError

FP8_DIM_MULTIPLE = 16
_BLOCK_LINEAR = re.compile(r"(^|\.)model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$")


def fp8_eligible(fqn: str, module: nn.Module) -> bool:
    """Whether the linear `module` at name `fqn` trains in float8 (see the module docstring)."""
    if not isinstance(module, nn.Linear) or not _BLOCK_LINEAR.search(fqn):
        return False
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


def select_fp8_linears(model: nn.Module) -> tuple[list[str], list[str]]:
    """(converted, skipped): names of the block linears that would train in float8, and those skipped for their
    size."""
    converted, skipped = [], []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear) and _BLOCK_LINEAR.search(fqn):
            (converted if fp8_eligible(fqn, module) else skipped).append(fqn)
    return converted, skipped


def convert_to_fp8(model: nn.Module, choice: Choice, *, fsdp: bool = False) -> list[str]:
    """Swap the selected linears of `model` for torchao Float8Linear per the plan's fp8 `choice`, in place,
    before torch.compile and DDP/FSDP2 wrapping; returns the converted names ([] when choice is none)."""
    if choice.backend == "none":
        return []
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise BackendUnavailableError(
            f"fp8={choice.backend} needs torchao's float8 training, which does not import ({err}). "
            "Fix: pip install torchao==0.18.0, or drop --fp8"
        ) from err
    config = Float8LinearConfig.from_recipe_name(choice.backend)
    if fsdp and choice.backend == "tensorwise":
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    converted, _ = select_fp8_linears(model)
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fp8_eligible(fqn, m), config=config)
    return converted


LM_HEAD_FP8 = False
"""Whether a tensorwise fp8 run also trains lm_head in float8: the chunked loss's three GEMMs per chunk with
torch._scaled_mm (linear_cross_entropy, head_fp8), as nanochat converts its lm_head. Read at call time (the
bench's ghostvis_fp8_head row turns it on); off until it is measured faster on the d20 step with loss parity."""


def lm_head_in_fp8(choice: Choice, n_embd: int, vocab_size: int) -> bool:
    """The one place that decides whether the loss head runs in float8 (see LM_HEAD_FP8)."""
    return (LM_HEAD_FP8 and choice.backend == "tensorwise"
            and n_embd % FP8_DIM_MULTIPLE == 0 and vocab_size % FP8_DIM_MULTIPLE == 0)


def describe_fp8(model: nn.Module, choice: Choice) -> str:
    """One log line: which linears train in float8 and which were skipped for their size."""
    if choice.backend == "none":
        return "fp8: off (" + choice.reason + ")"
    converted, skipped = select_fp8_linears(model)
    line = f"fp8: {choice.label} on {len(converted)} block linears"
    config = getattr(model, "config", None)
    if config is not None and lm_head_in_fp8(choice, config.n_embd, config.vocab_size):
        line += " and lm_head (the chunked loss's GEMMs)"
    if skipped:
        line += f"; {len(skipped)} skipped (a dim not divisible by {FP8_DIM_MULTIPLE}: {skipped[0]}, ...)"
    return line

"""The backend plan's training-only choices: fp8 block linears and activation checkpointing.

Part of the one plan (backends.plan_run calls these; nothing else decides): fp8 runs only where float8 tensor
cores, bf16 autocast and torchao are all present, and a request that cannot run is a BackendUnavailableError
naming why (CPU, the GPU's compute capability, dtype, torchao missing), never a silent bf16 fallback.
"""

from __future__ import annotations

from ghostvis_core.backends import Choice, RunFacts
from ghostvis_core.env import EnvFacts
from ghostvis_core.errors import BackendUnavailableError
from ghostvis_core.hardware_limits import package_unavailable, sm_name

FP8_MIN_CC = {"tensorwise": (8, 9), "rowwise": (9, 0)}
"""float8 tensor cores start at Ada (sm89); the row-wise scaled GEMM (CUTLASS) is built for Hopper (sm90) on."""
FP8_LAYERS = ("the decoder blocks' attention projections and MLP linears with both dims divisible by 16; "
              "embedding, lm_head, norms and small layers stay in the compute dtype")


def fp8_unavailable(env: EnvFacts, facts: RunFacts) -> str | None:
    """Why the requested fp8 recipe cannot train here (None if it can)."""
    recipe = facts.fp8
    if facts.device_type != "cuda":
        return "fp8 training needs a CUDA GPU with float8 tensor cores (sm89+); this run is on the CPU"
    cc = env.capability
    if cc is None or cc < FP8_MIN_CC[recipe]:
        need = "sm89 (Ada) or newer" if recipe == "tensorwise" else "sm90 (Hopper) or newer"
        return f"fp8 {recipe} needs a GPU of {need}; this is {sm_name(cc)}"
    if facts.dtype != "bfloat16":
        return f"fp8 training runs under bf16 autocast, not {facts.dtype} (use dtype=bfloat16 or auto)"
    why = package_unavailable(env, "torchao", "torchao")
    if why is not None:
        return f"fp8 training uses torchao's float8 linears: {why.message}"
    return None


def choose_fp8(env: EnvFacts, facts: RunFacts) -> Choice:
    """The plan's fp8 choice: none when not requested; a request that cannot run here raises with the reason."""
    if facts.fp8 == "none":
        return Choice("none", "off", "not requested (--fp8 tensorwise|rowwise turns it on)")
    why = fp8_unavailable(env, facts)
    if why is not None:
        raise BackendUnavailableError(
            f"fp8={facts.fp8} was requested but cannot run here: {why}. Fix: train on an H100/H200 (or an sm89+ "
            "GPU for tensorwise) with torchao installed (pip install torchao==0.18.0), or drop --fp8"
        )
    version = env.package("torchao").version or ""
    label = f"torchao {version} float8 {facts.fp8}".replace("  ", " ")
    reason = "requested; " + FP8_LAYERS
    if facts.fsdp:
        reason += ("; FSDP2 all-gathers the weights in float8" if facts.fp8 == "tensorwise"
                   else "; FSDP2 all-gathers bf16 weights (float8 all-gather is tensorwise only)")
    if not facts.compiled:
        reason += "; eager: the scaling casts are not fused (compile for speed)"
    return Choice(facts.fp8, label, reason)


ACTIVATION_CHECKPOINTING_REASONS = {
    "none": "every block keeps its activations for backward",
    "full": "every block recomputes its forward in backward (torch.utils.checkpoint): block activations are "
            "not kept, at about one more forward of the blocks",
    "selective": "every other block recomputes its forward in backward: half the block activations for half "
                 "the recompute of full",
}


def choose_activation_checkpointing(facts: RunFacts) -> Choice:
    """The plan's activation-checkpointing choice (no hardware limit: any device recomputes)."""
    mode = facts.activation_checkpointing
    label = {"none": "off", "full": "every block", "selective": "every other block"}[mode]
    reason = ACTIVATION_CHECKPOINTING_REASONS[mode] + ("" if mode == "none" else "; requested")
    return Choice(mode, label, reason)

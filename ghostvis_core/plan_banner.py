"""The startup banner of a backend plan: which backend serves each case and why, logged once per process."""

from __future__ import annotations

from ghostvis_core.backends import BackendPlan
from ghostvis_core.log import first_time, get_logger


def format_banner(plan: BackendPlan) -> str:
    """The startup log: which backend serves each case and why (facts only, no speedup claims)."""
    attn = "; ".join(
        f"{case} {c.label}" + (f" ({c.reason})" if c.reason else "") for case, c in plan.attention.items()
    )
    lines = ["=== GhostVis backends ===", f"Attention: {attn}"]
    if plan.rms_norm.backend == plan.swiglu.backend and plan.rms_norm.reason == plan.swiglu.reason:
        what = {"triton": "Triton fused kernels", "torch": "PyTorch (F.rms_norm, silu(gate) * up)"}.get(
            plan.rms_norm.backend, plan.rms_norm.label
        )
        lines.append(f"RMSNorm, SwiGLU: {what} ({plan.rms_norm.reason})")
    else:
        lines.append(
            f"RMSNorm: {plan.rms_norm.label} ({plan.rms_norm.reason}); "
            f"SwiGLU: {plan.swiglu.label} ({plan.swiglu.reason})"
        )
    if plan.facts.purpose != "inference":
        lines.append(f"Optimizer: {plan.optimizer.label} ({plan.optimizer.reason})")
    lines.append(f"Inference: {plan.inference.label} ({plan.inference.reason})")
    if plan.facts.purpose == "inference":
        lines.append(f"Decode layers: {plan.decode_layers.label} ({plan.decode_layers.reason})")
    if plan.fp8.backend != "none":
        lines.append(f"fp8: {plan.fp8.label} ({plan.fp8.reason})")
    if plan.activation_checkpointing.backend != "none":
        ac = plan.activation_checkpointing
        lines.append(f"Activation checkpointing: {ac.label} ({ac.reason})")
    f = plan.facts
    compiled = "torch.compile" if f.compiled else "eager"
    lines.append(f"Run: {f.device_type}, {f.dtype}, {compiled}, {f.world_size} process(es)")
    return "\n".join(lines)


def log_plan(plan: BackendPlan) -> None:
    """Log the banner through the ghostvis logger, once per process (a run has one plan; a later one is not
    logged)."""
    if not first_time("backend plan banner"):
        return
    logger = get_logger()
    for line in format_banner(plan).splitlines():
        logger.info(line)

"""Optimizer backends: torch AdamW (fused on CUDA), apex FusedAdam, and Muon for hidden matrices.

`build_optimizer` returns one `GhostVisOptimizer`: a thin container over one or two torch optimizers whose
`param_groups` is the concatenation of theirs (the same dicts, so setting group["lr"] reaches the real
optimizer), with step / zero_grad / state_dict / load_state_dict. Every group carries "lr", "initial_lr" (the
configured lr a schedule multiplies) and "name" (matrix | head | embedding | scalar).

Parameter roles (one rule for any model, GPT or VLM):
  matrix     weights of nn.Linear layers other than lm_head: Muon under backend muon, else AdamW with decay
  head       lm_head.weight when it is not tied to the embedding: AdamW with decay
  embedding  nn.Embedding weights: AdamW, no decay
  scalar     everything else (norm weights, biases, conv kernels, learned positions): AdamW, no decay
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ghostvis_core.backends import BackendPlan
from ghostvis_core.config import OptimizerConfig
from ghostvis_core.errors import BackendUnavailableError, CheckpointError, ConfigError
from ghostvis_core.log import get_logger
from ghostvis_core.muon import NEWTON_SCHULZ, POLAR_EXPRESS, BatchedMuon, ReferenceMuon


class GhostVisOptimizer:
    """One optimizer-like object over several torch optimizers (e.g. Muon + AdamW)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], backend: str):
        self.optimizers = optimizers
        self.backend = backend

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of every inner optimizer (live dicts: edits reach the optimizer)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        """Per-parameter state of all inner optimizers."""
        out: dict = {}
        for opt in self.optimizers:
            out.update(opt.state)
        return out

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter."""
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (None by default, which skips a memset)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """State of every inner optimizer, in order; load_state_dict restores it exactly."""
        return {
            "backend": self.backend,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "kinds": [type(opt).__name__ for opt in self.optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict made by an optimizer built with the same backend for the same model."""
        kinds = [type(opt).__name__ for opt in self.optimizers]
        if state.get("kinds") != kinds:
            raise CheckpointError(
                f"optimizer state was saved for {state.get('kinds')} ({state.get('backend')}) but this run "
                f"builds {kinds} ({self.backend}); resume with the same optimizer backend"
            )
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"GhostVisOptimizer(backend={self.backend!r}, optimizers={[type(o).__name__ for o in self.optimizers]})"


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by role: matrix, head, embedding, scalar (each parameter once; ties deduped)."""
    roles: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            roles[id(module.weight)] = "embedding"
        elif isinstance(module, nn.Linear):
            for pname, p in module.named_parameters(recurse=False):
                if pname == "weight":
                    is_head = name.split(".")[-1] == "lm_head"
                    roles.setdefault(id(p), "head" if is_head else "matrix")
    out: dict[str, list[nn.Parameter]] = {"matrix": [], "head": [], "embedding": [], "scalar": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = roles.get(id(p), "scalar")
        if role == "matrix" and p.ndim != 2:
            role = "scalar"
        out[role].append(p)
    return out


def model_part(param_name: str) -> str:
    """The part a parameter belongs to: vision (a VLM's tower), projector, or llm (a GPT, a VLM's decoder)."""
    if param_name.startswith("vision_tower."):
        return "vision"
    if param_name.startswith("multi_modal_projector."):
        return "projector"
    return "llm"


def split_params_by_part(model: nn.Module) -> dict[str, dict[str, list[nn.Parameter]]]:
    """split_params' roles within each part present in the model ({part: {role: params}}, parts in
    MODEL_PARTS order; a part whose parameters are all frozen maps to empty lists)."""
    part_of = {id(p): model_part(name) for name, p in model.named_parameters()}
    out: dict[str, dict[str, list[nn.Parameter]]] = {}
    for part in MODEL_PARTS:
        if part in part_of.values():
            out[part] = {role: [] for role in ROLES}
    for role, params in split_params(model).items():
        for p in params:
            out[part_of[id(p)]][role].append(p)
    return out


MODEL_PARTS = ("vision", "projector", "llm")
ROLES = ("matrix", "head", "embedding", "scalar")


def _adamw(groups: list[dict], cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    # fused=True: one multi-tensor CUDA kernel per step; foreach on CPU (fused CPU AdamW is slower there).
    kwargs = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0, **kwargs)


def _count(params: list[nn.Parameter]) -> str:
    n = sum(p.numel() for p in params)
    return f"{len(params)} tensors, {n / 1e6:.2f}M params"


def _muon_kind(cfg: OptimizerConfig, plan: BackendPlan) -> str:
    if cfg.muon_impl == "reference":
        return "reference: Newton-Schulz per shape, eager"
    how = "compiled" if plan.compiled else "eager"
    ranks = f", split over {plan.facts.world_size} ranks" if plan.facts.world_size > 1 else ""
    iteration = {"polar_express": "Polar Express", "newton_schulz": "Newton-Schulz"}[cfg.muon_coefficients]
    return f"{iteration} per shape, {how}{ranks}"


def build_optimizer(
    model: nn.Module, opt_config: OptimizerConfig, plan: BackendPlan
) -> tuple[GhostVisOptimizer, str]:
    """The optimizer the run's plan chose for model; returns (optimizer, description).

    The plan was made from opt_config.backend (RunFacts.optimizer); a plan made from another request is a bug.
    Groups follow the model's parts (vision, projector, llm): each part's groups take optim.<part>_lr when it
    is set (Muon matrices too), else lr / matrix_lr; a model of several parts (a VLM) names its groups
    "<part>.<role>", a GPT keeps the plain role names. Frozen parameters (requires_grad False) are in no
    group and get no state.
    """
    assert opt_config.backend == plan.facts.optimizer, (
        f"optimizer backend {opt_config.backend!r} but the plan was made for {plan.facts.optimizer!r}"
    )
    backend = plan.optimizer.backend
    device_type = plan.device_type
    cfg = opt_config
    wd = cfg.weight_decay
    by_part = split_params_by_part(model)
    prefixed = len(by_part) > 1

    def group(part: str, name: str, params: list, default_lr: float, **extra) -> dict:
        part_lr = getattr(cfg, f"{part}_lr")
        return {"params": params, "lr": default_lr if part_lr is None else part_lr,
                "name": f"{part}.{name}" if prefixed else name, **extra}

    muon_groups, adam_groups = [], []
    for part, parts in by_part.items():
        if backend == "muon":
            muon_groups.append(group(part, "matrix", parts["matrix"], cfg.resolved_matrix_lr,
                                     weight_decay=wd))
            adam_groups += [
                group(part, "head", parts["head"], cfg.lr, weight_decay=wd),
                group(part, "embedding", parts["embedding"], cfg.lr, weight_decay=0.0),
                group(part, "scalar", parts["scalar"], cfg.lr, weight_decay=0.0),
            ]
        else:
            adam_groups += [
                group(part, "matrix", parts["matrix"] + parts["head"], cfg.lr, weight_decay=wd),
                group(part, "scalar", parts["embedding"] + parts["scalar"], cfg.lr, weight_decay=0.0),
            ]
    muon_groups = [g for g in muon_groups if g["params"]]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if muon_groups:
        # match_rms_adamw scales each update to AdamW's RMS (0.2*sqrt(max(rows, cols))), so matrix_lr
        # lives on the AdamW lr scale.
        kw = dict(lr=cfg.resolved_matrix_lr, weight_decay=wd, momentum=cfg.momentum, nesterov=True,
                  adjust_lr_fn="match_rms_adamw")
        if cfg.muon_impl == "reference":
            optimizers.append(ReferenceMuon(muon_groups, **kw))
        else:
            # compiled with the blocks (CUDA); several ranks split the orthogonalisation (muon.py)
            coefficients = {"polar_express": POLAR_EXPRESS, "newton_schulz": NEWTON_SCHULZ}[cfg.muon_coefficients]
            optimizers.append(BatchedMuon(muon_groups, compile=plan.compiled, ns_coefficients=coefficients,
                                          shard_across_ranks=plan.facts.world_size > 1, **kw))
    if adam_groups:
        if backend == "apex_adam":
            try:
                from apex.optimizers import FusedAdam
            except ImportError as err:
                raise BackendUnavailableError(
                    f"optimizer backend 'apex_adam' needs apex ({err}); `ghostvis install apex` or backend=adamw"
                ) from err
            optimizers.append(FusedAdam(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True))
        else:
            optimizers.append(_adamw(adam_groups, cfg, device_type))
    if not optimizers:
        raise ConfigError("every parameter of the model is frozen: nothing to train; unfreeze a part "
                          "(freeze=...)")
    muon_params = [p for g in muon_groups for p in g["params"]]
    adam_params = [p for g in adam_groups for p in g["params"]]
    if backend == "muon":
        description = (
            f"{plan.optimizer.label}: Muon ({_muon_kind(cfg, plan)}, lr {cfg.resolved_matrix_lr:g}, momentum "
            f"{cfg.momentum}, match_rms_adamw) on {_count(muon_params)}; AdamW (lr {cfg.lr:g}) on "
            f"{_count(adam_params)}"
        )
    else:
        description = f"{plan.optimizer.label} (lr {cfg.lr:g}) on {_count(adam_params)}"
    lrs = {part: getattr(cfg, f"{part}_lr") for part in by_part if getattr(cfg, f"{part}_lr") is not None}
    if lrs:
        description += "; per-part lr " + ", ".join(f"{part} {lr:g}" for part, lr in lrs.items())
    for opt in optimizers:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    get_logger().info(f"Using optimizer backend: {description}")
    return GhostVisOptimizer(optimizers, backend), description

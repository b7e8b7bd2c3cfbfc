"""Muon for the hidden matrices: momentum, then an orthogonalised update, batched over same-shape matrices.

Per parameter group, the matrices are bucketed by shape; for each bucket of K matrices (M, N):
  buf <- lerp(buf, g, 1 - mu);  u = lerp(g, buf, mu) (Nesterov) or buf
  X = stack(u) in the iteration dtype (update_dtype: bf16 on CUDA, fp32 on CPU), transposed to (K, min, max)
      so the Gram matrix A = X X^T is the small one
  X <- X / (safety * ||X||_F);  per step i with coefficients (a_i, b_i, c_i):
      A = X X^T;  B = b_i A + c_i A A;  X = a_i X + B X        (x -> a x + b x^3 + c x^5 on each singular value)
  p <- p (1 - lr wd) - lr * adjust(M, N) * X
The default coefficients are Polar Express (Amsel et al. 2025, arXiv 2505.16932; the 5-step table nanochat uses,
safety 1.01): the singular values of X land in about [0.85, 1.15]. torch.optim.Muon's Newton-Schulz quintic
(3.4445, -4.775, 2.0315) x 5 lands in about [0.68, 1.14] at the same cost.

Cost. The momentum update, the stack and the iterations of one bucket are one function, compiled (fullgraph)
when the run's blocks are compiled: the elementwise work fuses into a few kernels and each step is 3 batched
GEMMs over the bucket instead of 3 GEMMs per matrix. At d20 that is 3 buckets (80 of 1280x1280, 40 of 3456x1280,
20 of 1280x3456) instead of 140 matrices.

Several ranks. Each rank orthogonalises its share, ceil(K / world) consecutive matrices of a bucket, and one
all_gather_into_tensor (in update_dtype) gives every rank all K results, instead of every rank computing all of them:
  DDP: gradients are already all-reduced, so the momentum buffers stay replicated (every rank updates all of
       them, elementwise and cheap) and only the iterations are split.
  FSDP2: parameters, gradients and momentum buffers are DTensors sharded on rows; the momentum runs on the local
       shards, one all_gather assembles the full updates of the bucket, each rank orthogonalises its share, a
       second all_gather shares the results, and each rank applies its own rows.
The result equals the single-process update (same math per matrix), which tests/test_optim_muon.py checks on
2 gloo ranks. State is one "momentum_buffer" per parameter, shaped like it, as torch.optim.Muon keeps it, so
checkpoints (full tensors, sharded on load like their parameter) do not depend on the layout.

`ReferenceMuon` is the previous implementation (torch.optim.Muon's update batched per shape, eager, every rank
doing every matrix), kept as optim.muon_impl=reference to compare losses against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ghostvis_core.errors import BackendUnavailableError

# (a, b, c) per iteration.
POLAR_EXPRESS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.01
"""The Frobenius norm is inflated by 1% so the largest singular value starts below 1, where the table was fit."""
NEWTON_SCHULZ: tuple[tuple[float, float, float], ...] = ((3.4445, -4.775, 2.0315),) * 5
"""torch.optim.Muon's default quintic, repeated for its default 5 steps."""


ORTHOGONALIZE_FORMS = ("baddbmm", "pointwise", "symmetric")
"""How one iteration's products are spelled (same math, different kernels; bench/muon_bench.py times them):
  baddbmm    B = baddbmm(A, A, A, beta=b, alpha=c);  X = baddbmm(X, B, X, beta=a)   (the sums in the GEMM's
             fp32 epilogue, each product rounded once)
  pointwise  B = b A + c (A @ A);  X = a X + B @ X   (plain bmm, then the elementwise sums, fused by the compiler,
             over products already rounded to bf16: one more rounding per iteration)
  symmetric  A = X X^T and B = c A A^T + b A in kernels/gram_triton.py, which computes only the upper tiles of
             these symmetric products (about half their FLOPs) with baddbmm's fp32 epilogue; X as in baddbmm.
             A Triton kernel: CUDA, or the CPU under TRITON_INTERPRET=1 (tests)
Folding the sums into the Gram side instead, B = A (c A + b I), was tried and dropped: rounding c A + b I to
bf16 loses the diagonal (|b| is up to 22.5), 6.6e-2 from float64 where these two measure 2.8e-2 and 4.2e-2
(tests/test_optim_muon.py's (64, 96) case)."""
DEFAULT_ORTHOGONALIZE_FORM = "baddbmm"


def orthogonalize(X: torch.Tensor, coefficients: Sequence[tuple[float, float, float]], safety: float = 1.0,
                  eps: float = 1e-7, form: str | None = None) -> torch.Tensor:
    """The odd polynomial iteration above on a batch (K, M, N) in X's dtype; returns (K, M, N). form: one of
    ORTHOGONALIZE_FORMS (None: DEFAULT_ORTHOGONALIZE_FORM, read at call time)."""
    form = form or DEFAULT_ORTHOGONALIZE_FORM
    if form not in ORTHOGONALIZE_FORMS:
        raise ValueError(f"orthogonalize form {form!r}: expected one of {', '.join(ORTHOGONALIZE_FORMS)}")
    if form == "symmetric" and X.device.type != "cuda" and not _triton_interpret():
        raise BackendUnavailableError(
            "Muon's symmetric form runs a Triton kernel: it needs a CUDA GPU (or TRITON_INTERPRET=1 for tests); "
            f"this is {X.device.type}. Fix: use form 'baddbmm' or 'pointwise'")
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety).clamp(min=eps)
    for a, b, c in coefficients:
        if form == "symmetric":
            A = _sym_gram(X.contiguous(), None, 1.0, 0.0)
            B = _sym_gram(A, A, c, b)
            X = torch.baddbmm(X, B, X, beta=a)
            continue
        A = X @ X.mT
        if form == "baddbmm":
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        else:
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X.mT if transposed else X


def _triton_interpret() -> bool:
    from ghostvis_core.kernels.dispatch import triton_interpret

    return triton_interpret()


@torch.library.custom_op("ghostvis::sym_gram", mutates_args=())
def _sym_gram(X: torch.Tensor, C: torch.Tensor | None, alpha: float, beta: float) -> torch.Tensor:
    """kernels.gram_triton.sym_gram as an op a compiled (fullgraph) Muon step keeps in its graph."""
    from ghostvis_core.kernels.gram_triton import sym_gram

    return sym_gram(X, C, alpha, beta)


@_sym_gram.register_fake
def _(X, C, alpha, beta):
    return X.new_empty(X.shape[0], X.shape[1], X.shape[1])


def update_dtype(device: torch.device) -> torch.dtype:
    """The dtype the iterations run in (the one place): bf16 on CUDA, where its tensor cores double the GEMM
    rate; fp32 elsewhere. A CPU without native bf16 matrix units emulates bf16 GEMMs: on a 2-core AVX2 machine
    one Newton-Schulz pass over (20, 256, 1024) took 15.1 s in bf16 and 0.30 s in fp32, and the default CPU
    base_train step 9.5 s, almost all of it Muon."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def momentum_stack(grads: list[torch.Tensor], bufs: list[torch.Tensor], lo: int, hi: int, momentum: float,
                   nesterov: bool) -> torch.Tensor:
    """Update every momentum buffer in place; return the (hi - lo, M, N) stack of updates lo..hi-1, in
    update_dtype."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    dtype = update_dtype(grads[0].device)
    if hi == lo:  # a rank with no share of a small bucket
        return grads[0].new_empty((0, *grads[0].shape), dtype=dtype)
    if nesterov:
        updates = torch._foreach_lerp(grads[lo:hi], bufs[lo:hi], momentum)
    else:
        updates = bufs[lo:hi]
    return torch.stack(updates).to(dtype)


def momentum_orthogonalize(grads, bufs, lo: int, hi: int, momentum: float, nesterov: bool,
                           coefficients, safety: float, eps: float) -> torch.Tensor:
    """momentum_stack then orthogonalize: one bucket's update in one (compiled) function."""
    U = momentum_stack(grads, bufs, lo, hi, momentum, nesterov)
    return orthogonalize(U, coefficients, safety, eps)


_COMPILED: dict[Callable, Callable] = {}


def _maybe_compiled(fn: Callable, compile: bool) -> Callable:
    if not compile:
        return fn
    if fn not in _COMPILED:
        # dynamic=False: one graph per bucket shape (3 at d20), no symbolic shapes in the GEMMs
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


def adjust_ratio(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch.optim.Muon's lr adjustment: "original" sqrt(max(1, M/N)); "match_rms_adamw" 0.2 sqrt(max(M, N))."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: expected original or match_rms_adamw")


def momentum_buffers(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's "momentum_buffer" state (zeros, shaped and sharded like its gradient, on first use)."""
    bufs = []
    for p in params:
        state = optimizer.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        bufs.append(state["momentum_buffer"])
    return bufs


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


class BatchedMuon(torch.optim.Optimizer):
    """Muon over same-shape buckets, compiled, each rank orthogonalising its share (module docstring).

    shard_across_ranks: split the iterations over the default process group's ranks (the trainer sets it when
    world_size > 1; under DDP every rank must hold the same gradients, which DDP guarantees). Parameters that
    are DTensors (FSDP2) always go through the sharded path of their mesh.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: Sequence = POLAR_EXPRESS,
                 safety: float | None = None, eps: float = 1e-7, adjust_lr_fn: str | None = "match_rms_adamw",
                 compile: bool = False, shard_across_ranks: bool = False):
        coefficients = _coefficient_table(ns_coefficients)
        if safety is None:
            safety = POLAR_EXPRESS_SAFETY if coefficients == POLAR_EXPRESS else 1.0
        adjust_ratio(adjust_lr_fn, (1, 1))  # validates the name
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=coefficients, safety=safety, eps=eps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")
        self.compile = compile
        self.shard_across_ranks = shard_across_ranks

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon update of every matrix with a gradient, one batch per (group, shape)."""
        if closure is not None:
            raise ValueError("BatchedMuon.step takes no closure")
        for group in self.param_groups:
            buckets: dict[tuple, list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for (shape, _, _), params in buckets.items():
                self._step_bucket(group, shape, params)
        return None

    def _step_bucket(self, group: dict, shape: tuple[int, ...], params: list[nn.Parameter]) -> None:
        mu, nesterov = group["momentum"], group["nesterov"]
        coeffs, safety, eps = group["ns_coefficients"], group["safety"], group["eps"]
        bufs = momentum_buffers(self, params)
        grads = [_local(p.grad) for p in params]
        local_bufs = [_local(b) for b in bufs]
        K = len(params)
        if _is_dtensor(params[0]):
            X_local = self._sharded_dtensor_update(params, grads, local_bufs, group)
        else:
            group_ = dist.group.WORLD if self.shard_across_ranks and dist.is_initialized() else None
            world = dist.get_world_size(group_) if group_ is not None else 1
            if world == 1:
                fn = _maybe_compiled(momentum_orthogonalize, self.compile)
                X_local = fn(grads, local_bufs, 0, K, mu, nesterov, coeffs, safety, eps)
            else:
                rank = dist.get_rank(group_)
                lo, hi, chunk = _share(K, world, rank)
                fn = _maybe_compiled(momentum_orthogonalize, self.compile)
                X_own = fn(grads, local_bufs, lo, hi, mu, nesterov, coeffs, safety, eps)
                X_local = _gather_shares(X_own, chunk, world, shape, group_)[:K]
        lr, wd = group["lr"], group["weight_decay"]
        local_params = [_local(p) for p in params]
        if wd != 0:
            torch._foreach_mul_(local_params, 1 - lr * wd)
        scale = lr * adjust_ratio(group["adjust_lr_fn"], shape)
        torch._foreach_add_(local_params, list(X_local.to(local_params[0].dtype).unbind(0)), alpha=-scale)

    def _sharded_dtensor_update(self, params, grads, local_bufs, group) -> torch.Tensor:
        """FSDP2: momentum on the local row shards, full updates gathered, iterations split, own rows back."""
        mesh = params[0].device_mesh
        pg = mesh.get_group()
        world, rank = mesh.size(), mesh.get_local_rank()
        K = len(params)
        U_local = _maybe_compiled(momentum_stack, self.compile)(
            grads, local_bufs, 0, K, group["momentum"], group["nesterov"])
        M = params[0].shape[0]
        if M % world == 0:  # equal row shards: one collective for the whole bucket
            gathered = torch.empty((world * K, *U_local.shape[1:]), dtype=U_local.dtype, device=U_local.device)
            dist.all_gather_into_tensor(gathered, U_local, group=pg)
            U = gathered.view(world, *U_local.shape).transpose(0, 1).reshape(K, M, -1)
        else:
            from torch.distributed.tensor import DTensor

            U = torch.stack([
                DTensor.from_local(U_local[i], mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride()).full_tensor()
                for i, p in enumerate(params)
            ])
        lo, hi, chunk = _share(K, world, rank)
        X_own = _maybe_compiled(orthogonalize, self.compile)(U[lo:hi], group["ns_coefficients"], group["safety"],
                                                             group["eps"])
        X = _gather_shares(X_own, chunk, world, tuple(params[0].shape), pg)[:K]
        # Shard(0) splits rows as torch.chunk does
        return X.chunk(world, dim=1)[rank]


def _share(K: int, world: int, rank: int) -> tuple[int, int, int]:
    """This rank's matrices [lo, hi) of a bucket of K, and the padded share size ceil(K / world)."""
    chunk = -(-K // world)
    lo = min(rank * chunk, K)
    return lo, min(lo + chunk, K), chunk


def _gather_shares(X_own: torch.Tensor, chunk: int, world: int, shape: tuple[int, ...], pg) -> torch.Tensor:
    """All ranks' orthogonalised shares, (world * chunk, M, N) in rank order (a short last share zero-padded)."""
    padded = X_own
    if X_own.shape[0] < chunk:
        padded = torch.zeros((chunk, *shape), dtype=X_own.dtype, device=X_own.device)
        padded[: X_own.shape[0]] = X_own
    out = torch.empty((world * chunk, *shape), dtype=X_own.dtype, device=X_own.device)
    dist.all_gather_into_tensor(out, padded.contiguous(), group=pg)
    return out


def _coefficient_table(ns_coefficients: Sequence) -> tuple[tuple[float, float, float], ...]:
    """One (a, b, c) per iteration; a single triple means torch.optim.Muon's 5 steps of it."""
    items = tuple(ns_coefficients)
    if len(items) == 3 and all(isinstance(v, (int, float)) for v in items):
        return (tuple(float(v) for v in items),) * 5
    table = tuple(tuple(float(v) for v in t) for t in items)
    if not table or any(len(t) != 3 for t in table):
        raise ValueError(f"ns_coefficients: expected (a, b, c) triples, got {ns_coefficients!r}")
    return table


class ReferenceMuon(torch.optim.Muon):
    """The previous implementation: torch.optim.Muon's update batched over same-shape matrices, eager, every
    rank orthogonalising every matrix (DTensors redistributed implicitly). optim.muon_impl=reference."""

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon update of every matrix, one batch per (group, shape)."""
        if closure is not None:
            raise ValueError("ReferenceMuon.step takes no closure")
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            buckets: dict[tuple, list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for (shape, _, _), params in buckets.items():
                grads = [p.grad for p in params]
                bufs = momentum_buffers(self, params)
                torch._foreach_lerp_(bufs, grads, 1 - mu)
                updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
                U = torch.stack(updates).to(update_dtype(params[0].device))
                X = orthogonalize(U, (group["ns_coefficients"],) * group["ns_steps"], 1.0, group["eps"])
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                adjusted = lr * adjust_ratio(group["adjust_lr_fn"], shape)
                torch._foreach_add_(params, list(X.to(params[0].dtype).unbind(0)), alpha=-adjusted)
        return None

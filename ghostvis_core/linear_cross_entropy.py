"""Chunked linear + cross-entropy: the training loss of `GPT`, never materialising the full (N, V) fp32 logits.

Each chunk of CE_CHUNK_ROWS rows computes its logits, its loss sum and, in forward, its gradients with
respect to h and to the head weight (Liger-Kernel's scheme), so backward only scales the saved gradients.

head_fp8=True runs the head's three GEMMs per chunk (logits, grad_h, grad_w) in float8 with torch._scaled_mm,
as torchao's tensorwise recipe does for a Float8Linear: h and w in e4m3, each scaled by amax/448 (w once per
step); the logits' gradient in e5m2. That gradient needs no amax pass: per row it is (softmax - onehot) times
the loss scale, and |softmax - onehot| <= 1, so (softmax - onehot) * 57344 (e5m2's largest value) never
overflows and the loss scale / 57344 is its exact tensorwise scale bound. _scaled_mm wants both operands
contiguous along the reduction, so the gradient is written in both layouts, (n, V) for grad_h = g @ w and
(V, n) for grad_w = g^T @ h, and w once more as (C, V); rows are zero-padded to a multiple of 16 for grad_w.
Without gradients (eval) the loss stays in the compute dtype.
"""

from __future__ import annotations

import torch
from torch.torch_version import TorchVersion

from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.errors import ConfigError
from ghostvis_core.fp8 import FP8_DIM_MULTIPLE

# Rows of the (rows, V) logits block the chunked loss materialises at once: 4096 x 65536 fp32 = 1 GiB,
# against 8 GiB for 32k tokens unchunked.
CE_CHUNK_ROWS = 4096
# CUDA: accumulate the head's gradient with one fp32-output addmm per chunk (bf16 operands, cuBLAS beta=1)
# instead of a bf16 (V, C) product plus a separate fp32 add. It drops the per-chunk bf16 rounding of the partial
# sum (rel. error 2.3e-7 vs 1.7e-3 on a 512x256x384 check) and a pass over the fp32 (V, C) accumulator per
# chunk (d20 step, H100: 222.9 vs 223.5 ms). addmm's out_dtype exists from torch 2.9 on (CUDA only).
CE_FP32_ADDMM = TorchVersion(torch.__version__) >= "2.9"


def _ce_of_logits(logits_nV, t_n, row_scale):
    """(loss sum, d(loss)/d(logits) * row_scale per valid row in fp32, or None when row_scale is None)."""
    logits = logits_nV.float()
    valid = t_n != IGNORE_INDEX
    tgt = torch.where(valid, t_n, 0)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, tgt[:, None]).squeeze(1)
    loss_sum = torch.where(valid, lse - picked, 0.0).sum()
    if row_scale is None:
        return loss_sum, None
    # d CE / d logits = softmax - onehot(target), zero on ignored rows.
    probs = torch.exp(logits - lse[:, None])
    probs = probs - torch.nn.functional.one_hot(tgt, logits.shape[1]).to(probs.dtype)
    return loss_sum, probs * (valid.to(probs.dtype) * row_scale)[:, None]


def _ce_chunk(h_nC, w_VC, t_n, grad_scale):
    """Loss sum of one chunk and, when grad_scale is given, d(loss*grad_scale)/d(logits) in h's dtype."""
    loss_sum, dlogits = _ce_of_logits(h_nC @ w_VC.t(), t_n, grad_scale)
    return loss_sum, None if dlogits is None else dlogits.to(h_nC.dtype)


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344


def _to_e4m3(x, pad_rows: int):
    """(q, q_t, s): x / s in e4m3 with s = amax|x| / 448 (tensorwise), as (R, C) and transposed (C, R + pad_rows)
    with zero columns appended."""
    x = x.float()
    s = (x.abs().amax() / E4M3_MAX).clamp(min=1e-30)
    q = (x / s).clamp(-E4M3_MAX, E4M3_MAX)
    q_t = torch.nn.functional.pad(q, (0, 0, 0, pad_rows)) if pad_rows else q
    return q.to(torch.float8_e4m3fn), q_t.t().contiguous().to(torch.float8_e4m3fn), s


def _ce_chunk_fp8(logits_nV, t_n, pad_rows: int):
    """Loss sum of one chunk and its logits' gradient / (loss scale / 57344) in e5m2, (n, V) and (V, n + pad)."""
    loss_sum, g = _ce_of_logits(logits_nV, t_n, E5M2_MAX)
    g_t = torch.nn.functional.pad(g, (0, 0, 0, pad_rows)).t().contiguous() if pad_rows else g.t().contiguous()
    return loss_sum, g.to(torch.float8_e5m2), g_t.to(torch.float8_e5m2)


_COMPILED: dict = {}


def _compiled(fn, device: torch.device):
    """fn compiled on CUDA (one graph per shape), eager elsewhere. For the chunk functions it fuses the fp32
    upcast, logsumexp and softmax-minus-onehot into two passes over each chunk; for the fp8 casts, amax and
    cast into two passes."""
    if device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _ce_chunk_fn(device: torch.device):
    return _compiled(_ce_chunk, device)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc fp32 and a, b in the compute dtype."""
    if CE_FP32_ADDMM and acc.is_cuda and a.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


def _fp8_forward(h_NC, w_VC, t_N, scale, compute_dtype):
    """The float8 forward of _LinearCrossEntropy (module docstring): (loss sum, grad_h, fp32 grad_w)."""
    dev = h_NC.device
    cast, chunk_fn = _compiled(_to_e4m3, dev), _compiled(_ce_chunk_fp8, dev)
    w8_VC, w8_CV, w_s = cast(w_VC, 0)
    g_s = scale / E5M2_MAX
    grad_h = torch.empty_like(h_NC)
    grad_w = None
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    for s in range(0, h_NC.shape[0], CE_CHUNK_ROWS):
        h_c = h_NC[s : s + CE_CHUNK_ROWS]
        pad = -h_c.shape[0] % FP8_DIM_MULTIPLE
        h8_nC, h8_Cn, h_s = cast(h_c, pad)
        logits = torch._scaled_mm(h8_nC, w8_VC.t(), scale_a=h_s, scale_b=w_s, out_dtype=compute_dtype)
        loss_c, g8_nV, g8_Vn = chunk_fn(logits, t_N[s : s + CE_CHUNK_ROWS], pad)
        loss += loss_c
        grad_h[s : s + CE_CHUNK_ROWS] = torch._scaled_mm(
            g8_nV, w8_CV.t(), scale_a=g_s, scale_b=w_s, out_dtype=h_NC.dtype)
        part = torch._scaled_mm(g8_Vn, h8_Cn.t(), scale_a=g_s, scale_b=h_s, out_dtype=torch.float32)
        grad_w = part if grad_w is None else grad_w.add_(part)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = CE(h @ w.T, targets); gradients are computed chunk by chunk in forward (Liger's scheme)."""

    @staticmethod
    def forward(ctx, h_NC, w_VC, t_N, scale, compute_dtype, head_fp8):
        if head_fp8:
            loss, grad_h, grad_w = _fp8_forward(h_NC, w_VC, t_N, scale, compute_dtype)
            ctx.save_for_backward(grad_h, grad_w.to(w_VC.dtype))
            return loss * scale
        fn = _ce_chunk_fn(h_NC.device)
        w_c = w_VC.to(compute_dtype)
        grad_h = torch.empty_like(h_NC)
        grad_w = torch.zeros_like(w_VC, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h_NC.device)
        for s in range(0, h_NC.shape[0], CE_CHUNK_ROWS):
            h_c = h_NC[s : s + CE_CHUNK_ROWS].to(compute_dtype)
            loss_c, dlogits = fn(h_c, w_c, t_N[s : s + CE_CHUNK_ROWS], scale)
            loss += loss_c
            grad_h[s : s + CE_CHUNK_ROWS] = dlogits @ w_c
            _add_matmul_(grad_w, dlogits.t(), h_c)
        ctx.save_for_backward(grad_h, grad_w.to(w_VC.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def linear_cross_entropy(
    h_NC: torch.Tensor, w_VC: torch.Tensor, targets_N: torch.Tensor, reduction: str = "mean",
    head_fp8: bool = False,
):
    """fp32 cross-entropy of logits h @ w.T, ignore_index -100, chunked over rows.

    "mean" divides by the number of non-ignored targets (0.0 with zero gradients when there are none, never
    NaN); "sum" returns the sum (a trainer normalises across the global batch). head_fp8: the head's GEMMs in
    float8 when gradients are taken (module docstring; fp8.lm_head_in_fp8 decides it).
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
    dev = h_NC.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_NC.dtype
    if reduction == "mean":
        scale = 1.0 / (targets_N != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        scale = torch.ones((), dtype=torch.float32, device=h_NC.device)
    if torch.is_grad_enabled() and (h_NC.requires_grad or w_VC.requires_grad):
        return _LinearCrossEntropy.apply(h_NC, w_VC, targets_N, scale, compute_dtype, head_fp8)
    fn = _ce_chunk_fn(h_NC.device)
    w_c = w_VC.to(compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=h_NC.device)
    for s in range(0, h_NC.shape[0], CE_CHUNK_ROWS):
        total += fn(
            h_NC[s : s + CE_CHUNK_ROWS].to(compute_dtype), w_c, targets_N[s : s + CE_CHUNK_ROWS], None
        )[0]
    return total * scale

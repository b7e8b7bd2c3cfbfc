"""Chunked linear + cross-entropy: the training loss of `GPT`, never materialising the full (N, V) fp32 logits.

Each chunk of CE_CHUNK_ROWS rows computes its logits, its loss sum and, in forward, its gradients with
respect to h and to the head weight (Liger-Kernel's scheme), so backward only scales the saved gradients.
"""

from __future__ import annotations

import torch
from torch.torch_version import TorchVersion

from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.errors import ConfigError

# Rows of the (rows, V) logits block the chunked loss materialises at once: 4096 x 65536 fp32 = 1 GiB,
# against 8 GiB for 32k tokens unchunked.
CE_CHUNK_ROWS = 4096
# CUDA: accumulate the head's gradient with one fp32-output addmm per chunk (bf16 operands, cuBLAS beta=1)
# instead of a bf16 (V, C) product plus a separate fp32 add. It drops the per-chunk bf16 rounding of the partial
# sum (rel. error 2.3e-7 vs 1.7e-3 on a 512x256x384 check) and a pass over the fp32 (V, C) accumulator per
# chunk (d20 step, H100: 222.9 vs 223.5 ms). addmm's out_dtype exists from torch 2.9 on (CUDA only).
CE_FP32_ADDMM = TorchVersion(torch.__version__) >= "2.9"


def _ce_chunk(h_nC, w_VC, t_n, grad_scale):
    """Loss sum of one chunk and, when grad_scale is given, d(loss*grad_scale)/d(logits) in h's dtype."""
    logits = (h_nC @ w_VC.t()).float()
    valid = t_n != IGNORE_INDEX
    tgt = torch.where(valid, t_n, 0)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, tgt[:, None]).squeeze(1)
    loss_sum = torch.where(valid, lse - picked, 0.0).sum()
    if grad_scale is None:
        return loss_sum, None
    # d CE / d logits = softmax - onehot(target), zero on ignored rows.
    probs = torch.exp(logits - lse[:, None])
    probs = probs - torch.nn.functional.one_hot(tgt, logits.shape[1]).to(probs.dtype)
    dlogits = probs * (valid.to(probs.dtype) * grad_scale)[:, None]
    return loss_sum, dlogits.to(h_nC.dtype)


_compiled_ce_chunk = None


def _ce_chunk_fn(device: torch.device):
    global _compiled_ce_chunk
    if device.type != "cuda":
        return _ce_chunk
    if _compiled_ce_chunk is None:
        # Fuses the fp32 upcast, logsumexp and softmax-minus-onehot into two passes over each chunk.
        _compiled_ce_chunk = torch.compile(_ce_chunk, dynamic=False)
    return _compiled_ce_chunk


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc fp32 and a, b in the compute dtype."""
    if CE_FP32_ADDMM and acc.is_cuda and a.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = CE(h @ w.T, targets); gradients are computed chunk by chunk in forward (Liger's scheme)."""

    @staticmethod
    def forward(ctx, h_NC, w_VC, t_N, scale, compute_dtype):
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
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(
    h_NC: torch.Tensor, w_VC: torch.Tensor, targets_N: torch.Tensor, reduction: str = "mean"
):
    """fp32 cross-entropy of logits h @ w.T, ignore_index -100, chunked over rows.

    "mean" divides by the number of non-ignored targets (0.0 with zero gradients when there are none, never
    NaN); "sum" returns the sum (a trainer normalises across the global batch).
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
        return _LinearCrossEntropy.apply(h_NC, w_VC, targets_N, scale, compute_dtype)
    fn = _ce_chunk_fn(h_NC.device)
    w_c = w_VC.to(compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=h_NC.device)
    for s in range(0, h_NC.shape[0], CE_CHUNK_ROWS):
        total += fn(
            h_NC[s : s + CE_CHUNK_ROWS].to(compute_dtype), w_c, targets_N[s : s + CE_CHUNK_ROWS], None
        )[0]
    return total * scale

"""The Triton decode kernel on CUDA (run with `pytest -m gpu`): replayed in a CUDA graph (its last span combines
the spans, and the span tickets must come back to zero for the next replay), launched with and without
programmatic dependent launch, against the float64 reference (the engine's step with PDL:
test_batch_engine_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from test_decode_attention import _reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]  # fmt: skip

CASES = [  # B, H, K, D, S, lengths, spans (None: the kernel's choice)
    (1, 10, 10, 128, 384, [200], None),  # d20 at batch 1: 24 spans
    (64, 10, 10, 128, 384, list(range(0, 384, 6)), None),  # every length, a full row among them
    (3, 8, 2, 64, 200, [0, 70, 199], 8),  # GQA, an empty row, forced spans past a short row's end
]


def _pdl_capable() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.parametrize("pdl", [False, True], ids=["launch", "pdl"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_graphed_decode_kernel_matches_float64(case, pdl):
    from ghostvis_core.kernels.decode_attention_triton import decode_attention_triton

    if pdl and not _pdl_capable():
        pytest.skip("programmatic dependent launch needs Hopper or later")
    B, H, K, D, S, lengths, spans = case
    g = torch.Generator().manual_seed(B * S)
    q, k_new, v_new = (torch.randn(B, n, D, generator=g).bfloat16() for n in (H, K, K))
    k_cache, v_cache = (torch.randn(B, S, K, D, generator=g).bfloat16() for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32)
    want, k_want, v_want = _reference(q, k_new, v_new, k_cache, v_cache, lens)
    args = [t.cuda() for t in (q, k_new, v_new, k_cache, v_cache, lens)]

    def call():
        return decode_attention_triton(*args, splits=spans, pdl=pdl)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile and warm up before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    for _ in range(3):  # each replay writes the same new K/V and must find the tickets back at zero
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.cpu().double(), want, rtol=0, atol=1e-2)  # bf16 output rounding
    assert torch.equal(args[3].cpu(), k_want) and torch.equal(args[4].cpu(), v_want)



@pytest.mark.parametrize("pdl", [False, True], ids=["launch", "pdl"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_graphed_fp8_decode_kernel_matches_float64_and_stores_like_quantize(case, pdl):
    """An fp8 e4m3 cache (kv_cache.py): the hardware's fp32 -> e4m3 cast of the rounded value, the folded
    scales, and the stored new token equal to torch's quantize_fp8 bit for bit."""
    from test_kv_cache_fp8 import _reference as fp8_reference

    from ghostvis_core.kernels.decode_attention_triton import decode_attention_triton
    from ghostvis_core.kv_cache import quantize_fp8

    if pdl and not _pdl_capable():
        pytest.skip("programmatic dependent launch needs Hopper or later")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 e4m3 in Triton needs sm89+")
    B, H, K, D, S, lengths, spans = case
    g = torch.Generator().manual_seed(B * S + 7)
    q, k_new, v_new = (torch.randn(B, n, D, generator=g).bfloat16() for n in (H, K, K))
    (k8, ks), (v8, vs) = (quantize_fp8(3 * torch.randn(B, S, K, D, generator=g)) for _ in range(2))
    lens = torch.tensor(lengths, dtype=torch.int32)
    want, stored = fp8_reference(q, k_new, v_new, k8, v8, ks, vs, lens)
    args = [t.cuda() for t in (q, k_new, v_new, k8, v8, lens)]
    scales = [ks.cuda(), vs.cuda()]

    def call():
        return decode_attention_triton(*args, splits=spans, pdl=pdl, k_scale_BSK=scales[0], v_scale_BSK=scales[1])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.cpu().double(), want, rtol=0, atol=5e-2)  # bf16 output of values ~3
    got = (args[3], args[4], scales[0], scales[1])
    for got_t, want_t in zip(got, stored, strict=True):
        got_t = got_t.cpu()
        assert torch.equal(got_t.view(torch.uint8) if got_t.dtype.itemsize == 1 else got_t,
                           want_t.view(torch.uint8) if want_t.dtype.itemsize == 1 else want_t)  # fmt: skip

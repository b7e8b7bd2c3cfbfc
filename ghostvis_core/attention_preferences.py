"""The measured facts behind attention selection: which cases each backend can serve, and, per GPU
architecture and case, the order of preference with the measurement behind it. `backends.py` applies it."""

# Which cases each backend can serve at all. Packed documents need a per-document mask or varlen; SDPA's
# flash and cuDNN kernels take no arbitrary mask, so they cannot keep documents apart. Decode (one new token per
# row) and prefill (a prompt's tokens, or some rows of a running batch) append to a preallocated cache with
# per-row lengths (attention.attention_with_kvcache): flash_attn takes the lengths itself, SDPA needs a per-row
# mask over every slot, so of SDPA only the efficient and math kernels serve them.
CASES_SUPPORTED = {
    "flash_attn": {"dense", "packed", "decode", "prefill", "noncausal"},  # func / varlen_func / with_kvcache
    "sdpa_cudnn": {"dense", "noncausal"},
    "sdpa_flash": {"dense", "noncausal"},
    "sdpa_efficient": {"dense", "packed", "decode", "prefill", "noncausal"},  # packed: a block-diagonal mask
    "flex": {"dense", "packed", "noncausal"},  # packed via a document BlockMask
    "sdpa_math": {"dense", "packed", "decode", "prefill", "noncausal"},
    "triton": {"decode"},  # one new token per row of the whole batch (kernels/decode_attention_triton.py)
}

# Prefill into the cache, on GPUs where FA2 runs: FA2 reads only each row's cached slots, SDPA's efficient
# kernel every slot under a mask, and is the slower kernel besides (causal B4 H16 T4096 D128 forward on an
# H100: 281 TFLOP/s for FA2 inside SDPA against 152 for efficient, REFERENCE.md).
_PREFILL_FA2 = (
    ("flash_attn", "in-place KV-cache append over each row's own slots"),
    ("sdpa_efficient", "memory-efficient SDPA with a per-row mask over the cache"),
)
_PREFILL_SDPA = (("sdpa_efficient", "memory-efficient SDPA with a per-row mask over the cache"),)

# Per-architecture, per-case preference: the first eligible backend wins. Each entry is (backend, why).
# Measurements are REFERENCE.md (bf16, causal, B4 H16 T4096 D128, torch 2.11+cu130, one H100 / one H200).
PREFERENCES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "hopper": {  # sm90
        # fwd+bwd TFLOP/s: SDPA cuDNN 486 (H100) / 461 (H200) vs FA2 282, SDPA flash 255-265, Flex 334.
        "dense": (
            ("sdpa_cudnn", "fastest dense causal on Hopper"),
            ("flash_attn", "FlashAttention-2"),
            ("sdpa_flash", "PyTorch's built-in FlashAttention-2 kernel"),
            ("sdpa_efficient", "memory-efficient SDPA"),
        ),
        # 8 docs x 512 per 4096 row, fwd / fwd+bwd ms: FA2 varlen 0.195 / 0.987, Flex 0.190 / 0.903
        # (REFERENCE.md); in isolation on an H200 Flex led (0.665 vs 1.025 fwd+bwd), but in the d20 trainer
        # on an H100 (packed rows, compiled blocks, 80 steps) FA2 varlen gave 127.2k tok/s vs Flex 125.7k,
        # and FA2 needs no BlockMask build per batch: FA2 first when present.
        "packed": (
            ("flash_attn", "no cross-document work, no compile step"),
            ("flex", "document BlockMask skips cross-document blocks"),
            ("sdpa_efficient", "block-diagonal mask (computes every block)"),
        ),
        # d20 decode attention alone on an H200 (bf16, CUDA-graph replays, 384 slots; same call, docs/
        # BENCHMARKS.md): Triton 4.9 / 27.9 / 101.7 us vs FA2 kvcache 8.5 / 35.5 / 140.4 us at batch 1 / 64 /
        # 256 (200, 200, 256 cached). SDPA masks every slot of the preallocated cache per row (efficient kernel).
        "decode": (
            ("triton", "split-KV decode: one query row per KV head, no tensor-core tile to fill"),
            ("flash_attn", "in-place KV-cache append"),
            ("sdpa_efficient", "memory-efficient SDPA with a per-row mask over the cache"),
        ),
        "prefill": _PREFILL_FA2,
        # Non-causal runs the same kernels as dense without the mask: cuDNN leads there too (fwd 498-589).
        "noncausal": (
            ("sdpa_cudnn", "fastest attention on Hopper"),
            ("flash_attn", "FlashAttention-2"),
            ("sdpa_flash", "PyTorch's built-in FlashAttention-2 kernel"),
            ("sdpa_efficient", "memory-efficient SDPA"),
        ),
    },
    "ampere": {  # sm80 / sm86 / sm89: no cuDNN measurement here; FA2 is the established fastest (FA2 paper)
        "dense": (
            ("flash_attn", "FlashAttention-2"),
            ("sdpa_flash", "PyTorch's built-in FlashAttention-2 kernel"),
            ("sdpa_efficient", "memory-efficient SDPA"),
        ),
        # Flex reaches ~90% of FA2 fwd / 85% bwd on A100 (pytorch.org FlexAttention blog).
        "packed": (
            ("flash_attn", "no cross-document work, no compile step"),
            ("flex", "document BlockMask skips cross-document blocks"),
            ("sdpa_efficient", "block-diagonal mask (computes every block)"),
        ),
        "decode": (
            ("flash_attn", "in-place KV-cache append"),
            ("triton", "split-KV decode, reads only each row's cached tokens"),
            ("sdpa_efficient", "memory-efficient SDPA with a per-row mask over the cache"),
        ),
        "prefill": _PREFILL_FA2,
        "noncausal": (
            ("flash_attn", "FlashAttention-2"),
            ("sdpa_flash", "PyTorch's built-in FlashAttention-2 kernel"),
            ("sdpa_efficient", "memory-efficient SDPA"),
        ),
    },
    "turing": {  # sm70 / sm75: no flash kernels (FA2 and SDPA flash need sm80); efficient is the fused one
        "dense": (("sdpa_efficient", "the fused SDPA kernel for pre-Ampere GPUs"),),
        "packed": (
            ("flex", "document BlockMask skips cross-document blocks"),
            ("sdpa_efficient", "block-diagonal mask (computes every block)"),
        ),
        "decode": (
            ("triton", "split-KV decode, reads only each row's cached tokens"),
            ("sdpa_efficient", "the fused SDPA kernel for pre-Ampere GPUs"),
        ),
        "prefill": (("sdpa_efficient", "the fused SDPA kernel for pre-Ampere GPUs"),),
        "noncausal": (("sdpa_efficient", "the fused SDPA kernel for pre-Ampere GPUs"),),
    },
    "blackwell": {  # sm100 / sm120: cuDNN ships Blackwell kernels; our FA2 builds do not target it
        "dense": (
            ("sdpa_cudnn", "cuDNN attention ships Blackwell kernels"),
            ("sdpa_flash", "PyTorch's built-in FlashAttention-2 kernel"),
            ("sdpa_efficient", "memory-efficient SDPA"),
        ),
        "packed": (
            ("flex", "document BlockMask skips cross-document blocks"),
            ("sdpa_efficient", "block-diagonal mask (computes every block)"),
        ),
        "decode": (
            ("triton", "split-KV decode, reads only each row's cached tokens"),
            ("sdpa_efficient", "memory-efficient SDPA with a per-row mask over the cache"),
        ),
        "prefill": _PREFILL_SDPA,
        "noncausal": (
            ("sdpa_cudnn", "cuDNN attention ships Blackwell kernels"),
            ("sdpa_flash", "PyTorch's built-in FlashAttention-2 kernel"),
            ("sdpa_efficient", "memory-efficient SDPA"),
        ),
    },
    "cpu": {
        "dense": (("sdpa_math", "PyTorch SDPA on CPU"),),
        "packed": (("sdpa_math", "PyTorch SDPA on CPU with a block-diagonal causal mask"),),
        "decode": (("sdpa_math", "PyTorch SDPA on CPU"),),
        "prefill": (("sdpa_math", "PyTorch SDPA on CPU"),),
        "noncausal": (("sdpa_math", "PyTorch SDPA on CPU"),),
    },
}

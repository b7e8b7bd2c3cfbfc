"""The one vocabulary of backend names: what a user may request and what the code dispatches on.

Requests (`*Request`) are what configs and flags accept; backends (`*Backend`) are the concrete names the plan
chooses and the kernels take ("auto" never reaches a kernel). The tuples are derived from the Literal types, so
the two cannot drift apart. This module imports nothing from the project.
"""

from __future__ import annotations

from typing import Literal, get_args

AttnRequest = Literal[
    "auto",
    "flash",
    "flash_attn",
    "cudnn",
    "sdpa_cudnn",
    "sdpa_flash",
    "efficient",
    "sdpa_efficient",
    "flex",
    "math",
    "sdpa_math",
    "triton",
]
AttnBackend = Literal["flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "sdpa_math", "triton"]
AttnCase = Literal["dense", "packed", "decode", "prefill", "noncausal"]
NormRequest = Literal["auto", "triton", "apex", "torch"]
NormBackend = Literal["triton", "apex", "torch"]
SwigluBackend = Literal["triton", "torch"]
OptimizerRequest = Literal["auto", "muon", "adamw", "apex_adam"]
OptimizerBackend = Literal["muon", "adamw", "apex_adam"]
# `ghostvis infer/bench --backend`: the native engine or vLLM (engine_choice.choose_inference decides auto).
InferenceRequest = Literal["native", "vllm", "auto"]
InferenceBackend = Literal["native", "vllm"]
Fp8Request = Literal["none", "tensorwise", "rowwise"]
"""fp8 training of the block linears (torchao float8 recipes); none keeps every GEMM in the compute dtype."""
ActivationCheckpointing = Literal["none", "full", "selective"]
"""Recompute block activations in backward: none, every block, or every other block (gpt.py)."""
DecodeLayersRequest = Literal["auto", "triton", "torch"]
"""A small-batch decode step's layers: the fused Triton kernels (decode_layers.py), the PyTorch layers, or the
plan's choice (auto: torch, measured no slower)."""
Dtype = Literal["bfloat16", "float16", "float32"]
DeviceType = Literal["cuda", "cpu"]

ATTN_REQUESTS: tuple[str, ...] = get_args(AttnRequest)
ATTN_BACKENDS: tuple[str, ...] = get_args(AttnBackend)
ATTENTION_CASES: tuple[str, ...] = get_args(AttnCase)
NORM_REQUESTS: tuple[str, ...] = get_args(NormRequest)
NORM_BACKENDS: tuple[str, ...] = get_args(NormBackend)
SWIGLU_BACKENDS: tuple[str, ...] = get_args(SwigluBackend)
OPTIMIZER_REQUESTS: tuple[str, ...] = get_args(OptimizerRequest)
INFERENCE_REQUESTS: tuple[str, ...] = get_args(InferenceRequest)
DECODE_LAYERS_REQUESTS: tuple[str, ...] = get_args(DecodeLayersRequest)
DTYPES: tuple[str, ...] = get_args(Dtype)
FP8_REQUESTS: tuple[str, ...] = get_args(Fp8Request)
ACTIVATION_CHECKPOINTING: tuple[str, ...] = get_args(ActivationCheckpointing)
HALF_DTYPES: tuple[str, ...] = ("bfloat16", "float16")

# User spelling -> concrete attention backend (None = let the plan choose).
ATTN_REQUEST_TO_BACKEND: dict[str, str | None] = {
    "auto": None,
    "flash": "flash_attn",
    "cudnn": "sdpa_cudnn",
    "efficient": "sdpa_efficient",
    "math": "sdpa_math",
    **{name: name for name in ATTN_BACKENDS},
}
assert set(ATTN_REQUEST_TO_BACKEND) == set(ATTN_REQUESTS)

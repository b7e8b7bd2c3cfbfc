"""Which engine `ghostvis infer` / `ghostvis bench` / `ghostvis serve` run: the native one or vLLM, from the
machine's facts (EnvFacts), the separate vLLM environment `ghostvis install vllm` made, and the model's kind and
head dim. The model's own plan (backends.plan_run) always names the native engine: vLLM is another process's
code, so the choice between them is made here, with facts the plan does not hold."""

from __future__ import annotations

import dataclasses

from ghostvis_core.backend_names import INFERENCE_REQUESTS
from ghostvis_core.backends import Choice
from ghostvis_core.env import EnvFacts
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.hardware_limits import VLLM_CPU_HEAD_DIMS, Unavailable, package_unavailable
from ghostvis_core.hardware_limits import arch_unavailable as _arch_unavailable


def vllm_unavailable(env: EnvFacts, device_type: str, venv=None) -> Unavailable | None:
    """Why vLLM could not serve here, None if it could: the platform, the GPU, then the package, in this
    environment or in the separate one `ghostvis install vllm` made (venv: vllm_env.VllmEnvStatus)."""
    if env.os_name != "Linux":
        name = {"Darwin": "macOS"}.get(env.os_name, env.os_name)
        return Unavailable("platform", f"vLLM runs only on Linux, not {name}",
                           "use Linux (or WSL2); `--backend native` works here")
    if device_type == "cuda" and env.capability is not None:
        why = _arch_unavailable("vllm", env.capability)
        if why is not None:
            return why
    if device_type == "cpu" and env.machine not in ("x86_64", "AMD64"):
        return Unavailable("platform", f"vLLM's CPU build is for x86_64, not {env.machine}",
                           "use a CUDA GPU, or `--backend native`")
    here = package_unavailable(env, "vllm", "vllm")
    if here is None or (venv is not None and venv.usable):
        return None
    if venv is not None and (venv.found or not env.package("vllm").installed):
        return Unavailable("package", venv.error or f"vLLM is not usable in {venv.venv}", "`ghostvis install vllm`")
    return here


def vllm_model_unavailable(kind: str, head_dim: int, device_type: str) -> str | None:
    """Why vLLM cannot serve this model here (kind "gpt" or "vlm"), None if it can."""
    if device_type == "cpu" and head_dim not in VLLM_CPU_HEAD_DIMS:
        return (f"vLLM's CPU attention takes head_dim in {list(VLLM_CPU_HEAD_DIMS)}, and this model's is {head_dim} "
                "(change n_embd / n_head)")
    if device_type == "cpu" and kind == "vlm":
        return ("vLLM's LLaVA needs torchvision, and the CPU build has none that loads against its torch "
                "(text models only on CPU)")
    return None


def choose_inference(request: str, env: EnvFacts, device_type: str, *, venv=None,
                     model: tuple[str, int] | None = None) -> Choice:
    """The engine `ghostvis infer` / `bench` run: native, vLLM, or (auto) vLLM when it is usable here and can
    serve the model (model: (kind, head_dim)), else native with the reason. An explicit vllm that cannot run
    raises BackendUnavailableError with the fix."""
    _check_inference_request(request)
    native = Choice("native", "GhostVis engine", "preallocated KV cache, continuous batching")
    if request == "native":
        return dataclasses.replace(native, reason=native.reason + "; requested")
    why = vllm_unavailable(env, device_type, venv)
    model_why = vllm_model_unavailable(*model, device_type) if model is not None and why is None else None
    if request == "vllm" and why is not None:
        fix = "" if why.fix in why.message else f". Fix: {why.fix}"
        raise BackendUnavailableError(f"--backend vllm: {why.message}{fix}")
    if request == "vllm" and model_why is not None:
        raise BackendUnavailableError(f"--backend vllm: {model_why}; use --backend native")
    if why is None and model_why is None:
        usable_here = env.package("vllm").usable
        version = env.package("vllm").version if usable_here else getattr(venv, "vllm_version", None)
        where = "this environment" if usable_here else venv.venv
        return Choice("vllm", f"vLLM {version or ''}".strip(), f"in {where}" + ("; requested" if request == "vllm"
                      else "; auto: vLLM is usable and the model exports to Hugging Face"))
    return dataclasses.replace(native, reason=f"auto: not vLLM, {why.message if why else model_why}")


def choose_native_only(request: str) -> Choice:
    """The engine of a command that has only the native one (`ghostvis serve`): native and auto give it (auto
    says so in the reason); vllm is refused with where vLLM is served (`ghostvis infer/bench`)."""
    _check_inference_request(request)
    if request == "vllm":
        raise BackendUnavailableError("--backend vllm: this command serves with the native engine only "
                                      "(`ghostvis infer` and `ghostvis bench` take --backend vllm); use native or auto")
    reason = "requested" if request == "native" else "the only engine this command has"
    return Choice("native", "GhostVis engine", reason)


def _check_inference_request(request: str) -> None:
    if request not in INFERENCE_REQUESTS:
        raise ConfigError(f"--backend {request!r} is not one of {', '.join(INFERENCE_REQUESTS)}")

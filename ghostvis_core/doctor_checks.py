"""The checks behind `ghostvis doctor`: each one a status, a detail line and the fix, computed from EnvFacts.

Statuses: "ok"; "warn" (works, but slower than it could: the fix says what to do); "fail" (blocks something:
the detail says what, the fix how). Only a failed check on something the user requires (`--require`) makes
the report blocking, so CI scripts can gate on the exit code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ghostvis_core import paths
from ghostvis_core.backends import (
    BackendPlan,
    attention_context,
    attention_unavailable,
    inference_run_facts,
    plan_run,
)
from ghostvis_core.engine_choice import vllm_unavailable
from ghostvis_core.env import PROFILE_ENV_VAR, EnvFacts, format_cudnn_version
from ghostvis_core.errors import ConfigError
from ghostvis_core.hardware_limits import arch_unavailable
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.run_plan import default_model_config, default_training_plan

GROUPS = ("System", "GPU", "CUDA stack", "Backends", "Paths")
# --require name -> the check that decides it.
REQUIREMENTS = ("flash-attn", "triton", "apex", "vllm", "liger", "cuda")
_LOW_DISK_GIB = 10.0


@dataclass
class Check:
    """One doctor line."""

    group: str
    """One of GROUPS."""
    name: str
    """Short name, e.g. "flash-attn", "driver"."""
    status: str
    """"ok", "warn" or "fail"."""
    detail: str
    """What was found."""
    fix: str = ""
    """What to do about it (empty when status is ok)."""
    requirement: str | None = None
    """The --require name this check decides, if any."""
    satisfied: bool = False
    """For a requirement check: the thing is usable here."""
    package: str | None = None
    """The optional package this check judges (its facts entry says `usable` as this check does)."""


@dataclass
class DoctorReport:
    """All checks, the backend plans (a default training run's and an inference run's) and the verdict."""

    checks: list[Check]
    plan: BackendPlan
    """The plan a training run with the defaults gets here (the trainer builds the same one)."""
    inference_plan: BackendPlan
    """The plan `ghostvis infer` gets here with the defaults."""
    required: list[str] = field(default_factory=list)
    blocking: list[Check] = field(default_factory=list)
    verdict: str = ""

    @property
    def exit_code(self) -> int:
        """0 unless something the user required is unusable."""
        return 1 if self.blocking else 0

    def to_dict(self, env: EnvFacts) -> dict:
        """JSON-ready report: facts, checks, backend choices, verdict."""
        facts = env.to_dict()
        for c in self.checks:
            # "usable" in the JSON is what the check says: importable is not enough where the check finds the
            # package cannot serve here (triton on a CPU machine imports, but its kernels need a GPU).
            if c.package is not None and c.package in facts["packages"]:
                entry = facts["packages"][c.package]
                entry["usable"] = bool(entry["usable"]) and c.satisfied
        return {
            "facts": facts,
            "checks": [asdict(c) for c in self.checks],
            "backends": self.plan.to_dict(),
            "inference_backends": self.inference_plan.to_dict(),
            "required": self.required,
            "blocking": [c.name for c in self.blocking],
            "verdict": self.verdict,
            "exit_code": self.exit_code,
        }


def parse_requirements(text: str | None) -> list[str]:
    """Split `--require a,b`; an unknown name is a ConfigError listing the valid ones."""
    if not text:
        return []
    names = [n.strip().lower().replace("_", "-") for n in text.split(",") if n.strip()]
    aliases = {"flash": "flash-attn", "flash-attention": "flash-attn", "liger-kernel": "liger", "gpu": "cuda"}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in REQUIREMENTS]
    if unknown:
        raise ConfigError(
            f"--require: unknown name(s) {', '.join(unknown)}; valid: {', '.join(REQUIREMENTS)}"
        )
    return names


def _system_checks(env: EnvFacts) -> list[Check]:
    checks = [Check("System", "python", "ok", f"Python {env.python}")]
    os_line = f"{env.os_name} {env.os_release} ({env.machine})"
    if env.os_name == "Linux":
        checks.append(Check("System", "os", "ok", os_line))
    else:
        checks.append(
            Check(
                "System",
                "os",
                "warn",
                f"{os_line}: vLLM, Triton kernels and NCCL need Linux",
                "use Linux (or WSL2) with an NVIDIA GPU for the fast paths",
            )
        )
    ram = f"{env.ram_gib:.1f} GiB RAM" if env.ram_gib else "RAM unknown"
    checks.append(Check("System", "cpu", "ok", f"{env.cpu_count} CPU cores, {ram}"))
    return checks


def _gpu_checks(env: EnvFacts) -> list[Check]:
    if not env.has_gpu:
        why = (
            f"torch {env.torch_version} is a CPU build"
            if env.torch_cuda is None
            else f"torch {env.torch_version} sees no GPU"
        )
        fix = "runs on CPU (fine for the tiny demo); for real training use a machine with an NVIDIA GPU"
        if env.driver:
            fix = f"an NVIDIA driver {env.driver} is present: install a CUDA build of torch"
        return [Check("GPU", "cuda", "warn", f"no CUDA GPU: {why}", fix, requirement="cuda")]
    checks = []
    for gpu in env.gpus:
        cc = f"sm{gpu.capability[0]}{gpu.capability[1]}"
        checks.append(
            Check(
                "GPU",
                f"gpu{gpu.index}",
                "ok",
                f"{gpu.name} ({cc}, {gpu.memory_gib:.0f} GiB)",
                requirement="cuda",
                satisfied=True,
            )
        )
    if env.visible_devices is not None:
        checks.append(Check("GPU", "visible devices", "ok", f"CUDA_VISIBLE_DEVICES={env.visible_devices}"))
    if env.driver:
        checks.append(Check("GPU", "driver", "ok", f"NVIDIA driver {env.driver}"))
    else:
        checks.append(
            Check(
                "GPU",
                "driver",
                "warn",
                "driver version unknown (no pynvml, no nvidia-smi)",
                "pip install nvidia-ml-py to report it",
            )
        )
    return checks


def _cuda_checks(env: EnvFacts) -> list[Check]:
    checks = []
    if env.torch_cuda is None:
        checks.append(
            Check(
                "CUDA stack",
                "torch",
                "warn",
                f"torch {env.torch_version} (CPU build, no CUDA)",
                "on a GPU machine install a CUDA build of torch (https://pytorch.org/get-started/locally/)",
            )
        )
    else:
        checks.append(
            Check("CUDA stack", "torch", "ok", f"torch {env.torch_version} (CUDA {env.torch_cuda})")
        )
        if env.has_gpu:
            # A profile written before versions were stored dotted holds the raw integer ("91900").
            cudnn = format_cudnn_version(env.cudnn) if env.cudnn else None
            checks.append(
                Check(
                    "CUDA stack",
                    "cudnn",
                    "ok" if env.cudnn else "warn",
                    f"cuDNN {cudnn}" if cudnn else "no cuDNN: SDPA/cuDNN unavailable",
                    "" if env.cudnn else "reinstall the CUDA build of torch (it ships cuDNN)",
                )
            )
            nccl_missing = env.nccl is None and env.os_name == "Linux"
            checks.append(
                Check(
                    "CUDA stack",
                    "nccl",
                    "warn" if nccl_missing else "ok",
                    f"NCCL {env.nccl}" if env.nccl else "no NCCL: multi-GPU uses gloo (slow)",
                    "reinstall the CUDA build of torch (it ships NCCL)" if nccl_missing else "",
                )
            )
    if env.nvcc is None:
        detail = "no nvcc (CUDA toolkit): only needed to build apex or flash-attn from source"
        checks.append(
            Check(
                "CUDA stack",
                "nvcc",
                "ok" if not env.has_gpu else "warn",
                detail,
                "" if not env.has_gpu else f"install the CUDA {env.torch_cuda} toolkit to build extensions",
            )
        )
    elif env.torch_cuda and env.nvcc.split(".")[:2] != env.torch_cuda.split(".")[:2]:
        checks.append(
            Check(
                "CUDA stack",
                "nvcc",
                "warn",
                f"nvcc {env.nvcc} differs from torch's CUDA {env.torch_cuda}: source builds will fail",
                f"put the CUDA {env.torch_cuda} toolkit first on PATH (CUDA_HOME)",
            )
        )
    else:
        checks.append(Check("CUDA stack", "nvcc", "ok", f"nvcc {env.nvcc}"))
    if env.ninja:
        checks.append(Check("CUDA stack", "ninja", "ok", f"ninja {env.ninja}"))
    else:
        checks.append(
            Check(
                "CUDA stack",
                "ninja",
                "warn" if env.has_gpu else "ok",
                "no ninja: extension builds run serially (hours for flash-attn)",
                "pip install ninja" if env.has_gpu else "",
            )
        )
    return checks


def _package_check(
    env: EnvFacts, name: str, req: str, why_unavailable: str | None, note: str, usable_note: str = ""
) -> Check:
    """Broken install -> fail; unusable on this hardware -> says why; absent but useful -> warn with the fix."""
    pkg = env.package(name)
    fix_cmd = f"ghostvis install {req}"
    label = f"{name} {pkg.version}" if pkg.version else name
    if pkg.installed and not pkg.usable:
        why = pkg.diagnosis or "a compiled extension is missing"
        fix = why if fix_cmd in why else f"{why}; fix: {fix_cmd}"
        return Check("Backends", req, "fail", f"{label} installed but unusable: {pkg.error}", fix, req,
                     package=name)
    if why_unavailable is not None:
        state = "installed" if pkg.installed else "not installed"
        # On a GPU machine nothing can be done about it; without a GPU, a GPU machine is the fix.
        fix = "" if env.has_gpu else "use a machine with an NVIDIA GPU for this backend"
        status = "ok" if env.has_gpu else "warn"
        return Check(
            "Backends", req, status, f"{label} {state}; unavailable here: {why_unavailable}", fix, req,
            package=name,
        )
    if pkg.usable:
        return Check("Backends", req, "ok", f"{label} (usable{usable_note})", "", req, satisfied=True,
                     package=name)
    return Check("Backends", req, "warn", f"{name} not installed{note}", fix_cmd, req, package=name)


_VLLM_USE = "serves `ghostvis infer/bench --backend vllm` (and auto)"


def _vllm_check(env: EnvFacts, plan: BackendPlan, venv) -> Check:
    """vLLM here, or in the separate environment `ghostvis install vllm` made (venv: VllmEnvStatus or None
    when not looked for)."""
    why = vllm_unavailable(env, plan.device_type)
    platform_why = None if why is None or why.kind == "package" else why.message
    if env.package("vllm").installed or platform_why:
        return _package_check(env, "vllm", "vllm", platform_why, "", usable_note=f"; {_VLLM_USE}")
    if venv is not None and venv.usable:
        return Check("Backends", "vllm", "ok", f"vllm {venv.vllm_version} in its own environment {venv.venv} "
                     f"({_VLLM_USE})", requirement="vllm", satisfied=True)
    if venv is not None and venv.found:
        return Check("Backends", "vllm", "fail", f"vllm environment {venv.venv} is not usable", venv.error or "",
                     requirement="vllm")
    where = f"; looked in {venv.venv}" if venv is not None else ""
    return Check("Backends", "vllm", "ok", f"vllm not installed (optional, for `ghostvis infer --backend vllm`: `ghostvis install vllm`{where})",
                 "", requirement="vllm")


def _backend_checks(env: EnvFacts, plan: BackendPlan, vllm_venv=None) -> list[Check]:
    fa = attention_unavailable("flash_attn", attention_context(env, plan.facts))
    # only "not installed"/"broken" (kind package) is left to _package_check: installing fixes it
    fa_why = None if fa is None or fa.kind == "package" else fa.message
    if env.has_gpu and env.os_name == "Linux":
        triton = arch_unavailable("triton", env.capability)
        triton_why = None if triton is None else triton.message
    else:
        triton_why = "Triton kernels need a CUDA GPU on Linux"
    checks = [
        _package_check(
            env, "triton", "triton", triton_why, " (fused RMSNorm/SwiGLU and FlexAttention use it)"
        ),
        _package_check(
            env, "flash_attn", "flash-attn", fa_why, " (packed-document training and decode use it)"
        ),
    ]
    checks.append(_vllm_check(env, plan, vllm_venv))
    gpu_why = None if env.has_gpu and env.os_name == "Linux" else "needs a CUDA GPU on Linux"
    for name, req, note, used in (
        ("apex", "apex", "optional: torch's fused AdamW and F.rms_norm match or beat it", ""),
        (
            "liger_kernel",
            "liger",
            "optional: GhostVis's own Triton kernels serve RMSNorm and SwiGLU",
            "; only `ghostvis bench kernels` runs it, as a comparison",
        ),
    ):
        if env.package(name).installed or gpu_why:
            checks.append(_package_check(env, name, req, gpu_why, "", usable_note=used))
        else:
            checks.append(Check("Backends", req, "ok", f"{name} not installed ({note})", requirement=req))
    muon = env.torch_features.get("muon", False)
    checks.append(
        Check(
            "Backends",
            "muon",
            "ok" if muon else "warn",
            "torch.optim.Muon available" if muon else f"torch {env.torch_version} has no torch.optim.Muon",
            "" if muon else "upgrade torch to >= 2.9 for Muon (AdamW is used meanwhile)",
        )
    )
    flex = env.torch_features.get("flex_attention", False)
    checks.append(
        Check(
            "Backends",
            "flex_attention",
            "ok" if flex else "warn",
            "FlexAttention available" if flex else "this torch has no FlexAttention",
            "" if flex else "upgrade torch to >= 2.5",
        )
    )
    return checks


def _unwritable(path: Path) -> str | None:
    """Why `path` (a folder, made on first use) cannot be written, or None: its nearest existing part must be a
    folder this user can write into."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    if not probe.is_dir():
        return f"{path} cannot be created: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path} cannot be written: {probe} is not writable by this user"
    return None


def _path_checks(env: EnvFacts) -> list[Check]:
    checks = []
    home = paths.ghostvis_home()
    if home is not None:
        checks.append(Check("Paths", "GHOSTVIS_HOME", "ok", str(home)))
    problem = _unwritable(paths.data_dir())
    if problem is not None:
        # Nothing below can be written: no run, dataset or tokenizer would survive, so say that, not "ok".
        fix = "set GHOSTVIS_HOME to a folder you can write (or fix the permissions)"
        checks.append(Check("Paths", "data", "fail", problem, fix))
        checks.append(Check("Paths", "runs", "fail", f"{env.runs_dir}: {problem}", fix))
        return checks
    checks.append(Check("Paths", "data", "ok", str(paths.data_dir())))
    free = env.disk_free_gib
    disk = (
        f"{env.runs_dir} ({free:.1f} GiB free)"
        if free is not None
        else f"{env.runs_dir} (free space unknown)"
    )
    low = free is not None and free < _LOW_DISK_GIB
    checks.append(
        Check(
            "Paths",
            "runs",
            "warn" if low else "ok",
            disk,
            "checkpoints need space: free some or set GHOSTVIS_HOME to a bigger disk" if low else "",
        )
    )
    checks.append(Check("Paths", "cache", "ok", str(paths.cache_dir())))
    profile = os.environ.get(PROFILE_ENV_VAR)
    if profile:
        checks.append(
            Check(
                "Paths",
                "env profile",
                "warn",
                f"facts replayed from {profile} ({PROFILE_ENV_VAR})",
                f"unset {PROFILE_ENV_VAR} to probe this machine",
            )
        )
    return checks


def _verdict(env: EnvFacts, plan: BackendPlan, blocking: list[Check], checks: list[Check]) -> str:
    if blocking:
        return "Blocked: " + "; ".join(f"{c.name}: {c.detail}" for c in blocking)
    broken = [c.name for c in checks if c.status == "fail"]
    where = f"{env.gpu_count} x {env.gpus[0].name}" if env.has_gpu else "CPU only"
    dense = plan.attention["dense"].label
    tail = f"; fix {', '.join(broken)} for the fast path" if broken else ""
    if not env.has_gpu:
        return f"Ready on {where}: fine for the tiny demo and tests; real training wants an NVIDIA GPU{tail}"
    return f"Ready on {where}: attention {dense}, norm {plan.rms_norm.label}, {plan.optimizer.label}{tail}"


def run_checks(env: EnvFacts, require: list[str] | None = None, vllm_venv=None) -> DoctorReport:
    """Every doctor check for `env`, the plans a default training run and `ghostvis infer` get, and which
    required items block. vllm_venv: vllm_env.probe_vllm_env() of this machine (None: not looked for)."""
    required = list(require or [])
    plan = default_training_plan(env)
    inference_plan = plan_run(env, inference_run_facts(env, default_model_config(TrainConfig())))
    checks = _system_checks(env) + _gpu_checks(env) + _cuda_checks(env) + _backend_checks(env, plan, vllm_venv)
    checks += _path_checks(env)
    blocking = []
    for req in required:
        decided = [c for c in checks if c.requirement == req]
        if any(c.satisfied for c in decided):
            continue
        for c in decided:
            c.status = "fail"
            c.fix = c.fix or f"required by --require {req}"
        blocking.extend(decided)
    report = DoctorReport(checks, plan, inference_plan, required, blocking)
    report.verdict = _verdict(env, plan, blocking, checks)
    return report

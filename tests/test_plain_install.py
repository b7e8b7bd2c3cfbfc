"""`pip install .` with no extras, in a venv of its own: `ghostvis train base_train --num-steps 5` exits 0 and
says the loss plot was skipped (matplotlib is optional), with nothing from this checkout on the path.

The venv (torch installed the way the Makefile does, then the package's runtime dependencies) is cached under
GHOSTVIS_TEST_CACHE (default ~/.cache/ghostvis-tests), keyed by the Python version and the dependencies in
pyproject.toml: built once (~1-2 minutes), later runs only reinstall the package from this checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"  # the Makefile's pin
KEY_FILE = "ghostvis-test-key.json"


def _pip(venv: Path, *args: str) -> None:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def _plain_venv() -> Path:
    """The cached no-extras venv holding this checkout's package, (re)built when its key changes."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    key = {"python": sys.version.split()[0], "torch": TORCH_PIN, "dependencies": deps,
           "torch_pip_args": os.environ.get("TORCH_PIP_ARGS", "")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("GHOSTVIS_TEST_CACHE", "~/.cache/ghostvis-tests")).expanduser()
    venv = root / f"plain-venv-{digest}"
    if (venv / KEY_FILE).is_file():
        # reused: only the package itself is new (its dependencies are the key)
        _pip(venv, "--force-reinstall", "--no-deps", ".")
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # a build that died half-way has no key file
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, *os.environ.get("TORCH_PIP_ARGS", "").split(), TORCH_PIN)
    _pip(venv, ".")
    (venv / KEY_FILE).write_text(json.dumps(key, indent=2))
    return venv


@pytest.mark.slow
def test_plain_pip_install_trains_and_says_the_plot_was_skipped(tmp_path):
    venv = _plain_venv()
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GHOSTVIS_DEBUG", "VIRTUAL_ENV")}
    env.update(GHOSTVIS_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    # a real no-extras install: none of the optional packages, and the package from the venv, not this checkout
    probe = subprocess.run([python, "-c", "import importlib.util as u, ghostvis_core; print(ghostvis_core.__file__); "
                            "print([m for m in ('matplotlib', 'pyarrow', 'pytest', 'transformers', 'triton', "
                            "'tensorboard', 'wandb') if u.find_spec(m)])"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    location, optional = probe.stdout.splitlines()
    assert location.startswith(str(venv)) and optional == "[]", probe.stdout + probe.stderr

    out = subprocess.run([str(venv / "bin" / "ghostvis"), "train", "base_train", "--gpus", "0", "--num-steps", "5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "loss plot skipped: matplotlib is not installed (pip install 'ghostvis[plot]')" in text
    run_dir = tmp_path / "home" / "runs" / "base_train"
    assert (run_dir / "step_000005").is_dir() and not (run_dir / "loss.png").exists()
    assert "Traceback" not in text

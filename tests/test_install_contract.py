"""What `make demo` and `make test` install (read from `make -n` in a bare copy of the Makefile and
pyproject.toml), and the demo's last question: one whose right answer the demo prints beside the model's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ghostvis_core.data.shapes import QUESTION_KINDS, main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
# Packages only the test suite needs: a venv that `make demo` made must hold none of them.
TEST_ONLY = {"pytest", "transformers", "triton", "pyarrow", "tensorboard"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _extras() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    extras["runtime"] = {_name(r) for r in project["dependencies"]}
    return extras


@pytest.fixture(scope="module")
def dry_make(tmp_path_factory):
    """`make -n TARGET` in a folder holding only the Makefile and pyproject.toml (no venv yet: a fresh clone)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    folder = tmp_path_factory.mktemp("clone")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, folder / name)

    def run(target: str) -> list[str]:
        out = subprocess.run(["make", "-n", target], cwd=folder, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    return run


def _pip_installs(lines: list[str]) -> list[str]:
    return [line.split("pip install", 1)[1].strip() for line in lines if "pip install" in line]


def test_make_demo_installs_the_demo_extra_and_nothing_from_the_test_extra(dry_make):
    installs = _pip_installs(dry_make("demo"))
    assert installs == ["torch==2.13.0", "-e '.[demo]'"]
    extras = _extras()
    assert extras["demo"] <= extras["test"]  # `make test`'s venv runs the demo too
    assert not (extras["demo"] | extras["runtime"]) & TEST_ONLY
    assert TEST_ONLY <= extras["test"]


def test_make_test_installs_the_test_extra(dry_make):
    assert _pip_installs(dry_make("test")) == ["torch==2.13.0", "-e '.[test]'"]


def test_the_demo_asks_the_question_whose_answer_it_prints(dry_make, capsys, monkeypatch, tmp_path):
    (line,) = [line for line in dry_make("demo") if "ghostvis infer" in line]
    kind = re.search(r"--ask (\w+)", line).group(1)
    prompt = re.search(r'--prompt "([^"]+)"', line).group(1)
    assert kind == "count" and kind in QUESTION_KINDS  # the kind the tiny VLM gets right (README: 98.9%)
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path))
    image = main(["--run", "demo-vlm", "--ask", kind])
    out, err = capsys.readouterr()
    assert out == f"{image}\n"  # the path alone on stdout: the Makefile takes it with $(...)
    assert err.splitlines() == ["In the image: a large blue triangle at top middle, a small red circle at top right "
                                "and a small blue square at bottom middle",
                                f"Question: {prompt} (the right answer: three)"]
    assert "tee" not in line  # `tee /dev/stderr` truncates a log file that stderr is redirected to
    assert image.is_file() and image.with_name("demo-image-large.png").is_file()


def test_asking_a_question_the_scene_does_not_have_names_the_fix(tmp_path, monkeypatch):
    from ghostvis_core.errors import ConfigError

    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="--ask larger: this scene has no such question"):
        main(["--run", "r", "--shape", "square", "--index", "1", "--ask", "larger"])

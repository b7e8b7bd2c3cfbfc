"""vLLM for real on this CPU, through the product's own path: `ghostvis install vllm` makes the environment,
then a random tiny chat model (head_dim 64: vLLM's CPU attention takes 32, 64, 80, ...) is served through
`create_vllm_engine`, `ghostvis infer --backend vllm` and `ghostvis bench --backend vllm`, with greedy tokens
identical to the native engine's in float32.

The environment is built once per machine under a fixed path (GHOSTVIS_TEST_VLLM_VENV, default
~/.cache/ghostvis-test/vllm-venv: about 4 minutes and 2.5 GB the first time; a re-run finds it usable and
`ghostvis install vllm` does nothing, or only re-links this GhostVis into it). LLaVA through vLLM is not tested
here: vLLM's LLaVA imports torchvision, and the package index has no torchvision that loads against CPU torch
2.13 (0.28.0 is a CUDA 13 build: "operator torchvision::nms does not exist"; there is no source release).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from saved_runs import save_text_run
from test_train_config import REPO

VENV = Path(os.environ.get("GHOSTVIS_TEST_VLLM_VENV", Path.home() / ".cache" / "ghostvis-test" / "vllm-venv"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                       reason="vLLM's CPU build is for Linux x86_64"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build of vLLM is tested on CPU machines"),
]
PROMPTS = ["what colour is the circle?", "a red square at the top left", "hi", "where is the small blue triangle",
           "count to 12"]


def _cli(args: list[str], home: Path, timeout: int = 900, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "GHOSTVIS_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("GHOSTVIS_VLLM_VENV", None)  # found the way a user's would be: the record `install` wrote
    return subprocess.run([python, "-m", "ghostvis_cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`ghostvis install vllm --venv VENV` as a user runs it; returns the GHOSTVIS_HOME that recorded it."""
    home = tmp_path_factory.mktemp("vllm_home")
    t0 = time.perf_counter()
    out = _cli(["install", "vllm", "--venv", str(VENV)], home)
    print(f"ghostvis install vllm: {time.perf_counter() - t0:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"lives in {VENV}" in out.stdout and "ghostvis infer --backend vllm" in out.stdout
    return home


@pytest.fixture
def vllm_here(installed, monkeypatch) -> None:
    monkeypatch.setenv("GHOSTVIS_VLLM_VENV", str(VENV))


def test_install_leaves_out_what_cannot_load_and_doctor_finds_it(installed):
    vpy = str(VENV / "bin" / "python")
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['vllm', 'torchvision', 'torchaudio', 'torchcodec', 'triton', 'ghostvis_core']}))")
    found = json.loads(subprocess.run([vpy, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert found == {"vllm": True, "torchvision": False, "torchaudio": False, "torchcodec": False,
                     "triton": False, "ghostvis_core": True}
    doctor = _cli(["doctor", "--json", "--require", "vllm"], installed)  # main environment: found by the record
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    check = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "vllm")
    assert check["status"] == "ok" and check["detail"].startswith(f"vllm 0.32.0 in its own environment {VENV}")
    inside = _cli(["doctor", "--json"], installed, python=vpy)  # inside it: vLLM is this environment's package
    assert inside.returncode == 0, inside.stderr[-2000:]
    check = next(c for c in json.loads(inside.stdout)["checks"] if c["name"] == "vllm")
    assert check["detail"] == "vllm 0.32.0 (usable; serves `ghostvis infer/bench --backend vllm` (and auto))"


def test_create_vllm_engine_gives_the_native_greedy_tokens(vllm_here):
    from ghostvis_core.engine import load_for_inference
    from ghostvis_core.sampling import SamplingParams
    from ghostvis_core.vllm_backend import create_vllm_engine

    run = save_text_run("chat-v")
    loaded = load_for_inference("chat-v")
    ids = [loaded.encode_prompt(p) for p in PROMPTS]
    native = loaded.engine.generate_many(ids, SamplingParams(), 24, 4)
    with create_vllm_engine("chat-v") as engine:
        assert engine.folder.parent == run / "hf_export" and engine.stop_token_ids == loaded.stop_token_ids
        raw = engine.generate_ids(ids, SamplingParams(), 24)
        out = engine.generate(PROMPTS, max_tokens=24)
        # a stop string taken from the middle of a reply ends both engines' text at the same place
        stop = next(c.text[len(c.text) // 2:][:2] for c in native if len(c.text.strip()) > 6)
        stopped = engine.generate(PROMPTS, max_tokens=24, stop=[stop])
    native_stopped = loaded.engine.generate_many(ids, SamplingParams(stop=(stop,)), 24, 4)
    assert [o["generated_text"] for o in stopped] == [c.text for c in native_stopped]
    assert any(o["finish_reason"] == "stop" for o in stopped) and all(stop not in o["generated_text"] for o in stopped)
    assert [o["prompt_token_ids"] for o in raw] == ids  # token ids in: one BOS, the chat template's
    same = sum(o["token_ids"] == c.token_ids for o, c in zip(out, native, strict=True))
    print(f"vLLM vs native greedy tokens (float32): {same}/{len(PROMPTS)} identical")
    assert same == len(PROMPTS)
    assert [o["finish_reason"] for o in out] == [c.finish_reason for c in native]
    assert [o["generated_text"] for o in out] == [c.text for c in native]
    assert [o["num_tokens"] for o in out] == [len(c.token_ids) for c in native]


def test_infer_and_bench_backend_vllm_through_the_cli(installed, tmp_path, capsys):
    from ghostvis_core.vllm_env import record_vllm_venv

    home = Path(os.environ["GHOSTVIS_HOME"])
    save_text_run("chat-w", seed=3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    native, served = tmp_path / "native.jsonl", tmp_path / "vllm.jsonl"
    common = ["--model", "chat-w", "--batch-file", str(prompts), "--max-tokens", "16"]
    assert run_cli(["infer", *common, "--output", str(native)], capsys)[0] == 0
    record_vllm_venv(VENV)  # this test's GHOSTVIS_HOME learns the environment as `install` records it
    out = _cli(["infer", *common, "--output", str(served), "--backend", "vllm"], home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("model: ") and "(vLLM, serving" in out.stdout
    assert "--backend vllm: vLLM 0.32.0" in out.stderr
    assert served.read_text() == native.read_text()  # same texts, token counts and finish reasons, line by line
    bench = _cli(["bench", "--backend", "vllm", "--model", "chat-w", "--num-prompts", "8", "--input-len", "16",
                  "--output-len", "16", "--json"], home)  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    r = json.loads(bench.stdout)
    assert r["backend"] == "vllm" and r["num_prompts"] == 8 and r["output_tokens"] == 8 * 16
    assert r["output_tokens_per_s"] > 0 and r["ttft_ms"] is None


def test_inside_the_environment_auto_serves_with_vllm_in_process(installed, capsys):
    home = Path(os.environ["GHOSTVIS_HOME"])
    save_text_run("chat-z", seed=5)
    args = ["infer", "--model", "chat-z", "--prompt", "what colour is the circle?", "--max-tokens", "12"]
    code, native, err = run_cli(args, capsys)
    assert code == 0, err
    inside = _cli([*args, "--backend", "auto"], home, python=str(VENV / "bin" / "python"))
    assert inside.returncode == 0, inside.stderr[-3000:]
    assert "--backend auto: vLLM 0.32.0 (in this environment; auto: vLLM is usable" in inside.stderr
    reply = lambda out: out.split("> what colour is the circle?\n", 1)[1]  # noqa: E731  (after the prompt line)
    assert reply(inside.stdout) == reply(native)

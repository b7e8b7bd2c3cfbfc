"""`ghostvis infer` modes (prompt, batch file with resume, chat through a pseudo-terminal), its one-message
errors, and `ghostvis bench --num-prompts` on CPU."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from helpers import library_log, run_cli
from test_train_config import REPO, tiny_config

from ghostvis_core.paths import runs_dir
from ghostvis_core.train.loop import train


@pytest.fixture
def run_name(tmp_path):
    train(tiny_config(tmp_path, runs_root=str(runs_dir()), run="inf", num_steps=2, save_every=0))
    return "inf"


def test_prompt_names_the_model_first(run_name, capsys):
    code, out, err = run_cli(["infer", "--prompt", "the red ball", "--max-tokens", "5"], capsys)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("model: ") and "inf" in first and "step_" in first


def test_prompt_through_an_fp8_kv_cache_and_a_bad_cache_dtype(run_name, capsys):
    code, out, err = run_cli(["infer", "--prompt", "the red ball", "--max-tokens", "5", "--kv-cache-dtype", "fp8"],
                             capsys)  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0].startswith("model: ") and len(out.splitlines()) >= 2
    code, _, err = run_cli(["infer", "--prompt", "the red ball", "--kv-cache-dtype", "fp4"], capsys)
    assert code == 2 and "--kv-cache-dtype 'fp4': expected one of auto, fp8" in err and "Traceback" not in err


def test_batch_file_resume_gives_the_uninterrupted_file(run_name, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the red ball\n\nblue box\na cat\nthe dog runs\nfive\n")
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    common = ["--model", run_name, "--batch-file", str(prompts), "--max-tokens", "6", "--temperature", "0.9",
              "--batch-size", "1"]  # fmt: skip
    assert run_cli(["infer", *common, "--output", str(full)], capsys)[0] == 0
    lines = full.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2, 3, 4]  # the empty line is not a prompt
    assert run_cli(["infer", *common, "--output", str(part), "--limit", "2"], capsys)[0] == 0  # "interrupted"
    with open(part, "a") as f:
        f.write('{"index": 2, "prompt": "a ca')  # a line cut short by a crash
    code, _, err = run_cli(["infer", *common, "--output", str(part)], capsys)
    assert code == 2 and "--resume" in err  # an existing results file is never appended to silently
    code, _, err = run_cli(["infer", *common, "--output", str(part), "--resume"], capsys)
    assert code == 0, err
    assert part.read_text() == full.read_text()


@pytest.mark.parametrize("content, suffix, match", [
    ('{"prompt": "ok"}\n{"prompt": \n', ".jsonl", "p.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n{"text": "x"}\n', ".jsonl", "p.jsonl:2: needs a non-empty string \"prompt\""),
    ("\n  \n", ".txt", "has no prompts"),
])  # fmt: skip
def test_bad_batch_files_are_one_message(tmp_path, capsys, content, suffix, match):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    code, _, err = run_cli(["infer", "--batch-file", str(path), "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, match", [
    (["--prompt", "  "], "--prompt is empty"),
    (["--model", "nope", "--prompt", "hi"], "nope"),
    (["--prompt", "hi", "--backend", "vllm"], "no vLLM environment at"),
    ([], "pass exactly one of --prompt"),
])  # fmt: skip
def test_bad_inputs_are_one_message(tmp_path, capsys, args, match):
    code, _, err = run_cli(["infer", *args], capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_too_many_tokens_is_capped_with_a_warning(run_name, capsys, caplog):
    code, _, _ = run_cli(["infer", "--prompt", "the red ball", "--max-tokens", "100000"], capsys)
    assert code == 0
    assert "--max-tokens 100000 does not fit the 256-token context" in caplog.text and "at most" in caplog.text


def _read_until(fd, needle: bytes, timeout: float = 60.0) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        assert left > 0, f"timed out waiting for {needle!r}; got {buf[-400:]!r}"
        if select.select([fd], [], [], left)[0]:
            buf += os.read(fd, 4096)
    return buf


@contextlib.contextmanager
def _chat(*args: str):
    """`ghostvis infer --chat ARGS` on a pseudo-terminal: yields (its fd, the process); killed if still running."""
    main, child = pty.openpty()
    # a wide terminal: Rich wraps its notes at the terminal's width (80 columns when it has none), and a long
    # temporary image path would split the phrases the tests look for across lines
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    proc = subprocess.Popen([sys.executable, "-m", "ghostvis_cli", "infer", "--chat", *args],
                            stdin=child, stdout=child, stderr=child, env=env, cwd=REPO)  # fmt: skip
    os.close(child)
    try:
        yield main, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


def test_chat_through_a_pseudo_terminal(run_name):
    with _chat("--max-tokens", "8") as (main, proc):
        assert b"model: " in _read_until(main, b"> ")
        os.write(main, b"the red ball\n")
        _read_until(main, b"> ")
        os.write(main, b"/image x.png\n")
        assert b"needs a VLM run" in _read_until(main, b"> ")
        os.write(main, b"/reset\n")
        assert b"conversation reset" in _read_until(main, b"> ")
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0


def test_chat_with_images_on_a_vision_run(tmp_path):
    from PIL import Image
    from saved_runs import save_vlm_run

    from ghostvis_core.engine import generate_text, load_for_inference

    save_vlm_run("vis")
    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 30, 30)).save(picture)
    want = generate_text(load_for_inference("vis"), "what colour is it?", 8, image=picture)
    with _chat("--model", "vis", "--max-tokens", "8") as (main, proc):
        _read_until(main, b"> ")
        os.write(main, b"/image nope.png\n")
        assert b"no such image file" in _read_until(main, b"> ")
        os.write(main, f"/image {picture}\n".encode())
        assert b"goes with your next message" in _read_until(main, b"> ")
        os.write(main, b"what colour is it?\n")
        reply = _read_until(main, b"> ")
        assert want.encode() in reply.replace(b"\r\n", b"\n")  # the same answer as `infer --prompt --image`
        os.write(main, b"and now?\n")  # a second turn: the first turn's image is embedded again
        assert b"Traceback" not in _read_until(main, b"> ")
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0


def test_bench_num_prompts_json_on_cpu(capsys):
    args = ["bench", "--num-prompts", "8", "--input-len", "8", "--output-len", "8", "--preset", "tiny", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["num_prompts"] == 8 and r["output_tokens"] == 64 and r["cuda_graphs"] is False
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "latency_ms_per_prompt"):
        assert r[key] > 0
    assert set(r["ttft_ms"]) == {"mean", "p50", "p99"} and set(r["latency_ms"]) == {"p50", "p90", "p99"}
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    code, out, _ = run_cli(["bench", "--num-prompts", "0", "--preset", "tiny", "--json"], capsys)
    assert code == 2 and "--num-prompts must be >= 1" in json.loads(out)["error"]


def test_bench_with_an_fp8_kv_cache_on_cpu_and_a_bad_cache_dtype(capsys):
    args = ["bench", "--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--preset", "tiny",
            "--batch-size", "2", "--kv-cache-dtype", "fp8"]
    code, out, err = run_cli(args + ["--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["kv_cache_dtype"] == "fp8" and r["output_tokens"] == 24
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "KV cache fp8 e4m3 (per-token scales)" in out, err
    code, out, _ = run_cli(args[:-1] + ["int8", "--json"], capsys)
    assert code == 2 and "--kv-cache-dtype 'int8': expected one of auto, fp8" in json.loads(out)["error"]


def test_bench_compare_hf_warms_up_every_batch_shape_before_timing(capsys, monkeypatch):
    from transformers import LlamaForCausalLM

    shapes = []
    real = LlamaForCausalLM.generate

    def counting(self, input_ids, **kw):
        shapes.append(tuple(input_ids.shape))
        return real(self, input_ids, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "generate", counting)
    args = ["bench", "--num-prompts", "5", "--input-len", "8", "--output-len", "4", "--preset", "tiny",
            "--batch-size", "2", "--compare", "hf", "--json"]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    # warm-up of the 1-row and 2-row shapes, then the timed 2 + 2 + 1
    assert shapes == [(1, 8), (2, 8), (2, 8), (2, 8), (1, 8)]
    hf = json.loads(out)["compare"]["hf"]
    assert hf["output_tokens_per_s"] > 0 and hf["ratio"] > 0



def test_the_default_max_tokens_fills_the_context_quietly(run_name, capsys, caplog):
    with library_log(caplog):
        code, _, err = run_cli(["infer", "--prompt", "the red ball"], capsys)  # 256 default, 256-token context
    assert code == 0, err
    assert "does not fit" not in caplog.text and "does not fit" not in err


def test_bench_compare_hf_over_several_batch_sizes_takes_hfs_best(capsys, monkeypatch):
    """--hf-batch-sizes times HF at each size on the same prompts; the ratio is against the fastest."""
    from ghostvis_core.bench import infer_bench

    speeds = {1: 50.0, 3: 200.0, 2: 120.0}  # tok/s per HF batch size (the timing itself is stubbed)
    seen = []

    def fake_hf(model, prompts, output_len, batch_size):
        seen.append((len(prompts), batch_size))
        return {"elapsed_s": 1.0, "output_tokens_per_s": speeds[batch_size]}

    monkeypatch.setattr(infer_bench, "hf_static_generate", fake_hf)
    args = ["bench", "--num-prompts", "5", "--input-len", "8", "--output-len", "4", "--preset", "tiny",
            "--batch-size", "2", "--compare", "hf", "--hf-batch-sizes", "1,3,2,3"]  # fmt: skip
    code, out, err = run_cli(args + ["--json"], capsys)
    assert code == 0, err
    assert seen == [(5, 1), (5, 3), (5, 2)]  # every prompt at each size, a repeated size once
    r = json.loads(out)
    hf = r["compare"]["hf"]
    assert (hf["batch_size"], hf["output_tokens_per_s"]) == (3, 200.0)
    assert hf["ratio"] == pytest.approx(r["output_tokens_per_s"] / 200.0)
    assert [x["batch_size"] for x in hf["runs"]] == [1, 3, 2]
    code, out, _ = run_cli(args, capsys)
    text = " ".join(out.split())  # the console wraps long lines
    assert code == 0 and "batch 1 50.0, batch 3 200.0, batch 2 120.0" in text and "at batch 3 (its best)" in text
    for bad, match in ((["--hf-batch-sizes", "64,x"], "integers separated by commas"),
                       (["--hf-batch-sizes", "0"], "must all be >= 1")):  # fmt: skip
        code, out, _ = run_cli(args[:-2] + bad + ["--json"], capsys)
        assert code == 2 and match in json.loads(out)["error"]
    code, out, _ = run_cli(["bench", "--preset", "tiny", "--hf-batch-sizes", "4", "--json"], capsys)
    assert code == 2 and "pass --compare hf too" in json.loads(out)["error"]


def test_batch_file_with_images_answers_each_line_as_prompt_and_image_would(tmp_path, capsys):
    """A vision run's jsonl batch: lines with an image (relative to the file's folder) and without one, batched
    together, each result equal to `infer --prompt [--image]` on its own (greedy) and naming its image."""
    from PIL import Image
    from saved_runs import save_text_run, save_vlm_run

    from ghostvis_core.engine import generate_text, load_for_inference

    save_vlm_run("vis")
    folder = tmp_path / "set"
    (folder / "img").mkdir(parents=True)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        Image.new("RGB", (40, 40), colour).save(folder / "img" / f"{name}.png")
    lines = [{"prompt": "what colour is it?", "image": "img/red.png"}, {"prompt": "say something"},
             {"prompt": "what colour is it?", "image": str(folder / "img" / "blue.png")}]  # fmt: skip
    batch = folder / "q.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    args = ["infer", "--model", "vis", "--batch-file", str(batch), "--max-tokens", "8", "--batch-size", "3"]
    code, _, err = run_cli([*args, "--output", str(out)], capsys)
    assert code == 0, err
    got = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda r: r["index"])
    loaded = load_for_inference("vis")
    want = [generate_text(loaded, x["prompt"], 8, image=folder / x["image"] if "image" in x else None) for x in lines]
    assert [r["text"] for r in got] == want
    assert [r.get("image") for r in got] == [x.get("image") for x in lines]
    assert want[0] != want[2]  # the two images give two answers: each line's own image reached the model

    # a missing image fails before the model loads, naming the line; an image on a text run is one message
    (folder / "bad.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "and this?", "image": "img/none.png"}\n')
    code, _, err = run_cli(["infer", "--model", "vis", "--batch-file", str(folder / "bad.jsonl"), "--output",
                            str(tmp_path / "o2.jsonl")], capsys)  # fmt: skip
    assert code == 2 and "bad.jsonl:2: image 'img/none.png': no such file" in err and "Traceback" not in err
    (folder / "img" / "broken.png").write_bytes(b"not a png")  # exists, so it fails when its row is prefilled
    (folder / "broken.jsonl").write_text('{"prompt": "and this?", "image": "img/broken.png"}\n')
    code, _, err = run_cli(["infer", "--model", "vis", "--batch-file", str(folder / "broken.jsonl"), "--output",
                            str(tmp_path / "o4.jsonl")], capsys)  # fmt: skip
    assert code == 2 and "broken.png" in err and "Traceback" not in err
    save_text_run("txt", data_format="chat")
    code, _, err = run_cli(["infer", "--model", "txt", "--batch-file", str(batch), "--output",
                            str(tmp_path / "o3.jsonl")], capsys)  # fmt: skip
    assert code == 2 and "q.jsonl:1: image 'img/red.png'" in err and "cannot see images" in err
    assert not (tmp_path / "o3.jsonl").exists()  # checked before the results file is opened


def test_bench_on_a_vision_run_times_its_language_model(capsys):
    """`ghostvis bench --model VISION_RUN`: random text prompts through the engine's language model (it had
    crashed reading the VLM's config for a GPT's)."""
    from saved_runs import save_vlm_run

    save_vlm_run("vis")
    args = ["bench", "--model", "vis", "--num-prompts", "3", "--input-len", "6", "--output-len", "5", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["output_tokens"] == 15 and "vis" in r["model"] and r["output_tokens_per_s"] > 0

"""Shared test helpers, one copy each: machine profiles, running the CLI, numeric references and tolerances,
checkpoint hashing, and the signal-a-training-subprocess loop. Fixtures live in conftest.py.

Shape legend: B batch, T time (tokens), H query heads, D head dim.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
import typer

from ghostvis_core.env import EnvFacts, GPUInfo, PackageStatus

# ---- machine profiles ------------------------------------------------------------------------------------

FA2_UNDEFINED_SYMBOL = (
    "ImportError: /usr/lib/python3.12/site-packages/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: "
    "undefined symbol: _ZN3c104cuda9SetDeviceEi"
)

# name -> (GPU name, capability, memory GiB); None = no GPU.
GPU_PROFILES: dict[str, tuple[str, tuple[int, int], float] | None] = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 79.2),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 79.2),
    "v100": ("Tesla V100-SXM2-32GB", (7, 0), 31.7),
    "t4": ("Tesla T4", (7, 5), 14.6),
    "rtx4090": ("NVIDIA GeForce RTX 4090", (8, 9), 23.5),
    "b200": ("NVIDIA B200", (10, 0), 178.4),
    "windows_gpu": ("NVIDIA GeForce RTX 3090", (8, 6), 24.0),
    "cpu": None,
}


def _pkg(name: str, version: str | None = None, **kw) -> PackageStatus:
    """An installed-and-importable package, or a not-installed one when version is None."""
    if version is None:
        return PackageStatus(name=name, installed=False)
    return PackageStatus(
        name=name, installed=True, version=version, importable=kw.pop("importable", True), **kw
    )


def make_env(
    profile: str,
    *,
    num_gpus: int = 1,
    flash_attn: str | None = None,
    flash_attn_error: str | None = None,
    triton: str | None = "auto",
    apex: str | None = None,
    apex_ext: bool = True,
    vllm: str | None = None,
    liger: str | None = None,
    torch_version: str = "2.11.0+cu130",
    muon: bool = True,
    nvcc: str | None = "13.0",
    ninja: str | None = "1.11.1",
    ram_gib: float = 256.0,
    cpu_count: int = 32,
) -> EnvFacts:
    """Build EnvFacts for a named machine profile (see GPU_PROFILES) with chosen optional packages."""
    gpu = GPU_PROFILES[profile]
    windows = profile == "windows_gpu"
    has_gpu = gpu is not None
    if not has_gpu:
        torch_version = "2.13.0+cpu"
    if triton == "auto":
        # Triton ships with torch on Linux; on Windows it is a separate, usually absent, install.
        triton = None if windows else ("3.6.0" if has_gpu else "3.9.0")
    packages = {
        "triton": _pkg("triton", triton),
        "flash_attn": _pkg("flash_attn", flash_attn),
        "apex": _pkg(
            "apex", apex, extensions={"fused_layer_norm_cuda": apex_ext, "amp_C": apex_ext} if apex else {}
        ),
        "vllm": _pkg("vllm", vllm),
        "liger_kernel": _pkg("liger_kernel", liger),
    }
    if flash_attn_error is not None:
        from ghostvis_core.env import diagnose_import_error

        packages["flash_attn"] = PackageStatus(
            name="flash_attn",
            installed=True,
            version=flash_attn or "2.8.3",
            importable=False,
            error=flash_attn_error,
            diagnosis=diagnose_import_error("flash_attn", flash_attn_error, torch_version),
        )
    gpus = [GPUInfo(i, gpu[0], gpu[1], gpu[2]) for i in range(num_gpus)] if has_gpu else []
    return EnvFacts(
        os_name="Windows" if windows else "Linux",
        os_release="10" if windows else "6.8.0",
        machine="AMD64" if windows else "x86_64",
        python="3.12.3",
        torch_version=torch_version,
        torch_cuda=("13.0" if has_gpu else None),
        cuda_available=has_gpu,
        driver="580.65.06" if has_gpu else None,
        cudnn="91900" if has_gpu else None,
        nccl=("2.27.7" if has_gpu and not windows else None),
        gpus=gpus,
        visible_devices=None,
        nvcc=nvcc if has_gpu else None,
        ninja=ninja,
        ram_gib=ram_gib,
        cpu_count=cpu_count,
        runs_dir="/tmp/ghostvis/runs",
        disk_free_gib=500.0,
        packages=packages,
        torch_features={"flex_attention": True, "muon": muon, "cudnn_sdpa": has_gpu},
    )


def poison_loss_at(monkeypatch, loop_module, call: int) -> None:
    """Make the loop's forward_sum return NaN on its `call`-th call (1-based), the real loss otherwise."""
    calls = {"n": 0}
    real = loop_module.forward_sum

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(loop_module, "forward_sum", poisoned)


def write_profile(env: EnvFacts, path: Path) -> Path:
    """Write EnvFacts as the JSON that GHOSTVIS_ENV_PROFILE reads."""
    path.write_text(json.dumps(env.to_dict()))
    return path


# ---- running the CLI -------------------------------------------------------------------------------------


def assert_same_batch(a: dict, b: dict) -> None:
    """Two loader batches are equal: the same keys, tensors equal in dtype and value, host ints equal."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@contextlib.contextmanager
def triton_interpreted(*module_names: str) -> Iterator[list]:
    """The modules imported fresh with TRITON_INTERPRET=1 (Triton decides interpret-or-compile when a kernel
    is decorated), so their kernels run on the CPU; removed again afterwards so later importers get the
    normal compiled kernels."""
    import importlib
    import os

    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_modules = {name: sys.modules.pop(name, None) for name in module_names}
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield [importlib.import_module(name) for name in module_names]
    finally:
        for name, module in saved_modules.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the console entry point in-process; return (exit code, stdout, stderr)."""
    from ghostvis_cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)  # main always exits; this only guards against a silent return
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


@contextlib.contextmanager
def fresh_log_handlers() -> Iterator[None]:
    """The library logger without its handlers for the body (a trainer run in-process then binds a new one to
    the current, captured, stderr), and exactly its old handlers after it: a handler bound to an earlier
    test's captured stream would raise "I/O operation on closed file" into the output."""
    from ghostvis_core.log import get_logger

    logger = get_logger()
    saved = list(logger.handlers)
    for handler in saved:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        for handler in saved:
            logger.addHandler(handler)


@contextlib.contextmanager
def library_log(caplog) -> Iterator[None]:
    """caplog sees the library logger's records at INFO and above for the body, whether or not the trainer's
    setup_logging (which stops propagation to the root logger) already ran in this process."""
    from ghostvis_core.log import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(previous)


def in_process_child(cmd: Sequence[str], env, **_) -> int:
    """A stand-in for launch.run_child that runs the recipe of `cmd` (`-m recipes.X --config FILE`) in this
    process: the same code both sides of the process boundary, without a second interpreter's start-up."""
    import importlib

    from recipes._main import run_recipe

    module = importlib.import_module(cmd[cmd.index("-m") + 1])
    with fresh_log_handlers():
        return run_recipe(list(cmd[cmd.index("--config"):]), module.default_config, "recipe")


def run_cli_process(args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m ghostvis_cli ARGS` in a real process (real entry point, real exit code), text output."""
    kwargs.setdefault("timeout", 120)
    return subprocess.run(
        [sys.executable, "-m", "ghostvis_cli", *args], capture_output=True, text=True, **kwargs
    )


def cli_app(*registers: Callable[[typer.Typer], None]) -> typer.Typer:
    """A bare Typer app with a root callback and the given subcommands (their `register` functions), for
    CliRunner tests that check what a command raises rather than how `main` renders it."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    for register in registers:
        register(app)
    return app


# ---- numeric references ----------------------------------------------------------------------------------

# dtype -> (atol, rtol) elementwise, and the bound on ||out - ref|| / ||ref||, for kernels vs float64.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5, 1e-6),
    torch.bfloat16: (5e-2, 2e-2, 1e-2),
    torch.float16: (5e-3, 2e-3, 1e-3),
}


def assert_close(
    name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, summed: int = 1
) -> None:
    """Per-dtype elementwise and relative-norm check against a float64 reference; prints the diffs.

    `summed`: rows a gradient sums over (the weight gradient); its rounding errors grow like sqrt(summed).
    """
    atol, rtol, rel_max = TOLERANCES[dtype]
    atol *= summed**0.5
    out, ref = out.detach(), ref.detach()
    diff = (out.double() - ref).abs()
    rel = float(diff.norm() / ref.norm())
    print(
        f"{name:>6} {str(dtype):>15}: max {diff.max().item():.3e} mean {diff.mean().item():.3e} rel {rel:.3e}"
    )
    assert torch.isfinite(out).all()
    assert rel <= rel_max, f"{name}: relative error {rel:.3e} > {rel_max:.1e}"
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def float64_leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of `t` that takes gradients: the input of a reference computation."""
    return t.detach().double().requires_grad_()


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, in the dtype of x (float64 for a reference)."""
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return n if w is None else n * w


def hf_llama_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm: normalize in float32, round to x's dtype, then scale by w (promoting)."""
    x_f32 = x.float()
    return w * (x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attention_reference(q, k, v, allowed_BTT: torch.Tensor) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D)) v with GQA by repeating K/V heads; (B, T, H, D) layout.

    `allowed_BTT[b, i, j]`: query i of row b may attend to key j.
    """
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed_BTT[:, None], float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def assert_max_diff(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """max |got - ref| below atol; prints max and mean difference."""
    diff = (got.double() - ref).abs()
    print(f"{name}: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < atol, name


# ---- checkpoints -----------------------------------------------------------------------------------------


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path: equal before and after = nothing changed."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- signals ---------------------------------------------------------------------------------------------


def signal_after_metrics(
    cmd: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    metrics: Path,
    *,
    records: int,
    sig: signal.Signals,
    start_timeout_s: float = 240,
    stop_timeout_s: float = 120,
) -> tuple[int, str, str]:
    """Start a training subprocess, send `sig` once `metrics` holds `records` lines, and wait for it to exit.

    Returns (exit code, stdout, stderr). Fails if the process exits before that, or takes over
    start_timeout_s to get there (a hang, not a speed check).
    """
    from ghostvis_core.train.metrics import read_metrics

    proc = subprocess.Popen(
        list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not (metrics.exists() and len(read_metrics(metrics)) >= records):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=stop_timeout_s)
    finally:
        if proc.poll() is None:  # a failed wait must not leave a trainer running after the test
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def one_process_and_two_ranks(tmp_path, recipe: str, single, multi, env) -> tuple[list[dict], list[dict], str]:
    """Run `recipe` with config `single` in one process and `multi` under torchrun on 2 CPU ranks (gloo);
    returns both runs' metrics.jsonl records and the 2-rank run's stderr. Both runs must exit 0."""
    import subprocess
    import sys

    from ghostvis_core.train.metrics import read_metrics

    single.to_json(tmp_path / "single.json")
    multi.to_json(tmp_path / "multi.json")
    one = subprocess.run([sys.executable, "-m", f"recipes.{recipe}", "--config", str(tmp_path / "single.json")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", f"recipes.{recipe}", "--config", str(tmp_path / "multi.json")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    return read_metrics(single.run_dir / "metrics.jsonl"), read_metrics(multi.run_dir / "metrics.jsonl"), two.stderr


def greedy_divergence(model, prompts: Sequence[Sequence[int]], got: Sequence[Sequence[int]],
                      want: Sequence[Sequence[int]]) -> list[dict]:  # fmt: skip
    """Where two greedy runs of `model` part: for each prompt whose tokens differ, the first differing position,
    both tokens there, and the top-2 margin of the float32 logits after the shared prefix (a float32 copy of
    model, run eagerly), with the logit gap between the two picks. A gap near 0 is a near-tie that bf16 rounding
    can flip; a gap of the size of typical logit spreads means one run picked a wrong token.

    The reference is a new GPT under its own float32 plan, loaded from model's state dict: `.float()` on a copy
    would leave a served model's fused q|k|v and gate|up tensors (GPT.fuse_projections_) in their dtype, and
    its plan's attention backends (flash-attn) were chosen for bf16."""
    from ghostvis_core.engine import inference_plan
    from ghostvis_core.gpt import GPT

    device = next(model.parameters()).device
    with torch.device(device):
        ref = GPT(model.config, inference_plan(model.config, device.type, "float32", compile=False))
    ref.load_state_dict(model.state_dict())
    ref.eval()
    report = []
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if list(a) == list(b):
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if k is None:  # one is a prefix of the other: a length difference, no token to compare
            report.append({"prompt": i, "lengths": (len(a), len(b))})
            continue
        ids = torch.tensor([list(prompts[i]) + list(a[:k])], device=device)
        with torch.no_grad():
            logits = ref(ids)[0, -1].double()
        top = logits.topk(2)
        report.append({"prompt": i, "at": k, "got": a[k], "want": b[k],
                       "fp32_top2_margin": float(top.values[0] - top.values[1]),
                       "fp32_gap_got_minus_want": float(logits[a[k]] - logits[b[k]])})  # fmt: skip
    return report

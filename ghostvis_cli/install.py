"""`ghostvis install EXTRA`: print or run the exact install commands for this machine, then re-probe."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from ghostvis_core.env import probe_env
from ghostvis_core.install_plan import EXTRAS, VLLM_VENV, InstallPlan, plan_install, resolve_extra
from ghostvis_core.vllm_env import venv_child_env

# Runs in the target environment (a fresh process: imports cached in this one would lie).
_PROBE_CODE = (
    "import json, sys; from ghostvis_core.env import probe_package; "
    "s = probe_package(sys.argv[1]); "
    "print(json.dumps({'usable': s.usable, 'version': s.version, 'error': s.error, 'diagnosis': s.diagnosis}))"
)


def render_plan(plan: InstallPlan, console: Console) -> None:
    """Print the plan: summary, notes, then the commands."""
    console.print(Text(plan.summary, style="bold"), soft_wrap=True)
    for note in plan.notes:
        console.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    for i, step in enumerate(plan.steps, 1):
        console.print(Text(f"# {i}. {step.description}", style="dim"), soft_wrap=True)
        console.print(Text(step.shell_line()), soft_wrap=True)


def reprobe(plan: InstallPlan, venv: str | None) -> dict:
    """Probe the package in a fresh interpreter of the environment that received it (venv: vLLM's own)."""
    if venv is not None:
        from ghostvis_core.vllm_env import probe_vllm_env

        status = probe_vllm_env(venv, refresh=True)
        return {"usable": status.usable, "version": status.vllm_version, "error": status.error}
    out = subprocess.run(
        [plan.probe_python, "-c", _PROBE_CODE, plan.package], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"usable": False, "error": lines[-1] if lines else f"probe exited {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def install(
    extra: str = typer.Argument(..., help=f"What to install: {', '.join(EXTRAS)}."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands without running them."),
    here: bool = typer.Option(
        False, "--here", help="vllm: install into this environment, not a separate venv."
    ),
    venv: str = typer.Option(
        None, "--venv", help=f"vllm: the separate environment to create (default: the recorded one, else {VLLM_VENV})."
    ),
    force: bool = typer.Option(False, "--force", help="Run the commands even if the package already works."),
) -> None:
    """Install an optional backend with the right flags for this torch, CUDA and GPU, then check it works."""
    console = Console(highlight=False)
    separate = resolve_extra(extra) == "vllm" and not here
    venv_status = None
    if separate:
        from ghostvis_core.vllm_env import probe_vllm_env, vllm_venv

        venv = str(Path(venv).expanduser()) if venv else str(vllm_venv()[0])
        venv_status = probe_vllm_env(venv)
    plan = plan_install(extra, probe_env(), here=here, venv=venv or VLLM_VENV, venv_status=venv_status)
    render_plan(plan, console)
    if dry_run:
        return
    if plan.already_usable and not force:
        console.print(Text("nothing to do (pass --force to reinstall)", style="green"))
        if separate:
            _vllm_ready(venv, plan, venv_status.vllm_version, console)
        return
    if plan.already_usable and force and separate:
        plan = plan_install(extra, probe_env(), venv=venv)  # every step, as in a fresh environment
    for i, step in enumerate(plan.steps, 1):
        console.print(
            Text(f"==> {i}/{len(plan.steps)} {step.description}", style="bold cyan"), soft_wrap=True
        )
        # the separate vLLM environment must not see this one's packages through PYTHONPATH
        base = venv_child_env() if separate else os.environ
        result = subprocess.run(step.argv, env={**base, **step.env}, cwd=step.cwd)
        if result.returncode != 0:
            console.print(
                Text(
                    f"error: step {i} failed with exit code {result.returncode}: {step.shell_line()}",
                    style="red",
                ),
                soft_wrap=True,
            )
            raise typer.Exit(code=1)
    status = reprobe(plan, venv if separate else None)
    if status.get("usable"):
        console.print(Text(f"{plan.package} {status.get('version') or ''} is now usable", style="bold green"))
        if separate:
            _vllm_ready(venv, plan, status.get("version"), console)
        return
    why = status.get("diagnosis") or status.get("error") or "it does not import"
    console.print(
        Text(f"error: {plan.package} is installed but not usable: {why}", style="bold red"), soft_wrap=True
    )
    raise typer.Exit(code=1)


def _vllm_ready(venv: str, plan: InstallPlan, version: str | None, console: Console) -> None:
    """Remember the vLLM environment and say how to use it."""
    from ghostvis_core.vllm_env import record_vllm_venv

    record = record_vllm_venv(venv)
    py = plan.probe_python
    lines = [
        f"vLLM {version or ''} lives in {venv} (recorded in {record}; GHOSTVIS_VLLM_VENV overrides it).",
        "From this environment, GhostVis drives it for you:",
        '  ghostvis infer --backend vllm --model RUN --prompt "..."',
        "  ghostvis bench --backend vllm --model RUN --num-prompts 100",
        "  ghostvis doctor            (reports it)",
        "Inside it (vLLM itself, and GhostVis's Python API):",
        f"  source {venv}/bin/activate",
        f"  {py} -c \"from ghostvis_core.vllm_backend import create_vllm_engine; "
        "print(create_vllm_engine('RUN').generate(['hi'], max_tokens=20)[0]['generated_text'])\"",
    ]
    console.print(Text("\n".join(lines)), soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `ghostvis install` to the app."""
    app.command("install")(install)

"""`ghostvis install EXTRA`: print or run the exact install commands for this machine, then re-probe."""

from __future__ import annotations

import json
import os
import subprocess

import typer
from rich.console import Console
from rich.text import Text

from ghostvis_core.env import probe_env
from ghostvis_core.install_plan import EXTRAS, VLLM_VENV, InstallPlan, plan_install

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


def reprobe(plan: InstallPlan) -> dict:
    """Probe the package in a fresh interpreter of the environment that received it."""
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
    venv: str = typer.Option(VLLM_VENV, "--venv", help="vllm: the separate environment to create."),
    force: bool = typer.Option(False, "--force", help="Run the commands even if the package already works."),
) -> None:
    """Install an optional backend with the right flags for this torch, CUDA and GPU, then check it works."""
    console = Console(highlight=False)
    plan = plan_install(extra, probe_env(), here=here, venv=venv)
    render_plan(plan, console)
    if dry_run:
        return
    if plan.already_usable and not force:
        console.print(Text("nothing to do (pass --force to reinstall)", style="green"))
        return
    for i, step in enumerate(plan.steps, 1):
        console.print(
            Text(f"==> {i}/{len(plan.steps)} {step.description}", style="bold cyan"), soft_wrap=True
        )
        result = subprocess.run(step.argv, env={**os.environ, **step.env}, cwd=step.cwd)
        if result.returncode != 0:
            console.print(
                Text(
                    f"error: step {i} failed with exit code {result.returncode}: {step.shell_line()}",
                    style="red",
                ),
                soft_wrap=True,
            )
            raise typer.Exit(code=1)
    status = reprobe(plan)
    if status.get("usable"):
        console.print(Text(f"{plan.package} {status.get('version') or ''} is now usable", style="bold green"))
        return
    why = status.get("diagnosis") or status.get("error") or "it does not import"
    console.print(
        Text(f"error: {plan.package} is installed but not usable: {why}", style="bold red"), soft_wrap=True
    )
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add `ghostvis install` to the app."""
    app.command("install")(install)

"""`ghostvis doctor`: render the machine's facts, checks and backend choices (the logic is in ghostvis_core)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.text import Text

from ghostvis_core.doctor_checks import GROUPS, REQUIREMENTS, DoctorReport, parse_requirements, run_checks
from ghostvis_core.env import probe_env

_MARK = {"ok": ("[ok]", "green"), "warn": ("[!] ", "yellow"), "fail": ("[x] ", "bold red")}


def render(report: DoctorReport, console: Console) -> None:
    """Print the report: checks grouped, the backend choices per case, and the verdict."""
    console.print(Text("GhostVis doctor", style="bold"))
    width = max(len(c.name) for c in report.checks)
    for group in GROUPS:
        checks = [c for c in report.checks if c.group == group]
        if not checks:
            continue
        console.print(Text(group, style="bold cyan"))
        for c in checks:
            mark, style = _MARK[c.status]
            line = Text("  ")
            line.append(mark, style=style)
            line.append(f" {c.name.ljust(width)}  {c.detail}")
            console.print(line, soft_wrap=True)
            if c.fix:
                console.print(Text(f"       {' ' * width}  -> {c.fix}", style="dim"), soft_wrap=True)
    _render_plan(console, f"Backend choices: training ({_run_line(report.plan, 'torch.compile per block')})",
                 report.plan, training=True)
    _render_plan(console, f"Backend choices: ghostvis infer ({_run_line(report.inference_plan, 'compiled decode step')})",
                 report.inference_plan, training=False)
    style = "bold red" if report.blocking else "bold green"
    console.print(Text(report.verdict, style=style), soft_wrap=True)


def _run_line(plan, compiled: str) -> str:
    f = plan.facts
    return f"{f.device_type}, {f.dtype}, {compiled if f.compiled else 'eager'}"


def _render_plan(console: Console, title: str, plan, *, training: bool) -> None:
    console.print(Text(title, style="bold cyan"))
    rows = [(f"attention {case}", choice) for case, choice in plan.attention.items()]
    rows += [("rms_norm", plan.rms_norm), ("swiglu", plan.swiglu)]
    rows += [("optimizer", plan.optimizer)] if training else [("inference", plan.inference)]
    key_width = max(len(k) for k, _ in rows)
    label_width = max(len(c.label) for _, c in rows)
    for key, choice in rows:
        line = Text(f"  {key.ljust(key_width)}  ")
        line.append(choice.label.ljust(label_width), style="bold")
        line.append(f"  {choice.reason}", style="dim")
        console.print(line, soft_wrap=True)


def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the facts, checks and choices as JSON only."),
    require: str = typer.Option(
        "",
        "--require",
        help=f"Comma-separated things that must be usable (exit 1 otherwise): {', '.join(REQUIREMENTS)}.",
        metavar="NAMES",
    ),
) -> None:
    """Check this machine: GPU, CUDA stack, optional backends, paths, and which implementation runs where."""
    import os

    from ghostvis_core.env import PROFILE_ENV_VAR

    required = parse_requirements(require)
    env = probe_env()
    venv = None
    if not os.environ.get(PROFILE_ENV_VAR) and not env.package("vllm").installed:
        from ghostvis_core.vllm_env import probe_vllm_env

        venv = probe_vllm_env()  # the separate environment of `ghostvis install vllm` (replayed facts: not this machine's)
    report = run_checks(env, required, venv)
    if json_out:
        typer.echo(json.dumps(report.to_dict(env), indent=2))
    else:
        render(report, Console(highlight=False))
    raise typer.Exit(code=report.exit_code)


def register(app: typer.Typer) -> None:
    """Add `ghostvis doctor` to the app."""
    app.command("doctor")(doctor)

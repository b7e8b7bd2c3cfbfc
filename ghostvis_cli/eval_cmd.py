"""`ghostvis eval RUN`: render a vision run's held-out accuracy next to chance (the scoring is in ghostvis_core)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def eval_run(
    run: str = typer.Argument(None, help="Run name or folder, or a step_NNNNNN checkpoint (default: the newest)."),
    data: str = typer.Option(None, "--data", help="LLaVA-style json/jsonl of questions (default: built-in held-out)."),
    image_root: str = typer.Option(None, "--image-root", help="Folder the data's image paths are relative to."),
    num: int = typer.Option(300, "--num", min=1, help="Most questions to ask."),
    baseline: bool = typer.Option(False, "--baseline", help="Add the text-only ceiling column."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16 | float16 | float32 | auto."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    examples: int = typer.Option(5, "--examples", help="Sample answers to print under the table (0: none)."),
) -> None:
    """Accuracy of a vision run on held-out image questions (exact match), next to chance."""
    from ghostvis_core.errors import ConfigError
    from ghostvis_core.evaluate import evaluate_run
    from ghostvis_core.log import setup_logging

    if examples < 0:
        raise ConfigError(f"--examples must be >= 0 (got {examples})")
    setup_logging()
    report = evaluate_run(run, data=data, image_root=image_root, limit=num, baseline=baseline, dtype=dtype,
                          num_examples=examples)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{report.run} on the {report.data}", title_justify="left")
    for name in ("kind", "questions", "accuracy", "chance") + (("text-only ceiling",) if baseline else ()):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for s in [*report.scores, report.overall]:
        cells = [s.kind, str(s.num), _pct(s.accuracy), _pct(s.chance)] + ([_pct(s.text_only)] if baseline else [])
        table.add_row(*cells, style="bold" if s is report.overall else None)
    console.print(table)
    for ex in report.examples:
        mark = "[green]ok[/]" if ex["correct"] else "[red]x[/]"
        console.print(f"{mark} {ex['question']} -> {ex['predicted']!r} (expected {ex['answer']!r})", markup=True)


def register(app: typer.Typer) -> None:
    """Add `ghostvis eval`."""
    app.command("eval")(eval_run)

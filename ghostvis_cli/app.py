"""The `ghostvis` Typer app: global flags, error rendering, and the subcommand registry."""

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ghostvis_cli import bench, doctor, eval_cmd, export_cmd, infer, install, serve, tokenizer_cmd, train
from ghostvis_core import __version__
from ghostvis_core.errors import GhostVisError

app = typer.Typer(
    name="ghostvis",
    help="Train and serve small vision-language models fast, from one command that knows its machine.",
    no_args_is_help=True,
    add_completion=False,
    suggest_commands=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err_console = Console(stderr=True)

# --debug is read before Typer parses anything, so an error raised while parsing also honours it.
_DEBUG = {"enabled": False}
# The trainer (recipes/_main.py) shows its tracebacks when this is "1"; `ghostvis train` passes its
# environment to the child, so exporting the flag here is how --debug reaches it (no subcommand imports this
# module).
DEBUG_ENV_VAR = "GHOSTVIS_DEBUG"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ghostvis {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """GhostVis: train and serve small vision-language models fast."""
    _DEBUG["enabled"] = _DEBUG["enabled"] or debug
    if _DEBUG["enabled"]:
        os.environ[DEBUG_ENV_VAR] = "1"


for _module in (doctor, install, train, infer, export_cmd, serve, eval_cmd, bench, tokenizer_cmd):
    _module.register(app)


def is_debug() -> bool:
    """True when the user asked for tracebacks."""
    return _DEBUG["enabled"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one red line and a non-zero exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is a global flag, but users type it anywhere (`ghostvis train base_train --debug`): move it in
    # front of the subcommand, where the root callback takes it (arguments after a bare "--" are left alone).
    head = args[: args.index("--")] if "--" in args else args
    if "--debug" in head:
        args = ["--debug", *[a for a in head if a != "--debug"], *args[len(head):]]
    _DEBUG["enabled"] = "--debug" in head
    try:
        app(args=args, prog_name="ghostvis", standalone_mode=True)
    except GhostVisError as err:
        if is_debug():
            raise
        # escaped: a message may hold brackets (pip install 'ghostvis[plot]') that Rich would read as markup
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if is_debug():
            raise
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)

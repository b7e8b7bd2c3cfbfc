"""CLI basics: --version, --help everywhere, --debug, suggestions, and bad input as one clear line."""

from helpers import make_env, run_cli, run_cli_process

from ghostvis_cli.app import app
from ghostvis_core import __version__


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"ghostvis {__version__}"


def _command_paths(group, prefix=()):
    import typer.main

    cli = typer.main.get_command(group)
    stack = [(cli, list(prefix))]
    while stack:
        cmd, path = stack.pop()
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append((sub, [*path, name]))


def test_help_on_every_command(capsys):
    paths = list(_command_paths(app))
    assert ["doctor"] in paths and ["install"] in paths
    for path in paths:
        code, out, err = run_cli([*path, "--help"], capsys)
        assert code == 0, (path, err)
        assert "Usage" in out, path


def test_mistyped_subcommand_suggests(capsys):
    code, out, err = run_cli(["doctr"], capsys)
    assert code == 2
    assert "doctor" in err
    assert "Traceback" not in out + err


def test_unknown_extra_one_line(capsys):
    code, out, err = run_cli(["install", "flsh"], capsys)
    assert code == 2
    assert err.strip() == (
        "error: unknown extra 'flsh'. Did you mean 'flash-attn'? "
        "Valid extras: flash-attn, triton, apex, vllm, liger"
    )
    assert "Traceback" not in out + err


def test_unknown_require_one_line(capsys):
    code, out, err = run_cli(["doctor", "--require", "flash-attn,warp"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "unknown name(s) warp" in err
    assert "Traceback" not in out + err


def test_debug_shows_traceback(use_profile, tmp_path):
    """A user error is one line; with --debug the full traceback is shown (real process, real entry point)."""
    cmd = ["install", "flash-attn", "--dry-run"]
    use_profile(make_env("cpu"))
    plain = run_cli_process(cmd)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "cannot install flash-attn here" in plain.stderr
    for args in (["--debug", *cmd], [*cmd, "--debug"]):  # before or after the subcommand
        debug = run_cli_process(args)
        assert debug.returncode != 0, args
        assert "Traceback" in debug.stderr and "BackendUnavailableError" in debug.stderr, args

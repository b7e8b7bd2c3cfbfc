"""`ghostvis train RECIPE [key=value ...]`: resolve the recipe config, check the machine, launch torchrun.

The decisions (config resolution, GPU/node checks, the command and environment) live in
ghostvis_core.train.launch; this module reads flags, renders, and runs the child.
"""

from __future__ import annotations

import json
import os

import typer
from rich.console import Console
from rich.table import Table

from ghostvis_core.errors import ConfigError, GhostVisError
from ghostvis_core.train import launch, log_backends, run_lock

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `ghostvis train` to the app."""
    app.command(
        "train",
        epilog="Examples: ghostvis train base_train --dry-run | ghostvis train base_train --gpus 8 "
        "num_steps=2000 optim.lr=3e-4 | ghostvis train --list",
    )(train)


def train(
    recipe: str | None = typer.Argument(None, help="Recipe name (see --list), e.g. base_train or chat_sft."),
    overrides: list[str] | None = typer.Argument(
        None, help="Config overrides key=value, e.g. num_steps=500 model.n_layer=4 optim.lr=3e-4."
    ),
    gpus: int | None = typer.Option(
        None, "--gpus", help="GPUs (processes) on this node; default all visible GPUs; 0 = CPU."
    ),
    nodes: int = typer.Option(
        1, "--nodes", help="Number of nodes (multi-node needs --rdzv-endpoint)."
    ),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank, 0..nodes-1."),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT every node can reach (usually node 0), for --nodes > 1."
    ),
    run: str | None = typer.Option(None, "--run", help="Run folder name under the runs folder."),
    resume: str | None = typer.Option(None, "--resume", help="auto | none | PATH to a step_NNNNNN folder."),
    preset: str | None = typer.Option(None, "--preset", help="Model preset (see --list)."),
    data: str | None = typer.Option(None, "--data", help="Training data file or folder (default: embedded)."),
    image_root: str | None = typer.Option(
        None, "--image-root", help="Folder the data's image paths are relative to (default: the data file's)."
    ),
    skip_bad_records: bool | None = typer.Option(
        None, "--skip-bad-records", help="Count and skip malformed records (and unreadable images) instead of stopping."
    ),
    device_batch_size: int | None = typer.Option(
        None, "--device-batch-size", help="Rows per micro-batch per rank."
    ),
    pack_max_length: int | None = typer.Option(
        None, "--pack-max-length", help="Packed row length in tokens."
    ),
    num_steps: int | None = typer.Option(None, "--num-steps", help="Optimizer steps."),
    compile_model: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model."
    ),
    fsdp: bool | None = typer.Option(None, "--fsdp/--no-fsdp", help="Shard with FSDP2 instead of DDP (GPU)."),
    fp8: str | None = typer.Option(
        None, "--fp8", help="none | tensorwise | rowwise: the block linears in float8 (torchao; sm89+ GPU)."
    ),
    activation_checkpointing: str | None = typer.Option(
        None, "--recompute", help="Activation checkpointing: none | full | selective (every other block) "
        "recompute block activations in backward, to fit bigger models or batches."
    ),
    log_to: list[str] | None = typer.Option(
        None, "--log-to", help="Also log metrics to tensorboard and/or wandb (offline unless WANDB_MODE is set); "
        "repeat or comma-separate."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config and command; run nothing."
    ),
    json_out: bool = typer.Option(False, "--json", help="With --dry-run or --list: print JSON."),
    list_: bool = typer.Option(False, "--list", help="List recipes and model presets, then exit."),
) -> None:
    """Train a model with a recipe: one CPU process, N GPUs, or N GPUs on each of M nodes (torchrun)."""
    if list_:
        _print_list(json_out)
        return
    if recipe is None:
        raise ConfigError("missing RECIPE: e.g. `ghostvis train base_train` (see `ghostvis train --list`)")
    from recipes import RECIPES

    flags = {
        "--run": run,
        "--resume": resume,
        "--preset": preset,
        "--data": data,
        "--image-root": image_root,
        "--skip-bad-records": skip_bad_records,
        "--device-batch-size": device_batch_size,
        "--pack-max-length": pack_max_length,
        "--num-steps": num_steps,
        "--compile/--no-compile": compile_model,
        "--fsdp/--no-fsdp": fsdp,
        "--fp8": fp8,
        "--recompute": activation_checkpointing,
        "--log-to": log_backends.parse_log_to(log_to) if log_to else None,
    }
    job = launch.prepare_launch(
        RECIPES,
        recipe,
        flags,
        overrides or [],
        gpus=gpus,
        nodes=nodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        parent_env=os.environ,
    )
    # a backend whose package is missing is refused now, with the pip command, not after a run
    log_backends.check_available(job.cfg.log_to)
    if dry_run:
        if json_out:
            typer.echo(json.dumps(launch.dry_run_dict(job), indent=2))
        else:
            _print_dry_run(job)
        return

    if node_rank == 0:
        # fail before starting a child when a live trainer holds the run (the trainer's rank 0, on node 0,
        # takes the lock; other nodes of this launch would find it already taken on a shared filesystem)
        run_lock.check_unlocked(job.cfg.run_dir)
    job = launch.write_launch_config(job)
    try:
        _run(job, recipe, nodes, node_rank)
    finally:
        launch.remove_pending_config(job)


def _run(job: launch.Launch, recipe: str, nodes: int, node_rank: int) -> None:
    """Start the trainer and turn its exit into ours."""
    cfg, plan = job.cfg, job.plan
    where = "CPU" if plan.nproc == 0 else f"{plan.nproc} GPU{'s' if plan.nproc > 1 else ''}"
    if nodes > 1:
        where += f" x {nodes} nodes (this is node {node_rank})"
    err_console.print(f"[bold]ghostvis train[/] {recipe}: run {cfg.run} on {where}")
    if job.preset_note:
        err_console.print(job.preset_note, soft_wrap=True, markup=False)
    line = launch.format_command(job.cmd, job.changes)
    err_console.print(f"$ {line}", style="dim", soft_wrap=True, markup=False)
    # The root callback exported --debug as GHOSTVIS_DEBUG=1, so the trainer shows its tracebacks too.
    code = launch.run_child(job.cmd, launch.build_env(plan, os.environ, job.cpu_count))
    if code == 130:
        err_console.print(f"interrupted (run {cfg.run}, folder {cfg.run_dir})")
        raise typer.Exit(code)
    if code == GhostVisError.exit_code:
        # the trainer refused or stopped with a user error and printed its one line: nothing to add
        raise typer.Exit(code)
    if code != 0:
        err_console.print(
            f"[bold red]error:[/] training {launch.describe_child_exit(code)} (recipe {recipe}, run {cfg.run}, "
            f"folder {cfg.run_dir}; the newest complete checkpoint there resumes with --resume auto)",
            soft_wrap=True,
        )
        raise typer.Exit(code)


def _print_dry_run(job: launch.Launch) -> None:
    cfg, plan = job.cfg, job.plan
    table = Table(title=f"Resolved config: {cfg.recipe} (run {cfg.run})", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("set by", style="dim")
    for row in launch.config_rows(job):
        table.add_row(row.key, f"[bold]{row.value}[/]" if row.changed else row.value, row.source)
    console.print(table)
    where = "CPU, one process" if plan.nproc == 0 else f"{plan.nproc} GPU process(es) per node"
    console.print(f"Launch: {where} x {plan.nodes} node(s) = world size {plan.world_size}")
    if job.preset_note:
        console.print(job.preset_note, soft_wrap=True, markup=False)
    console.print(f"Launch record: {plan.config_path} (written by the trainer once it accepts the launch; the "
                  "launch passes a temporary copy)", soft_wrap=True, markup=False)
    if job.changes:
        console.print("Environment added for every rank:")
        for key, value in job.changes.items():
            console.print(f"  {key}={value}", markup=False)
    console.print("Command:")
    # Plain echo: the exact line, no wrapping or markup, so it can be copied into a shell.
    typer.echo(launch.format_command(job.cmd))
    console.print("[dim]Dry run: nothing was written or started.[/]")


def _print_list(json_out: bool) -> None:
    from ghostvis_core.model_configs import PRESETS
    from recipes import RECIPES

    if json_out:
        typer.echo(
            json.dumps(
                {
                    "recipes": {name: desc for name, (_, desc) in RECIPES.items()},
                    "presets": {name: desc for name, (desc, _) in PRESETS.items()},
                },
                indent=2,
            )
        )
        return
    width = max(len(n) for n in [*RECIPES, *PRESETS])
    console.print("[bold]Recipes[/] (ghostvis train RECIPE):")
    for name, (_, desc) in RECIPES.items():
        console.print(f"  [cyan]{name:<{width}}[/]  {desc}", soft_wrap=True)
    console.print("[bold]Model presets[/] (--preset NAME):")
    for name, (desc, _) in PRESETS.items():
        console.print(f"  [cyan]{name:<{width}}[/]  {desc}", soft_wrap=True)

"""`ghostvis train RECIPE [key=value ...]`: resolve the recipe config, check the machine, launch torchrun.

The decisions (config resolution, GPU/node checks, the command and environment) live in
ghostvis_core.train.launch; this module reads flags, renders, and runs the child.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ghostvis_core.errors import ConfigError
from ghostvis_core.train import launch

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
        None, "--gpus", min=0, help="GPUs (processes) on this node; default all visible GPUs; 0 = CPU."
    ),
    nodes: int = typer.Option(
        1, "--nodes", min=1, help="Number of nodes (multi-node needs --rdzv-endpoint)."
    ),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank, 0..nodes-1."),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT every node can reach (usually node 0), for --nodes > 1."
    ),
    run: str | None = typer.Option(None, "--run", help="Run folder name under the runs folder."),
    resume: str | None = typer.Option(None, "--resume", help="auto | none | PATH to a step_NNNNNN folder."),
    preset: str | None = typer.Option(None, "--preset", help="Model preset (see --list)."),
    data: str | None = typer.Option(None, "--data", help="Training data file or folder (default: embedded)."),
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

    module_name = launch.lookup_recipe(recipe, RECIPES)
    flag_values = {
        "--run": run,
        "--resume": resume,
        "--preset": preset,
        "--data": data,
        "--device-batch-size": device_batch_size,
        "--pack-max-length": pack_max_length,
        "--num-steps": num_steps,
        "--compile/--no-compile": compile_model,
        "--fsdp/--no-fsdp": fsdp,
    }
    flags = {k: v for k, v in flag_values.items() if v is not None}
    default = importlib.import_module(module_name).default_config()
    cfg = launch.resolve_config(default, recipe, flags, overrides or [])

    from ghostvis_core.env import probe_gpus

    # Only GPU/CPU counts: the full probe_env() also imports every optional package (seconds for vLLM).
    facts = probe_gpus()
    nproc = launch.resolve_nproc(
        gpus,
        gpu_count=facts.gpu_count,
        cuda_available=facts.cuda_available,
        visible_devices=facts.visible_devices,
    )
    launch.check_multinode(nodes, node_rank, rdzv_endpoint)
    if cfg.fsdp and nproc == 0:
        raise ConfigError("--fsdp shards across GPUs: it needs --gpus 1 or more (this launch runs on CPU)")
    plan = launch.LaunchPlan(
        recipe_module=module_name,
        config_path=launch.resolved_config_path(cfg.run_dir),
        nproc=nproc,
        run_id=cfg.run,
        nodes=nodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
    )
    cmd = launch.build_command(plan)
    changes = launch.env_changes(plan, os.environ, facts.cpu_count)
    set_by = {launch.FLAG_FIELDS[f]: f.split("/")[0] for f in flags}
    set_by.update({o.split("=", 1)[0].strip().replace("-", "_"): "key=value" for o in overrides or []})

    if dry_run:
        if json_out:
            typer.echo(json.dumps(_dry_run_dict(cfg, plan, cmd, changes), indent=2))
        else:
            _print_dry_run(cfg, default, plan, cmd, changes, set_by)
        return

    try:
        launch.write_resolved_config(cfg.to_dict(), plan.config_path)
    except OSError as e:
        raise ConfigError(
            f"cannot write the run's config to {plan.config_path} ({e.strerror}): pick another --run NAME "
            "or fix the runs folder (GHOSTVIS_HOME / runs_root)"
        ) from e
    where = "CPU" if nproc == 0 else f"{nproc} GPU{'s' if nproc > 1 else ''}"
    if nodes > 1:
        where += f" x {nodes} nodes (this is node {node_rank})"
    err_console.print(f"[bold]ghostvis train[/] {recipe}: run {cfg.run} on {where}")
    err_console.print(f"$ {launch.format_command(cmd, changes)}", style="dim", soft_wrap=True, markup=False)
    from ghostvis_cli.app import is_debug  # the app imports this module: look the flag up at run time

    env = launch.build_env(plan, os.environ, facts.cpu_count)
    if is_debug():
        env["GHOSTVIS_DEBUG"] = "1"  # the trainer then shows its tracebacks too
    code = launch.run_child(cmd, env)
    if code == 130:
        err_console.print(f"interrupted (run {cfg.run}, folder {cfg.run_dir})")
        raise typer.Exit(code)
    if code != 0:
        err_console.print(
            f"[bold red]error:[/] training exited with code {code} (recipe {recipe}, run {cfg.run}, "
            f"folder {cfg.run_dir}); its output above says why",
            soft_wrap=True,
        )
        raise typer.Exit(code)


def _flatten(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """model.* and optim.* as dotted keys, the way overrides name them."""
    flat: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if key in ("model", "optim") and isinstance(value, dict):
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def _dry_run_dict(
    cfg: Any, plan: launch.LaunchPlan, cmd: list[str], changes: dict[str, str]
) -> dict[str, Any]:
    return {
        "recipe": cfg.recipe,
        "config": cfg.to_dict(),
        "config_path": str(plan.config_path),
        "run_dir": str(cfg.run_dir),
        "nproc_per_node": plan.nproc,
        "nodes": plan.nodes,
        "node_rank": plan.node_rank,
        "world_size": plan.world_size,
        "device": "cuda" if plan.nproc > 0 else "cpu",
        "command": cmd,
        "command_line": launch.format_command(cmd),
        "env": changes,
    }


def _print_dry_run(
    cfg: Any,
    default: Any,
    plan: launch.LaunchPlan,
    cmd: list[str],
    changes: dict[str, str],
    set_by: dict[str, str],
) -> None:
    flat = _flatten(cfg.to_dict())
    defaults = _flatten(default.to_dict())
    table = Table(title=f"Resolved config: {cfg.recipe} (run {cfg.run})", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("set by", style="dim")
    for key, value in flat.items():
        source = set_by.get(key, "")
        if not source and key.startswith("model.") and key not in defaults:
            source = "key=value"
        changed = key in set_by or defaults.get(key, object()) != value
        shown = json.dumps(value) if not isinstance(value, str) else value
        if key == "compile" and value is None:
            shown = f"auto: {'on' if plan.nproc else 'off'} (on for CUDA, off on CPU)"
        table.add_row(key, f"[bold]{shown}[/]" if changed else shown, source)
    console.print(table)
    where = "CPU, one process" if plan.nproc == 0 else f"{plan.nproc} GPU process(es) per node"
    console.print(f"Launch: {where} x {plan.nodes} node(s) = world size {plan.world_size}")
    console.print(f"Config file: {plan.config_path} (written at launch)", soft_wrap=True, markup=False)
    if changes:
        console.print("Environment added for every rank:")
        for key, value in changes.items():
            console.print(f"  {key}={value}", markup=False)
    console.print("Command:")
    # Plain echo: the exact line, no wrapping or markup, so it can be copied into a shell.
    typer.echo(launch.format_command(cmd))
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

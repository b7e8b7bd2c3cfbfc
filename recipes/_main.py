"""Shared entry point of the recipes: parse --config/--run/--resume/overrides, train, report errors as one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ghostvis_core.errors import GhostVisError
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.recipe_spec import RecipeSpec

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, the shell's convention


def default_config_for(spec: RecipeSpec, **fields: Any) -> TrainConfig:
    """The recipes' shared small default (tiny preset, 8 x 128-token rows) with the recipe's own `fields`.

    A recipe that starts from another recipe's run names it as init_from, so `--dry-run` shows where the
    weights come from.
    """
    defaults: dict[str, Any] = dict(
        recipe=spec.name, run=spec.name, preset="tiny", init_from=spec.starts_from, device_batch_size=8,
        pack_max_length=128, warmdown_frac=0.3, log_every=5, keep_last=2,
    )
    return TrainConfig(**{**defaults, **fields})


def exit_process(code: int) -> NoReturn:
    """Exit a recipe process with `code`. A rank of a several-process run skips the interpreter's teardown:
    every file it writes is written, fsynced and closed by then, and gloo's threads, destroyed during
    finalisation, now and then abort a finished run ("terminate called without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def recipe_main(spec: RecipeSpec, default_config: Callable[[], TrainConfig], argv: list[str] | None) -> int:
    """A recipe module's `main`: run it (also under torchrun) and return the process exit code."""
    return run_recipe(argv, default_config, f"python -m recipes.{spec.name}")


def parse_config(argv: list[str] | None, default_config: Callable[[], TrainConfig], prog: str) -> TrainConfig:
    """TrainConfig from `--config resolved.json` (else the recipe default), then --run/--resume, then key=value."""
    parser = argparse.ArgumentParser(prog=prog, description="Run this training recipe (works under torchrun).")
    parser.add_argument("--config", help="resolved TrainConfig JSON (as written by `ghostvis train --dry-run`)")
    parser.add_argument("--run", help="run folder name under the runs directory")
    parser.add_argument("--resume", help="auto | none | PATH to a step_NNNNNN folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_steps=50 model.n_layer=2")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_json(args.config) if args.config else default_config()
    extra = list(args.overrides)
    if args.run is not None:
        extra.append(f"run={args.run}")
    if args.resume is not None:
        extra.append(f"resume={args.resume}")
    return cfg.apply_overrides(extra) if extra else cfg


def run_recipe(argv: list[str] | None, default_config: Callable[[], TrainConfig], prog: str) -> int:
    """Train; a GhostVisError becomes one line on stderr and a non-zero exit (traceback with GHOSTVIS_DEBUG=1)."""
    from ghostvis_core.train.loop import train

    try:
        cfg = parse_config(argv, default_config, prog)
        result = train(cfg)
    except GhostVisError as e:
        if os.environ.get("GHOSTVIS_DEBUG") == "1":
            raise
        rank = int(os.environ.get("RANK", "0"))
        prefix = "" if rank == 0 else f"[rank {rank}] "
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        # Ctrl-C before the loop took over the signal, or a second Ctrl-C (stop now, no checkpoint)
        if os.environ.get("GHOSTVIS_DEBUG") == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print("interrupted; checkpoints already written are intact: resume with the same command",
                  file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    if result.stopped_by:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped by {result.stopped_by} at step {result.step}; resume with the same command",
                  flush=True)
        # SIGTERM (a scheduler's preemption) is a clean stop; Ctrl-C is the user interrupting, so a
        # `ghostvis train A && ghostvis train B` chain must not go on to B
        if result.stopped_by == "SIGINT":
            return INTERRUPTED_EXIT_CODE
    return 0

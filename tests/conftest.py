"""Fixtures for every test: a private GHOSTVIS_HOME, fresh private caches, and hand-built machine profiles.

Helpers (make_env, run_cli, references, ...) live in tests/helpers.py; the names below stay importable from
conftest for older imports.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, GPU_PROFILES, make_env, write_profile  # noqa: F401  (re-exported)

from ghostvis_core.env import EnvFacts


@pytest.fixture
def use_profile(tmp_path, monkeypatch):
    """Make probe_env() (and so every CLI command) see a hand-built machine: use_profile(make_env(...))."""
    from ghostvis_core import env as env_mod

    def _use(env: EnvFacts) -> Path:
        path = write_profile(env, tmp_path / "env_profile.json")
        monkeypatch.setenv(env_mod.PROFILE_ENV_VAR, str(path))
        env_mod.probe_env(refresh=True)
        return path

    yield _use
    env_mod.reset_env_cache()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Runs and caches of every test go to a temporary GHOSTVIS_HOME; no test finds a vLLM environment this
    machine may have (tests that want the real one set GHOSTVIS_VLLM_VENV or record it)."""
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "ghostvis_home"))
    monkeypatch.setenv("GHOSTVIS_VLLM_VENV", str(tmp_path / "no_vllm_venv"))


# Module-level memos whose contents depend on the machine profile, the environment or what an earlier test
# logged: (module, attribute). Each is cleared before and after every test so no test sees another's (a module
# not imported yet has nothing cached and is skipped). Left alone on purpose: pure memos of deterministic builds
# (attention's compiled Flex and block masks, the chat template, gpt's torch.compiler.disable wrappers):
# clearing them changes no result and only costs recompiles.
_PRIVATE_CACHES = (
    ("ghostvis_core.log", "_LOGGED_ONCE"),  # log_once / first_time memo (the plan banner, one-off notes)
    ("ghostvis_core.kernels.dispatch", "_TRITON_ERROR"),  # Triton import check (TRITON_INTERPRET tests)
)


def _clear_private_caches() -> None:
    import sys

    from ghostvis_core import env as env_mod

    env_mod.reset_env_cache()  # probe_env()/probe_gpus() memo: a later test must not see this one's profile
    for module_name, attr in _PRIVATE_CACHES:
        module = sys.modules.get(module_name)  # not imported yet = nothing cached
        cache = getattr(module, attr, None) if module is not None else None
        if cache is not None:
            cache.clear()
    import logging

    logger = logging.getLogger("ghostvis")  # a CLI call's setup_logging binds a handler to that test's stderr
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    app = sys.modules.get("ghostvis_cli.app")
    debug = getattr(app, "_DEBUG", None) if app is not None else None
    if debug is not None:  # --debug seen by an earlier in-process CLI call
        debug["enabled"] = False


@pytest.fixture(autouse=True)
def _fresh_private_caches():
    """Clear the library's private caches before and after each test; restore GHOSTVIS_DEBUG, which the CLI's
    --debug exports into this process's environment."""
    saved_debug = os.environ.get("GHOSTVIS_DEBUG")
    _clear_private_caches()
    yield
    _clear_private_caches()
    if saved_debug is None:
        os.environ.pop("GHOSTVIS_DEBUG", None)
    else:
        os.environ["GHOSTVIS_DEBUG"] = saved_debug


@pytest.fixture(scope="module")
def decode_kernel():
    """The Triton decode kernel's module compiled for the Triton CPU interpreter (skipped without Triton)."""
    pytest.importorskip("triton")
    from helpers import triton_interpreted

    with triton_interpreted("ghostvis_core.kernels.decode_attention_triton") as (module,):
        yield module

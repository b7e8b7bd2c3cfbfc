"""vLLM as an inference backend: `create_vllm_engine(path).generate(prompts, max_tokens=...)`.

    engine = create_vllm_engine("my-chat-run")          # a run name or folder, a step_NNNNNN, or an HF folder
    engine.generate(["What colour is the circle?"], max_tokens=100)[0]["generated_text"]

A checkpoint is exported first (export_checkpoint.cached_export: RUN/hf_export/, redone when the checkpoint's
content changes). Prompts reach vLLM as token ids (`TokensPrompt`), encoded exactly as the native engine encodes
them (engine.PromptFormat: the chat template for chat runs, BOS + text for text runs), and replies stop on the
same ids (end-of-assistant and BOS), so greedy tokens match the native engine's. An HF folder GhostVis did not
write is prompted through `llm.chat()` with its own template. Never a rendered string: the template and the
tokenizer would both add BOS.

vLLM runs in this process when it imports here, else in the separate environment `ghostvis install vllm`
made, as a worker child (vllm_worker.py) driven over JSON lines; both run the same `vllm_worker.generate`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ghostvis_core.errors import BackendUnavailableError, CheckpointError, ConfigError
from ghostvis_core.log import get_logger

__all__ = ["VLLMEngine", "create_vllm_engine", "inference_choice", "model_facts", "resolve_vllm_model"]

# vLLM on CPU sizes its KV cache from this (GiB); its own default is a share of RAM that a 2-core CI box with
# other work on it should not give away.
CPU_DEFAULTS_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def resolve_vllm_model(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(HF folder vLLM serves, the step_NNNNNN it came from or None) for a run name or folder, a checkpoint
    or an HF folder; a checkpoint is exported into its run's cache first."""
    from ghostvis_core.checkpoint import resolve_checkpoint_spec
    from ghostvis_core.export_checkpoint import cached_export, is_hf_folder
    from ghostvis_core.paths import runs_dir

    p = Path(path).expanduser()
    if is_hf_folder(p):
        return p.resolve(), None
    step_dir = resolve_checkpoint_spec(str(path), runs_dir(), "--model")
    return cached_export(step_dir), step_dir


def model_facts(folder: Path) -> tuple[str, int]:
    """("gpt" | "vlm", head_dim) of an HF folder's config.json or a step_NNNNNN's state.json (what
    engine_choice.vllm_model_unavailable checks)."""
    from ghostvis_core.export_checkpoint import is_hf_folder

    if not is_hf_folder(Path(folder)):
        from ghostvis_core.checkpoint import TrainState
        from ghostvis_core.models import model_config_from_dict, text_config

        state = TrainState.read(folder, verify=False)
        config = model_config_from_dict(state.model_kind, state.require_model_config(state.model_kind, folder))
        return state.model_kind, text_config(config).head_dim
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None
    vlm = hf.get("model_type") == "llava"
    text = hf.get("text_config", {}) if vlm else hf
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return ("vlm" if vlm else "gpt"), int(head_dim)


def inference_choice(request: str, model: str | os.PathLike | None):
    """engine_choice.choose_inference with this machine's facts for `ghostvis infer/bench --backend`, logged with
    its reason; returns (Choice, the model path: an HF folder or a step_NNNNNN, None for native)."""
    from ghostvis_core.backend_names import INFERENCE_REQUESTS
    from ghostvis_core.backends import default_device_type
    from ghostvis_core.engine import resolve_step_dir
    from ghostvis_core.engine_choice import choose_inference, vllm_unavailable
    from ghostvis_core.env import probe_env
    from ghostvis_core.export_checkpoint import is_hf_folder
    from ghostvis_core.vllm_env import probe_vllm_env

    if request not in INFERENCE_REQUESTS:  # before any probing
        raise ConfigError(f"--backend {request!r} is not one of {', '.join(INFERENCE_REQUESTS)}")
    env = probe_env()
    device = default_device_type(env)
    if request == "native":
        return choose_inference(request, env, device), None
    venv = None if env.package("vllm").usable else probe_vllm_env()
    path = Path(model).expanduser() if model and is_hf_folder(Path(model).expanduser()) else None
    facts = None
    if vllm_unavailable(env, device, venv) is None:
        path = path or resolve_step_dir(str(model) if model else None)
        facts = model_facts(path)
    choice = choose_inference(request, env, device, venv=venv, model=facts)
    get_logger().info(f"--backend {request}: {choice.label} ({choice.reason})")
    return choice, path if choice.backend == "vllm" else None


class _InProcess:
    """vllm.LLM in this process (vLLM imports here)."""

    def __init__(self, folder: Path, engine_kwargs: dict[str, Any]):
        from ghostvis_core.vllm_worker import build_llm

        self.llm = build_llm(str(folder), engine_kwargs)

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        from ghostvis_core.vllm_worker import generate

        return generate(self.llm, request)

    def close(self) -> None:
        self.llm = None


class _Worker:
    """vllm.LLM in a child process of the vLLM environment's Python, over JSON lines (vllm_worker.py)."""

    def __init__(self, python: str, folder: Path, engine_kwargs: dict[str, Any]):
        from ghostvis_core.paths import cache_dir
        from ghostvis_core.vllm_env import venv_child_env

        self.log_path = cache_dir() / f"vllm_worker-{os.getpid()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")
        cmd = [python, "-m", "ghostvis_core.vllm_worker", "--model", str(folder),
               "--engine-kwargs", json.dumps(engine_kwargs)]
        # cwd: the environment's folder, not ours, where `-m` would import whatever checkout it found
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=venv_child_env(), cwd=Path(python).parent.parent)
        ready = self._read()
        if "error" in ready:
            self.close()
            raise BackendUnavailableError(f"{ready['error']} (vLLM's log: {self.log_path})")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self._log.flush()
            tail = [x for x in self.log_path.read_text("utf-8", "replace").splitlines() if x.strip()][-3:]
            raise BackendUnavailableError(f"the vLLM worker exited (code {code}): {' | '.join(tail)} "
                                          f"(full log: {self.log_path})")
        return json.loads(line)

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.returncode == 0:  # a worker that failed keeps its log for the message that named it
            self.log_path.unlink(missing_ok=True)


class VLLMEngine:
    """A served model: `generate` takes text prompts (or token ids, or {"messages": [...]}) and returns dicts."""

    def __init__(self, folder: Path, runner, *, max_model_len: int, source: Path | None = None):
        from ghostvis_core.engine import PromptFormat
        from ghostvis_core.export_checkpoint import ExportInfo
        from ghostvis_core.tokenizer import Tokenizer

        self.folder, self.source, self.max_model_len = Path(folder), source, max_model_len
        self._runner = runner
        info = ExportInfo.read(self.folder)
        # A GhostVis export is prompted and stopped as the native engine does; another HF folder by llm.chat().
        self.prompt_format = PromptFormat(Tokenizer.load(self.folder), info.data_format) if info else None

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a reply (a GhostVis export's; empty: the folder's own generation_config eos)."""
        return self.prompt_format.stop_token_ids if self.prompt_format else ()

    def encode(self, prompt) -> list[int] | dict:
        """What goes to vLLM for a prompt: token ids (a GhostVis export), or {"messages"} for llm.chat()."""
        if isinstance(prompt, dict):
            return prompt
        if isinstance(prompt, str):
            if self.prompt_format is None:
                return {"messages": [{"role": "user", "content": prompt}]}
            return self.prompt_format.encode_prompt(prompt)
        return [int(t) for t in prompt]

    def generate_ids(self, prompts: list, sampling, max_tokens: int, seeds: list[int] | None = None) -> list[dict]:
        """Raw outputs ({"token_ids", "text", "finish_reason", "prompt_token_ids"}) of prompts (token ids or
        {"messages"}), sampling: a sampling.SamplingParams; prompt i samples with seeds[i] (default seed + i)."""
        if max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1 (got {max_tokens})")
        seeds = list(seeds) if seeds is not None else [sampling.seed + i for i in range(len(prompts))]
        specs, budgets = [], []
        for i, p in enumerate(prompts):
            budget = max_tokens
            if not isinstance(p, dict):
                if len(p) >= self.max_model_len:
                    raise ConfigError(f"prompt {i} is {len(p)} tokens; the model's context is {self.max_model_len}"
                                      " (room for at least one new token is needed): shorten it")
                budget = min(max_tokens, self.max_model_len - len(p))
            budgets.append(budget)
            spec = {"max_tokens": budget, "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "top_k": sampling.top_k, "seed": seeds[i], "stop": list(sampling.stop) or None}
            if self.stop_token_ids:
                # only our ids end a reply (the export's eos list is not what the native engine stops on)
                spec.update(stop_token_ids=[] if sampling.ignore_eos else list(self.stop_token_ids), ignore_eos=True)
            else:
                spec["ignore_eos"] = sampling.ignore_eos
            specs.append(spec)
        capped = [i for i, b in enumerate(budgets) if b < max_tokens]
        if capped:
            get_logger().warning(f"--max-tokens {max_tokens} does not fit the {self.max_model_len}-token context "
                                 f"for {len(capped)} prompt(s): capped (prompt {capped[0]}: at most "
                                 f"{budgets[capped[0]]} new)")
        response = self._runner.request({"op": "generate", "prompts": prompts, "sampling": specs})
        if "error" in response:
            raise ConfigError(f"vLLM refused the request: {response['error']}")
        outs = response["outputs"]
        stops = set(self.stop_token_ids)
        for out in outs:  # vLLM keeps the stop token; the native engine does not
            if out["finish_reason"] == "stop" and out["token_ids"] and out["token_ids"][-1] in stops:
                out["token_ids"] = out["token_ids"][:-1]
        return outs

    def generate(self, prompts: list, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int | None = None, seed: int = 0, stop: tuple[str, ...] | list[str] = ()) -> list[dict]:
        """[{"generated_text", "num_tokens", "finish_reason", "token_ids"}] for each prompt, in order."""
        from ghostvis_core.sampling import SamplingParams

        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop))
        outs = self.generate_ids([self.encode(p) for p in prompts], sampling, max_tokens)
        return [{"generated_text": self.decode(o), "num_tokens": len(o["token_ids"]),
                 "finish_reason": o["finish_reason"], "token_ids": o["token_ids"]} for o in outs]

    def decode(self, output: dict) -> str:
        """An output's text: our tokenizer's decode (as the native engine's) for a GhostVis export, cut before
        the stop string that ended it (the native engine's text never holds it either)."""
        if self.prompt_format is None:
            return output["text"]
        text = self.prompt_format.tokenizer.decode(output["token_ids"], skip_special=True)
        stop = output.get("stop_reason")
        return text[: text.find(stop)] if stop and stop in text else text

    def close(self) -> None:
        """Stop the engine (the worker process, when there is one)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_engine_kwargs(device_type: str, dtype: str, max_model_len: int) -> dict[str, Any]:
    """vllm.LLM keywords GhostVis passes unless the caller overrides them."""
    kwargs: dict[str, Any] = {"dtype": dtype, "max_model_len": max_model_len}
    if device_type == "cpu":
        kwargs["enforce_eager"] = True  # no torch.compile warm-up: ~26 s to load instead of ~72 s, same speed
    return kwargs


def create_vllm_engine(path: str | os.PathLike, *, dtype: str = "auto", **engine_kwargs) -> VLLMEngine:
    """A vLLM engine serving a run name or folder, a step_NNNNNN checkpoint, or an HF folder.

    dtype: auto (bfloat16 on CUDA, float32 on CPU), or a dtype name; engine_kwargs go to vllm.LLM and override
    GhostVis's defaults (max_model_len = the model's context, enforce_eager on CPU). Raises
    BackendUnavailableError with the fix when vLLM cannot run here or cannot serve this model.
    """
    from ghostvis_core.backends import default_device_type, resolve_dtype
    from ghostvis_core.engine_choice import choose_inference
    from ghostvis_core.env import probe_env
    from ghostvis_core.vllm_env import probe_vllm_env

    env = probe_env()
    device = default_device_type(env)
    venv = None if env.package("vllm").usable else probe_vllm_env()
    folder, source = resolve_vllm_model(path)
    choose_inference("vllm", env, device, venv=venv, model=model_facts(folder))  # raises with the fix
    config = json.loads((folder / "config.json").read_text("utf-8"))
    max_model_len = int(config.get("text_config", config)["max_position_embeddings"])
    kwargs = {**default_engine_kwargs(device, resolve_dtype(dtype, device), max_model_len), **engine_kwargs}
    if device == "cpu":
        for key, value in CPU_DEFAULTS_ENV.items():
            os.environ.setdefault(key, value)
    runner = _InProcess(folder, kwargs) if venv is None else _Worker(venv.python, folder, kwargs)
    return VLLMEngine(folder, runner, max_model_len=int(kwargs["max_model_len"]), source=source)

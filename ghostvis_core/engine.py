"""Native inference: load a trained run's checkpoint and answer prompts with the batched KV-cache engine
(ghostvis_core/batch_engine.py).

A run trained on chats (data_format "chat" in its state.json) is prompted through the tokenizer's chat template,
the same template training used; a text run continues plain text after BOS. Generation stops at the assistant's
end token.

The model's parameters are cast to the run's inference dtype (auto: bf16 on CUDA, fp32 on CPU) and the backend
plan is made for that dtype, so no kernel that needs bf16/fp16 ever meets fp32 tensors.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from ghostvis_core.backend_names import DTYPES
from ghostvis_core.backends import BackendPlan, inference_run_facts, plan_run
from ghostvis_core.env import probe_env
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.log import get_logger
from ghostvis_core.models import language_model, text_config
from ghostvis_core.paths import runs_dir
from ghostvis_core.plan_banner import log_plan
from ghostvis_core.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptFormat:
    """How a run is prompted and when its replies end, whichever engine serves it (native or vLLM)."""

    tokenizer: Tokenizer
    data_format: str
    """TrainState.data_format of the checkpoint: "text", "chat" or "image-chat"."""

    @property
    def is_chat(self) -> bool:
        """True for runs trained on chats: prompts go through the chat template."""
        return self.data_format != "text"

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply: end-of-assistant for chat runs, and BOS (a new document) for every run."""
        tok = self.tokenizer
        return (tok.eos_id, tok.bos_id) if self.is_chat else (tok.bos_id,)

    def encode_prompt(self, prompt: str, history: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt: the chat template (with earlier turns) for chat runs, BOS + text otherwise."""
        if not prompt.strip():
            raise ConfigError("the prompt is empty: pass some text (--prompt TEXT)")
        tok = self.tokenizer
        if self.is_chat:
            messages = [*(history or []), {"role": "user", "content": prompt}]
            return tok.encode_chat(messages, add_generation_prompt=True)[0]
        return [tok.bos_id, *tok.encode(prompt)]


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer, recipe and data format of the run it came from."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    checkpoint: Path
    recipe: str
    data_format: str
    """TrainState.data_format of the checkpoint: "text", "chat" or "image-chat"."""
    plan: BackendPlan | None = None
    """The inference plan the model was built with (dtype and backends)."""
    kv_cache_dtype: str = "auto"
    """The engine's KV cache storage, auto or fp8 (kv_cache.py); set before the engine is first used."""
    _engine: object = None

    @property
    def engine(self):
        """The batched engine of this model (built on first use; it keeps its caches and CUDA graphs)."""
        from ghostvis_core.batch_engine import Engine

        if self._engine is None:
            # A VLM's engine runs its language model; image features come in as prompt embeddings
            # (image_prompts.py), and the `<image>` placeholder, which only data places, is never generated.
            lm = language_model(self.model)
            banned = (self.model.config.image_token_id,) if lm is not self.model else ()
            self._engine = Engine(lm, self.tokenizer, stop_token_ids=self.stop_token_ids, banned_token_ids=banned,
                                  kv_cache_dtype=self.kv_cache_dtype)
        return self._engine

    @property
    def prompt_format(self) -> PromptFormat:
        """How this run is prompted and stopped."""
        return PromptFormat(self.tokenizer, self.data_format)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply (PromptFormat.stop_token_ids)."""
        return self.prompt_format.stop_token_ids

    def encode_prompt(self, prompt: str, history: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt (PromptFormat.encode_prompt)."""
        return self.prompt_format.encode_prompt(prompt, history)

    @property
    def is_chat(self) -> bool:
        """True for runs trained on chats: prompts go through the chat template."""
        return self.prompt_format.is_chat


def latest_run(root: Path) -> Path:
    """The default run: the newest complete one of the most trained kind (chat runs before base runs).

    Complete: it has a step_NNNNNN checkpoint with a readable state.json and a tokenizer.
    """
    from ghostvis_core.checkpoint import TrainState, latest_checkpoint

    candidates = []
    for run in root.iterdir() if root.is_dir() else []:
        step = latest_checkpoint(run) if run.is_dir() else None
        if step is None or not (run / "tokenizer" / "tokenizer.json").is_file():
            continue
        try:
            chat = TrainState.read(step).data_format != "text"
        except CheckpointError as exc:  # a run whose state.json is damaged is not a candidate; say so
            get_logger().warning(f"skipping {run.name} when choosing the default run: {exc}")
            continue
        candidates.append((chat, step.stat().st_mtime, run))
    if not candidates:
        raise CheckpointError(
            f"no trained run with a checkpoint under {root}: train one first (`ghostvis train base_train`), "
            "or pass --run NAME / --checkpoint PATH"
        )
    return max(candidates)[-1]


def inference_plan(config, device_type: str | None = None, dtype: str = "auto",
                   compile: bool | None = None) -> BackendPlan:
    """The plan of an inference run of `config` on this machine (dtype auto: bf16 on CUDA, fp32 on CPU;
    compile None: the decode step is compiled on CUDA, see backends.inference_run_facts)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    env = probe_env()
    facts = inference_run_facts(env, config, device_type=device_type, dtype=dtype, compile=compile)
    plan = plan_run(env, facts)
    if plan.device_type == "cuda" and plan.dtype == "float32":
        get_logger().info(
            "inference in float32 on CUDA: slower than bfloat16 (no flash kernels run in fp32; attention "
            f"uses {plan.attention['decode'].label} for decode); --dtype bfloat16 is the default"
        )
    return plan


def cast_parameters_(model: torch.nn.Module, dtype_name: str) -> torch.nn.Module:
    """Make a loaded model ready to serve: cast the parameters (only: the RoPE inv_freq buffer stays fp32,
    bf16 frequencies would shift every angle) to the plan's dtype in place, fuse each GPT layer's q|k|v and
    gate|up projections (GPT.fuse_projections_: 3 GEMMs per layer fewer in every decode step), eval mode."""
    from ghostvis_core.gpt import GPT

    dtype = getattr(torch, dtype_name)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for module in model.modules():
        if isinstance(module, GPT):
            module.fuse_projections_()
    return model.eval()


def resolve_step_dir(spec: str | None) -> Path:
    """The checkpoint a run name, run folder or step_NNNNNN folder names (None: the newest run's latest)."""
    from ghostvis_core.checkpoint import resolve_checkpoint_spec

    root = runs_dir()
    if spec:
        return resolve_checkpoint_spec(spec, root, "--run/--checkpoint")
    return resolve_checkpoint_spec(str(latest_run(root)), root, "latest run")


def load_for_inference(spec: str | None = None, device: str | None = None, dtype: str = "auto",
                       compile: bool | None = None) -> LoadedModel:
    """Load a run name, run folder or step_NNNNNN folder (None: the newest run) for generation.

    dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32; the parameters are cast to it.
    compile: whether the decode step is compiled (None: on CUDA; a one-shot prompt passes False, since
    compiling takes longer than a short answer).
    """
    from ghostvis_core.checkpoint import TrainState
    from ghostvis_core.export_checkpoint import is_hf_folder
    from ghostvis_core.models import from_checkpoint, model_config_from_dict

    if spec and is_hf_folder(Path(spec).expanduser()):
        return load_hf_folder(Path(spec).expanduser(), device, dtype, compile)
    step_dir = resolve_step_dir(spec)
    run_dir = step_dir.parent
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer/tokenizer.json: it is not a complete GhostVis run folder")
    state = TrainState.read(step_dir)
    config = model_config_from_dict(state.model_kind, state.require_model_config(state.model_kind, step_dir))
    plan = inference_plan(text_config(config), device, dtype, compile)
    log_plan(plan)
    model = cast_parameters_(from_checkpoint(step_dir, plan, state), plan.dtype)
    return LoadedModel(model, Tokenizer.load(tokenizer_dir), step_dir, state.recipe or "unknown", state.data_format,
                       plan)


def load_hf_folder(folder: Path, device: str | None = None, dtype: str = "auto",
                   compile: bool | None = None) -> LoadedModel:
    """A Hugging Face LlamaForCausalLM folder (`ghostvis export`'s, or any with a GhostVis tokenizer) loaded
    into the native engine: the weights through hf_import.read_hf_llama (every key and shape checked), the
    prompt format from its ghostvis.json (a folder GhostVis did not write is prompted as plain text)."""
    from ghostvis_core.errors import DataError
    from ghostvis_core.export_checkpoint import ExportInfo
    from ghostvis_core.gpt import GPT
    from ghostvis_core.hf_import import read_hf_llama

    info = ExportInfo.read(folder)
    if info is not None and info.architecture != "LlamaForCausalLM":
        raise ConfigError(f"--model {folder}: a {info.architecture} folder; the native engine loads exported "
                          f"vision runs from their GhostVis run (--model {info.source}), or serve this folder "
                          "with --backend vllm")  # fmt: skip
    config, state = read_hf_llama(folder)
    try:
        tokenizer = Tokenizer.load(folder)
    except DataError as exc:
        raise DataError(f"--model {folder}: {exc}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"--model {folder}: its tokenizer has {tokenizer.vocab_size} tokens, more than "
                              f"the model's vocab_size {config.vocab_size}")  # fmt: skip
    plan = inference_plan(config, device, dtype, compile)
    log_plan(plan)
    with torch.device(plan.device_type):
        model = GPT(config, plan)
    model.load_state_dict(state, strict=True)
    data_format = info.data_format if info is not None else "text"
    return LoadedModel(cast_parameters_(model, plan.dtype), tokenizer, folder, "Hugging Face LlamaForCausalLM",
                       data_format, plan)  # fmt: skip


@torch.no_grad()
def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    top_p: float = 1.0,
    stop: tuple[str, ...] = (),
    image: str | Path | None = None,
    use_cache: bool = True,
    warn_capped: bool = True,
) -> str:
    """The model's reply to `prompt` (chat runs) or its continuation (base runs), decoded without specials.

    image: a picture the prompt asks about (VLM runs): the prompt becomes a user turn of the image then the
    text, as LLaVA data is ("<image>\n" + prompt), prefilled by embeddings, then KV-cache decode. Every run
    answers through the batched engine (image_prompts.py builds a VLM's prompt); use_cache=False is the
    reference path of VLM runs (VLM.generate recomputing the sequence each step, greedy or top-k).
    warn_capped: warn when max_new_tokens does not fit the context (Engine.generate_many).
    """
    from ghostvis_core.sampling import SamplingParams

    if max_new_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1 (got {max_new_tokens})")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop))
    if image is not None or loaded.data_format == "image-chat":
        from ghostvis_core.image_prompts import generate_vlm_text

        return generate_vlm_text(loaded, prompt, max_new_tokens, sampling, image, use_cache, warn_capped)
    ids = loaded.encode_prompt(prompt)
    return loaded.engine.generate_many([ids], sampling, max_new_tokens, batch_size=1, warn_capped=warn_capped)[0].text

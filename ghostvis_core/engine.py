"""Native inference: load a trained run's checkpoint and answer prompts with the KV-cache decoder.

A run trained on chats (data_format "chat" in its state.json) is prompted through the tokenizer's chat template,
the same template training used; a text run continues plain text after BOS. Generation stops at the assistant's
end token.

The model's parameters are cast to the run's inference dtype (auto: bf16 on CUDA, fp32 on CPU) and the backend
plan is made for that dtype, so no kernel that needs bf16/fp16 ever meets fp32 tensors.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ghostvis_core.backend_names import DTYPES
from ghostvis_core.backends import BackendPlan, inference_run_facts, log_plan, plan_run
from ghostvis_core.env import probe_env
from ghostvis_core.errors import CheckpointError, ConfigError
from ghostvis_core.log import get_logger
from ghostvis_core.models import text_config
from ghostvis_core.paths import runs_dir
from ghostvis_core.tokenizer import Tokenizer


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

    @property
    def is_chat(self) -> bool:
        """True for runs trained on chats: prompts go through the chat template."""
        return self.data_format != "text"


def latest_run(root: Path) -> Path:
    """The run folder with the newest complete checkpoint under `root`."""
    from ghostvis_core.checkpoint import latest_checkpoint

    candidates = []
    for run in root.iterdir() if root.is_dir() else []:
        step = latest_checkpoint(run) if run.is_dir() else None
        if step is not None:
            candidates.append((step.stat().st_mtime, run))
    if not candidates:
        raise CheckpointError(
            f"no trained run with a checkpoint under {root}: train one first (`ghostvis train base_train`), "
            "or pass --run NAME / --checkpoint PATH"
        )
    return max(candidates)[1]


def inference_plan(config, device_type: str | None = None, dtype: str = "auto") -> BackendPlan:
    """The plan of an inference run of `config` on this machine (dtype auto: bf16 on CUDA, fp32 on CPU)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    env = probe_env()
    plan = plan_run(env, inference_run_facts(env, config, device_type=device_type, dtype=dtype))
    if plan.device_type == "cuda" and plan.dtype == "float32":
        get_logger().info(
            "inference in float32 on CUDA: slower than bfloat16 (no flash kernels run in fp32; attention "
            f"uses {plan.attention['decode'].label} for decode); --dtype bfloat16 is the default"
        )
    return plan


def cast_parameters_(model: torch.nn.Module, dtype_name: str) -> torch.nn.Module:
    """Cast the parameters (only: the RoPE inv_freq buffer stays fp32, bf16 frequencies would shift every
    angle) to the plan's dtype in place; returns the model in eval mode."""
    dtype = getattr(torch, dtype_name)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def load_for_inference(spec: str | None = None, device: str | None = None, dtype: str = "auto") -> LoadedModel:
    """Load a run name, run folder or step_NNNNNN folder (None: the newest run) for generation.

    dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32; the parameters are cast to it.
    """
    from ghostvis_core.checkpoint import TrainState, resolve_checkpoint_spec
    from ghostvis_core.models import from_checkpoint, model_config_from_dict

    root = runs_dir()
    step_dir = resolve_checkpoint_spec(spec, root, "--run/--checkpoint") if spec else None
    if step_dir is None:
        step_dir = resolve_checkpoint_spec(str(latest_run(root)), root, "latest run")
    run_dir = step_dir.parent
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer/tokenizer.json: it is not a complete GhostVis run folder")
    state = TrainState.read(step_dir)
    config = model_config_from_dict(state.model_kind, state.require_model_config(state.model_kind, step_dir))
    plan = inference_plan(text_config(config), device, dtype)
    log_plan(plan)
    model = cast_parameters_(from_checkpoint(step_dir, plan, state), plan.dtype)
    return LoadedModel(model, Tokenizer.load(tokenizer_dir), step_dir, state.recipe or "unknown", state.data_format,
                       plan)


@torch.no_grad()
def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    image: str | Path | None = None,
    use_cache: bool = True,
) -> str:
    """The model's reply to `prompt` (chat runs) or its continuation (base runs), decoded without specials.

    image: a picture the prompt asks about (VLM runs): the prompt becomes a user turn of the image then the
    text, as LLaVA data is ("<image>\n" + prompt), prefilled by embeddings, then KV-cache decode."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if not 0 <= temperature < math.inf:
        raise ConfigError(f"--temperature must be a finite number >= 0 (got {temperature})")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (got {top_k}); leave it out to sample from every token")
    tok = loaded.tokenizer
    vlm = loaded.data_format == "image-chat"
    if image is not None and not vlm:
        raise ConfigError(f"--image {image}: run {loaded.checkpoint.parent} is a text model ({loaded.recipe}, "
                          "trained on text only) and cannot see images; pick a vision run (vision_pretrain or an "
                          "image chat_sft) or drop --image")
    pixels = None
    if image is not None:
        from ghostvis_core.data.images import load_image
        from ghostvis_core.vlm import expand_image_tokens

        vision = loaded.model.config.vision
        if not Path(image).is_file():
            raise ConfigError(f"--image {image}: no such image file")
        pixels = load_image(image, vision.image_size, vision.image_mean, vision.image_std)[None]
        content = [{"type": "image"}, {"type": "text", "text": "\n" + prompt}]
        ids, _ = tok.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = expand_image_tokens(ids, tok.image_id, loaded.model.config.num_image_tokens)
    elif loaded.is_chat:
        ids, _ = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = [tok.bos_id, *tok.encode(prompt)]
    limit = text_config(loaded.model.config).sequence_len
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    if max_new_tokens < 1:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context is {limit}: shorten it")
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs = dict(temperature=temperature, top_k=top_k, generator=generator, use_cache=use_cache)
    if vlm:
        dtype = next(loaded.model.parameters()).dtype
        pixels = None if pixels is None else pixels.to(device=device, dtype=dtype)
        out = loaded.model.generate(idx, pixels, max_new_tokens, **kwargs)
    else:
        out = loaded.model.generate(idx, max_new_tokens, **kwargs)
    new = out[0, len(ids):].tolist()
    stops = {tok.eos_id, tok.bos_id} if loaded.is_chat else {tok.bos_id}
    for i, token in enumerate(new):
        if token in stops:
            new = new[:i]
            break
    return tok.decode(new, skip_special=True)

"""Native inference: load a trained run's checkpoint and answer prompts with the KV-cache decoder.

A run trained on chats (data_format "chat" in its state.json) is prompted through the tokenizer's chat template,
the same template training used; a text run continues plain text after BOS. Generation stops at the assistant's
end token.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ghostvis_core.errors import CheckpointError, ConfigError
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


def load_for_inference(spec: str | None = None, device: str | None = None) -> LoadedModel:
    """Load a run name, run folder or step_NNNNNN folder (None: the newest run) for generation."""
    from ghostvis_core.checkpoint import TrainState, resolve_checkpoint_spec
    from ghostvis_core.gpt import GPT

    root = runs_dir()
    step_dir = resolve_checkpoint_spec(spec, root, "--run/--checkpoint") if spec else None
    if step_dir is None:
        step_dir = resolve_checkpoint_spec(str(latest_run(root)), root, "latest run")
    run_dir = step_dir.parent
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer/tokenizer.json: it is not a complete GhostVis run folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT.from_checkpoint(step_dir, None, device=device)  # integrator: pass the inference plan
    model.eval()
    state = TrainState.read(step_dir, verify=False)  # from_checkpoint verified the files
    return LoadedModel(model, Tokenizer.load(tokenizer_dir), step_dir, state.recipe or "unknown", state.data_format)


@torch.no_grad()
def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The model's reply to `prompt` (chat runs) or its continuation (base runs), decoded without specials."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if not 0 <= temperature < math.inf:
        raise ConfigError(f"--temperature must be a finite number >= 0 (got {temperature})")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (got {top_k}); leave it out to sample from every token")
    tok = loaded.tokenizer
    if loaded.is_chat:
        ids, _ = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = [tok.bos_id, *tok.encode(prompt)]
    limit = loaded.model.config.sequence_len
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    if max_new_tokens < 1:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context is {limit}: shorten it")
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = loaded.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    new = out[0, len(ids):].tolist()
    stops = {tok.eos_id, tok.bos_id} if loaded.is_chat else {tok.bos_id}
    for i, token in enumerate(new):
        if token in stops:
            new = new[:i]
            break
    return tok.decode(new, skip_special=True)

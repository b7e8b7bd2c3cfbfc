"""Run folders of random tiny models, written the way training writes them (checkpoint.save_checkpoint +
tokenizer/), for tests of export and the inference backends. Random weights (std 0.2) give varied greedy tokens,
so a token-by-token comparison between engines means something."""

from __future__ import annotations

from pathlib import Path

from plans import cpu_gpt, cpu_plan
from test_vlm import randomize_

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.config import GPTConfig
from ghostvis_core.data import default_tokenizer
from ghostvis_core.paths import runs_dir
from ghostvis_core.vision_config import VLMConfig, get_vision_config


def text_config(vocab_size: int, head_dim: int = 64) -> GPTConfig:
    """2 heads of head_dim (vLLM's CPU attention takes 32, 64, 80, ...), GQA, tied, a 128-token context."""
    return GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=2 * head_dim, mlp_hidden=192, vocab_size=vocab_size,
                     sequence_len=128, tie_embeddings=True)


def save_text_run(name: str, *, data_format: str = "chat", seed: int = 0, head_dim: int = 64, step: int = 1) -> Path:
    """runs_dir()/name with one step_NNNNNN of a random GPT; returns the run folder."""
    tok = default_tokenizer(4096)
    config = text_config(tok.vocab_size, head_dim)
    model = randomize_(cpu_gpt(config), seed=seed, std=0.2)
    run = runs_dir() / name
    state = ckpt.TrainState(step=step, model_config=config.to_dict(), data_format=data_format,
                            recipe="chat_sft" if data_format == "chat" else "base_train")
    ckpt.save_checkpoint(run, step, model_state=model.state_dict(), optimizer_state={}, state=state.to_dict(),
                         keep_last=0)
    tok.save(run / "tokenizer")
    return run


def save_vlm_run(name: str, *, seed: int = 0) -> Path:
    """runs_dir()/name with one checkpoint of a random tiny VLM (image-chat); returns the run folder."""
    from ghostvis_core.vlm import VLM

    tok = default_tokenizer(4096)
    text = text_config(tok.vocab_size)
    config = VLMConfig(text=text, vision=get_vision_config("tiny"), image_token_id=tok.image_id)
    model = randomize_(VLM(config, cpu_plan(text)), seed=seed, std=0.1)
    run = runs_dir() / name
    state = ckpt.TrainState(step=1, model_kind="vlm", model_config=config.to_dict(), data_format="image-chat",
                            recipe="chat_sft")
    ckpt.save_checkpoint(run, 1, model_state=model.state_dict(), optimizer_state={}, state=state.to_dict(),
                         keep_last=0)
    tok.save(run / "tokenizer")
    return run

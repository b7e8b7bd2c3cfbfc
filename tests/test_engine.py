"""Native inference: a trained run loads from its checkpoint and answers exactly as the model generates."""

import torch
from helpers import run_cli_process
from test_train_config import REPO, tiny_config

from ghostvis_core.engine import LoadedModel, generate_text, load_for_inference
from ghostvis_core.paths import runs_dir
from ghostvis_core.train.loop import train


def _manual_reply(loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    idx = torch.tensor([ids])
    out = loaded.model.generate(idx, max_new_tokens, use_cache=False)[0, len(ids):].tolist()
    return out


def test_trained_run_loads_and_generates_like_the_model(tmp_path):
    cfg = tiny_config(tmp_path, runs_root=str(runs_dir()), run="eng", num_steps=4, save_every=0)
    result = train(cfg)
    loaded = load_for_inference("eng", device="cpu")
    assert loaded.checkpoint == result.checkpoint
    assert loaded.recipe == "base_train" and not loaded.is_chat
    text = generate_text(loaded, "the red ball", max_new_tokens=6)
    tok = loaded.tokenizer
    ids = [tok.bos_id, *tok.encode("the red ball")]
    expected = _manual_reply(loaded, ids, 6)
    cut = next((i for i, t in enumerate(expected) if t == tok.bos_id), len(expected))
    assert text == tok.decode(expected[:cut], skip_special=True)

    # a chat run goes through the chat template and stops at the assistant's end token
    chat = LoadedModel(loaded.model, tok, loaded.checkpoint, "chat_sft", "chat")
    ids, _ = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    expected = _manual_reply(chat, ids, 8)
    stop = next((i for i, t in enumerate(expected) if t in (tok.eos_id, tok.bos_id)), len(expected))
    assert generate_text(chat, "hi", max_new_tokens=8) == tok.decode(expected[:stop], skip_special=True)


def test_infer_cli_without_a_run_is_one_clear_error(tmp_path):
    env = {"GHOSTVIS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = run_cli_process(["infer", "--run", "nope", "--prompt", "hi"], env=env, cwd=REPO)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli_process(["infer", "--prompt", "hi"], env=env, cwd=REPO)
    assert proc.returncode == 2
    assert "ghostvis train base_train" in proc.stderr and "Traceback" not in proc.stderr

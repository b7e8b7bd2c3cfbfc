"""`ghostvis export RUN_OR_CHECKPOINT OUT_DIR` and the export cache the vLLM backend serves from.

Runs of random tiny models are saved as training saves them; the exports are loaded back by transformers (no
custom code) and compared with our model's logits and greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli
from saved_runs import save_text_run, save_vlm_run

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.export_checkpoint import ExportInfo, cached_export, export_key

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], dim=1)
    return x[0, len(ids):].tolist()


def test_export_text_run_loads_in_transformers_with_our_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ghostvis_core.engine import load_for_inference

    save_text_run("chat-a")
    out = tmp_path / "hf"
    code, stdout, err = run_cli(["export", "chat-a", str(out)], capsys)
    assert code == 0, err
    assert "as LlamaForCausalLM" in stdout and "from_pretrained" in stdout and "vllm" in stdout.lower()
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "ghostvis.json"} <= files
    info = ExportInfo.read(out)
    assert info.architecture == "LlamaForCausalLM" and info.data_format == "chat"
    loaded = load_for_inference("chat-a")
    ids = loaded.encode_prompt("what colour is the circle?")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = loaded.model(torch.tensor([ids])), hf(torch.tensor([ids])).logits
    diff = (ours - theirs).abs().max().item()
    print(f"export vs transformers logits: max abs diff {diff:.2e}")
    assert diff < 1e-4
    assert _greedy(loaded.model, ids, 12) == _greedy(lambda x: hf(x).logits, ids, 12)
    # the exported tokenizer + template give the ids our engine prompts with (one BOS)
    tok = AutoTokenizer.from_pretrained(out)
    rendered = tok.apply_chat_template([{"role": "user", "content": "what colour is the circle?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(rendered) == ids and ids.count(loaded.tokenizer.bos_id) == 1


def test_export_vlm_run_is_llava_with_the_siglip_layout(tmp_path, capsys):
    from safetensors import safe_open

    run = save_vlm_run("vlm-a")
    out = tmp_path / "llava"
    code, stdout, err = run_cli(["export", str(run / "step_000001"), str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "as LlavaForConditionalGeneration" in stdout
    assert config["vision_feature_select_strategy"] == "full" and config["vision_feature_layer"] == -1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert any(k.startswith("language_model.model.") for k in keys)
    assert (out / "processor_config.json").is_file() and ExportInfo.read(out).data_format == "image-chat"


def test_export_refuses_a_non_empty_out_dir_unless_forced(tmp_path, capsys):
    save_text_run("chat-b")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["export", "chat-b", str(out)], capsys)
    assert code == 2 and "already exists and is not empty" in err and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    code, _, err = run_cli(["export", "chat-b", str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()  # replaced whole
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["export", "chat-b", str(empty)], capsys)[0] == 0  # an empty folder is fine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside


@pytest.mark.parametrize("what, match", [
    ("missing", "export nope: no such checkpoint or run folder"),
    ("hf", "is already a Hugging Face folder"),
    ("file", "is a file"),
])  # fmt: skip
def test_export_bad_inputs_are_one_message(tmp_path, capsys, what, match):
    save_text_run("chat-c")
    src, out = "chat-c", tmp_path / "out"
    if what == "missing":
        src = "nope"
    elif what == "hf":
        assert run_cli(["export", "chat-c", str(tmp_path / "hf")], capsys)[0] == 0
        src = str(tmp_path / "hf")
    else:
        out.write_text("x")
    code, _, err = run_cli(["export", src, str(out)], capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cached_export_is_redone_only_when_the_checkpoint_changes():
    run = save_text_run("chat-d", seed=0)
    step = run / "step_000001"
    first = cached_export(step)
    assert first.parent == run / "hf_export" and first.name == f"step_000001-{export_key(step)}"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_export(step) == first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    save_text_run("chat-d", seed=1)  # the same step rewritten with other weights (a resumed run re-reaching it)
    second = cached_export(step)
    assert second != first and not first.exists()  # re-exported; the stale export is gone
    assert ExportInfo.read(second).key == export_key(step)
    weights = ckpt.load_model_state(step)["model.embed_tokens.weight"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(second / "model.safetensors"))["model.embed_tokens.weight"], weights)


def test_native_infer_from_an_exported_folder_answers_as_the_run(tmp_path, capsys):
    save_text_run("chat-n")
    out = tmp_path / "hf"
    assert run_cli(["export", "chat-n", str(out)], capsys)[0] == 0
    answers = []
    for model in ("chat-n", str(out)):
        code, stdout, err = run_cli(["infer", "--model", model, "--prompt", "what colour is the circle?",
                                     "--max-tokens", "12"], capsys)  # fmt: skip
        assert code == 0, err
        first, *reply = stdout.splitlines()
        assert first.startswith("model: ") and (str(out) in first) == (model == str(out))
        answers.append(reply)
    assert answers[0] == answers[1]  # same weights, tokenizer, chat template and stop tokens
    assert "Hugging Face LlamaForCausalLM" in run_cli(["infer", "--model", str(out), "--prompt", "hi",
                                                       "--max-tokens", "2"], capsys)[1]  # fmt: skip


def test_native_infer_refuses_an_exported_vlm_and_a_foreign_tokenizer(tmp_path, capsys):
    save_vlm_run("vlm-n")
    vlm_out = tmp_path / "llava"
    assert run_cli(["export", "vlm-n", str(vlm_out)], capsys)[0] == 0
    code, _, err = run_cli(["infer", "--model", str(vlm_out), "--prompt", "hi"], capsys)
    assert code != 0 and "LlavaForConditionalGeneration" in err and "--backend vllm" in err
    assert "Traceback" not in err
    save_text_run("text-n", data_format="text")
    out = tmp_path / "hf"
    assert run_cli(["export", "text-n", str(out)], capsys)[0] == 0
    tok_file = out / "tokenizer.json"  # another family's tokenizer: no <|bos|>
    tok_file.write_text(tok_file.read_text().replace("<|bos|>", "<s>"))
    code, _, err = run_cli(["infer", "--model", str(out), "--prompt", "hi"], capsys)
    assert code != 0 and f"--model {out}" in err and "not a GhostVis tokenizer" in err, err


def test_a_run_folder_is_not_taken_for_a_hugging_face_folder(tmp_path, capsys):
    from ghostvis_core.export_checkpoint import is_hf_folder

    run = save_text_run("both-kinds")
    (run / "config.json").write_text("{}")  # a run folder holds the run's config.json
    out = tmp_path / "hf"
    assert run_cli(["export", "both-kinds", str(out)], capsys)[0] == 0
    assert is_hf_folder(out) and not is_hf_folder(run) and not is_hf_folder(ckpt.latest_checkpoint(run))
    code, stdout, err = run_cli(["infer", "--model", str(run), "--prompt", "hi", "--max-tokens", "2"], capsys)
    assert code == 0 and "step_" in stdout.splitlines()[0], err

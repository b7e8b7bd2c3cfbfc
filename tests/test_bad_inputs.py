"""Broken inputs across every command: for each, a non-zero exit, no traceback, the file / line / flag named in
the message, and every file that existed before byte-identical after (the whole GHOSTVIS_HOME and the case's
folder are hashed before and after).

Each case is a function that prepares its inputs in its own folder and returns (argv, fragments the message
must hold). `ghostvis train` runs its trainer in-process (helpers.in_process_child), so data, config and
checkpoint errors raised by the trainer are checked on the same path a real launch takes. The count of cases
is printed at the end (`bad-input cases: N`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import in_process_child, run_cli, tree_hashes
from safetensors.torch import load_file, save_file
from test_train_config import tiny_config

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.train import launch
from ghostvis_core.train.loop import train

TRAIN = ["--gpus", "0", "--device-batch-size", "2", "--pack-max-length", "32", "--num-steps", "2", "save_every=0"]
TINY = ["model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.n_kv_head=1"]


@dataclass
class World:
    """What the module builds once: a GHOSTVIS_HOME holding one tiny trained text run."""

    home: Path
    text_run: Path
    """home/runs/text: a 2-step base_train run (one checkpoint, step_000002)."""

    def copy_run(self, folder: Path, name: str = "x") -> Path:
        """A copy of the text run at folder/runs/NAME (the case may damage it)."""
        target = folder / "runs" / name
        shutil.copytree(self.text_run, target)
        return target


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    home = tmp_path_factory.mktemp("bad_inputs") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GHOSTVIS_HOME", str(home))
        cfg = tiny_config(home, runs_root=str(home / "runs"), run="text", num_steps=2, save_every=0)
        train(cfg)
    return World(home=home, text_run=home / "runs" / "text")


@dataclass(frozen=True)
class Case:
    id: str
    prepare: Callable[[World, Path], tuple[list[str], list[str]]]
    env: Callable[[World, Path], dict[str, str]] | None = None


CASES: list[Case] = []


def case(id: str, env=None):
    """Register a case; `env(world, folder)` gives extra environment variables."""

    def register(fn):
        CASES.append(Case(id, fn, env))
        return fn

    return register


def simple(id: str, args: list[str], *fragments: str) -> None:
    """A case that needs no files: fixed argv and fragments."""
    CASES.append(Case(id, lambda w, d: (list(args), list(fragments))))


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, records: list) -> str:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


# ---- ghostvis train: flags and overrides -----------------------------------------------------------------

simple("train-unknown-recipe", ["train", "base_trian"], "unknown recipe 'base_trian'", "base_train")
simple("train-missing-recipe", ["train"], "missing RECIPE")
simple("train-override-no-equals", ["train", "base_train", "num_steps"], "override 'num_steps'", "key=value")
simple("train-unknown-override", ["train", "base_train", "num_stepz=3"], "num_stepz", "num_steps")
simple("train-override-bad-int", ["train", "base_train", "num_steps=abc"], "num_steps", "abc")
simple("train-override-model-type", ["train", "base_train", "model.n_layer=two"], "n_layer", "two")
simple("train-recipe-override", ["train", "base_train", "recipe=chat_sft"], "recipe=chat_sft")
simple("train-flag-and-override", ["train", "base_train", "--num-steps", "3", "num_steps=4"],
       "num_steps is given twice")
simple("train-gpus-on-cpu", ["train", "base_train", "--gpus", "2"], "--gpus 2", "--gpus 0")
simple("train-nodes-without-endpoint", ["train", "base_train", "--nodes", "2"], "--rdzv-endpoint")
simple("train-node-rank-out-of-range", ["train", "base_train", "--nodes", "2", "--node-rank", "3",
                                        "--rdzv-endpoint", "h:1"], "--node-rank 3")
simple("train-bad-endpoint", ["train", "base_train", "--nodes", "2", "--rdzv-endpoint", "nohost"], "--rdzv-endpoint")
simple("train-fsdp-on-cpu", ["train", "base_train", "--gpus", "0", "--fsdp"], "--fsdp")
simple("train-unknown-preset", ["train", "base_train", "--preset", "nosuch"], "nosuch")
simple("train-zero-batch", ["train", "base_train", "--device-batch-size", "0"], "device_batch_size")
simple("train-negative-steps", ["train", "base_train", "--num-steps", "-1"], "num_steps")
simple("train-bad-resume-word", ["train", "base_train", "--resume", "sometimes", "--gpus", "0"], "sometimes")
simple("train-gpus-negative", ["train", "base_train", "--gpus", "-1"], "--gpus")
simple("train-log-to-unknown", ["train", "base_train", "--log-to", "tensorbord"], "--log-to tensorbord",
       "did you mean 'tensorboard'")
simple("train-log-to-override-unknown", ["train", "base_train", "log_to=mlflow"], "--log-to mlflow", "wandb")
if importlib.util.find_spec("wandb") is None:  # the test extra leaves it out: the absent-package message
    simple("train-log-to-missing-package", ["train", "base_train", "--gpus", "0", "--log-to", "wandb"],
           "--log-to wandb", "pip install 'ghostvis[wandb]'")


@case("train-missing-data")
def _(w, d):
    return ["train", "base_train", "--data", str(d / "nope.txt")], ["--data", "nope.txt"]


@case("train-missing-tokenizer")
def _(w, d):
    return ["train", "base_train", f"tokenizer={d / 'tok'}"], ["tokenizer", "tok"]


@case("train-tokenizer-folder-without-json")
def _(w, d):
    (d / "tok").mkdir()
    return ["train", "base_train", *TRAIN, *TINY, f"tokenizer={d / 'tok'}"], ["tokenizer=", "no tokenizer.json"]


@case("train-missing-resume-path")
def _(w, d):
    return ["train", "base_train", *TRAIN, *TINY, "--resume", str(d / "step_000009")], ["--resume", "step_000009"]


@case("train-missing-init-from")
def _(w, d):
    return ["train", "chat_sft", *TRAIN, f"runs_root={d / 'runs'}", f"init_from={d / 'gone'}"], ["init_from", "gone"]


@case("train-pack-longer-than-context")
def _(w, d):
    return (["train", "base_train", "--gpus", "0", "--pack-max-length", "100000", *TINY, f"runs_root={d}"],
            ["pack_max_length=100000", "sequence_len"])


# ---- recipe config files (python -m recipes.X --config FILE: what `ghostvis train` passes) ----------------


def recipe_case(id: str, content: str | None, *fragments: str) -> None:
    def prepare(w, d):
        path = d / "cfg.json"
        if content is not None:
            write(path, content)
        return ["@recipe", "--config", str(path)], [str(path), *fragments]

    CASES.append(Case(id, prepare))


recipe_case("config-missing-file", None)
recipe_case("config-not-json", "{not json", "JSON")
recipe_case("config-not-object", "[1, 2]", "object")
recipe_case("config-wrong-type", '{"num_steps": "two"}', "num_steps")
recipe_case("config-model-wrong-type", '{"model": {"n_layer": "two"}}', "n_layer")
recipe_case("config-unknown-key", '{"num_stepz": 3}', "num_stepz")


# ---- ghostvis train: data files --------------------------------------------------------------------------


def data_case(id: str, name: str, content: str | bytes, *fragments: str, extra=()) -> None:
    def prepare(w, d):
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return (["train", "base_train", *TRAIN, *TINY, f"runs_root={d / 'runs'}", "--data", str(path), *extra],
                [name, *fragments])

    CASES.append(Case(id, prepare))


data_case("data-empty-txt", "empty.txt", "")
data_case("data-whitespace-txt", "blank.txt", "\n \n\t\n")
data_case("data-jsonl-bad-json", "bad.jsonl", '{"text": "a"}\n{"text": \n', "bad.jsonl:2")
data_case("data-jsonl-missing-field", "nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', "nofield.jsonl:2")
data_case("data-jsonl-not-object", "list.jsonl", '["a"]\n', "list.jsonl:1")
data_case("data-jsonl-text-not-string", "num.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": 3}\n', "num.jsonl:3")
data_case("data-parquet-garbage", "junk.parquet", b"PAR1 not really a parquet file")
data_case("data-unknown-extension", "data.csv", "text\nhello\n", "data.csv")
data_case("data-binary-txt", "bin.txt", b"\xff\xfe\x00bad utf8 \xc3\x28", "bin.txt")
# chat records where pretraining wants documents: refused while the tokenizer for the data is trained, so no
# tokenizer is cached for data the run cannot read
data_case("data-chat-records-for-pretraining", "chats.jsonl",
          '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
          "chats.jsonl:1", "missing 'text' field")


@case("data-parquet-no-text-column")
def _(w, d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = d / "cols.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    return (["train", "base_train", *TRAIN, *TINY, f"runs_root={d / 'runs'}", "--data", str(path)],
            ["cols.parquet", "text"])


@case("data-empty-folder")
def _(w, d):
    (d / "corpus").mkdir()
    return ["train", "base_train", *TRAIN, *TINY, f"runs_root={d / 'runs'}", "--data", str(d / "corpus")], ["corpus"]


def chat_case(id: str, lines: list, *fragments: str) -> None:
    def prepare(w, d):
        path = jsonl(d / "chat.jsonl", lines)
        return (["train", "chat_sft", *TRAIN, f"runs_root={d / 'runs'}", f"init_from={w.text_run}", "--run", "c",
                 "--data", path], ["chat.jsonl", *fragments])

    CASES.append(Case(id, prepare))


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
chat_case("chat-bad-json", [GOOD_CHAT, GOOD_CHAT, '{"messages": ['], "chat.jsonl:3")
chat_case("chat-bad-role", [{"messages": [{"role": "robot", "content": "x"}]}], "chat.jsonl:1", "robot")
chat_case("chat-messages-not-list", [GOOD_CHAT, {"messages": "hi"}], "chat.jsonl:2")
chat_case("chat-no-messages-key", [{"text": "hi"}], "chat.jsonl:1")
chat_case("chat-content-not-string", [{"messages": [{"role": "user", "content": 3},
                                                    {"role": "assistant", "content": "x"}]}], "chat.jsonl:1")


def image_case(id: str, records, *fragments: str, name: str = "data.json") -> None:
    def prepare(w, d):
        from PIL import Image

        root = d / "images"
        root.mkdir()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "ok.png")
        (d / "secret.png").write_bytes((root / "ok.png").read_bytes())
        path = root / name
        path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
        return (["train", "vision_pretrain", *TRAIN, f"runs_root={d / 'runs'}", "init_from=none", "--run", "v",
                 "--data", str(path)], [name, *fragments])

    CASES.append(Case(id, prepare))


def llava(image, question="<image>\nWhat colour?"):
    rec = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}
    return rec if image is None else {**rec, "image": image}


image_case("image-missing-file", [llava("ok.png"), llava("missing.png")], "record 1", "missing.png")
image_case("image-path-escape", [llava("../secret.png")], "record 0", "outside the image root")
image_case("image-too-many-placeholders", [llava("ok.png", "<image> <image> what?")], "record 0", "'<image>'")
image_case("image-no-placeholder", [llava("ok.png", "what colour?")], "record 0", "'<image>'")
image_case("image-json-not-list", '{"image": "ok.png"}', "data.json")
image_case("image-json-broken", '[{"image": ]', "data.json")


# ---- checkpoints: resume and infer ------------------------------------------------------------------------


def damage_state(run: Path, edit: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
    state_path = run / "step_000002" / ckpt.STATE_FILE
    if text is None:
        state = json.loads(state_path.read_text())
        edit(state)
        text = json.dumps(state)
    state_path.write_text(text)
    return state_path


def rewrite_weights(run: Path, edit: Callable[[dict], None]) -> None:
    """Change model.safetensors and re-sign the manifest, so only the key/shape check can catch it."""
    step = run / "step_000002"
    tensors = load_file(str(step / ckpt.MODEL_FILE))
    edit(tensors)
    save_file(tensors, str(step / ckpt.MODEL_FILE), metadata={"format": "pt", "ghostvis_tied": "{}"})
    state = json.loads((step / ckpt.STATE_FILE).read_text())
    state["manifest"][ckpt.MODEL_FILE] = ckpt.file_info(step / ckpt.MODEL_FILE)
    (step / ckpt.STATE_FILE).write_text(json.dumps(state))


def _set_layer_two(state):
    state["model_config"]["n_layer"] = "two"


def _drop_model_config(state):
    del state["model_config"]


def _step_text(state):
    state["step"] = "two"


def _shape(tensors):
    key = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


def _missing(tensors):
    del tensors[next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)]


STATE_DAMAGE = {
    "not-json": (dict(text="{broken"), ["state.json", "not valid JSON"]),
    "step-text": (dict(edit=_step_text), ["state.json", "'step'"]),
    "n-layer-text": (dict(edit=_set_layer_two), ["state.json", "n_layer", "two"]),
    "no-model-config": (dict(edit=_drop_model_config), ["state.json", "model_config"]),
}
WEIGHT_DAMAGE = {"wrong-shape": (_shape, ["model.safetensors", "has shape"]),
                 "missing-tensor": (_missing, ["model.safetensors", "has no tensor"])}


def checkpoint_cases(command: str) -> None:
    def args(run: Path, d: Path) -> list[str]:
        if command == "train":
            return ["train", "base_train", *TRAIN, "--num-steps", "4", f"runs_root={d / 'runs'}", "--run", "x"]
        return ["infer", "--model", str(run), "--prompt", "hello", "--max-tokens", "2"]

    def state_case(kind):
        def prepare(w, d):
            run = w.copy_run(d)
            if kind == "no-model-config":
                (run / "config.json").unlink()  # nothing to fall back on
            damage_state(run, **STATE_DAMAGE[kind][0])
            return args(run, d), STATE_DAMAGE[kind][1]

        return prepare

    def weight_case(kind):
        def prepare(w, d):
            run = w.copy_run(d)
            rewrite_weights(run, WEIGHT_DAMAGE[kind][0])
            return args(run, d), WEIGHT_DAMAGE[kind][1]

        return prepare

    for kind in STATE_DAMAGE:
        CASES.append(Case(f"{command}-state-{kind}", state_case(kind)))
    for kind in WEIGHT_DAMAGE:
        CASES.append(Case(f"{command}-weights-{kind}", weight_case(kind)))


checkpoint_cases("train")
checkpoint_cases("infer")


@case("train-corrupt-optimizer")
def _(w, d):
    run = w.copy_run(d)
    (run / "step_000002" / ckpt.OPTIMIZER_FILE).write_bytes(b"truncated")
    return ["train", "base_train", *TRAIN, "--num-steps", "4", f"runs_root={d / 'runs'}", "--run", "x"], [
        "optimizer.pt", "step_000002"]


@case("train-damaged-run-config")
def _(w, d):
    run = w.copy_run(d)
    write(run / "config.json", "{oops")
    damage_state(run, edit=lambda s: s.pop("recipe"))  # the legacy path reads config.json
    return ["train", "base_train", *TRAIN, "--num-steps", "4", f"runs_root={d / 'runs'}", "--run", "x"], [
        "config.json"]


@case("infer-corrupt-weights-hint-is-an-infer-flag")
def _(w, d):
    run = w.copy_run(d)
    weights = run / "step_000002" / ckpt.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return ["infer", "--model", str(run), "--prompt", "hi"], ["sha256", "another --model"]


# ---- ghostvis infer ----------------------------------------------------------------------------------------

simple("infer-missing-model", ["infer", "--model", "no_such_run", "--prompt", "hi"], "no_such_run")


def infer_case(id: str, extra: list[str], *fragments: str) -> None:
    CASES.append(Case(id, lambda w, d: (["infer", "--model", str(w.text_run), *extra], list(fragments))))


infer_case("infer-empty-prompt", ["--prompt", ""], "--prompt")
infer_case("infer-blank-prompt", ["--prompt", "  \n "], "--prompt")
infer_case("infer-bad-dtype", ["--prompt", "hi", "--dtype", "float8"], "--dtype", "float8")
infer_case("infer-image-on-text-run", ["--prompt", "hi", "--image", "x.png"], "--image")
infer_case("infer-bad-backend", ["--prompt", "hi", "--backend", "warp"], "--backend", "warp")
infer_case("infer-zero-max-tokens", ["--prompt", "hi", "--max-tokens", "0"], "--max-tokens")
infer_case("infer-negative-temperature", ["--prompt", "hi", "--temperature", "-1"], "--temperature")
infer_case("infer-top-p-above-one", ["--prompt", "hi", "--top-p", "1.5"], "--top-p")
infer_case("infer-top-k-zero", ["--prompt", "hi", "--top-k", "0"], "--top-k")
infer_case("infer-missing-batch-file", ["--batch-file", "/nonexistent/prompts.txt", "--output", "/nonexistent/o.jsonl"],
           "prompts.txt")


@case("infer-batch-file-bad-line")
def _(w, d):
    path = jsonl(d / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": '])
    return ["infer", "--model", str(w.text_run), "--batch-file", path, "--output", str(d / "o.jsonl")], ["p.jsonl:3"]


@case("infer-batch-file-empty")
def _(w, d):
    path = write(d / "p.txt", "")
    return ["infer", "--model", str(w.text_run), "--batch-file", path, "--output", str(d / "o.jsonl")], ["p.txt"]


@case("infer-output-exists-without-resume")
def _(w, d):
    path = write(d / "p.txt", "hello\n")
    out = write(d / "o.jsonl", '{"index": 0}\n')
    return ["infer", "--model", str(w.text_run), "--batch-file", path, "--output", out], ["o.jsonl", "--resume"]


# ---- doctor, install, tokenizer, bench ---------------------------------------------------------------------

simple("doctor-require-unknown", ["doctor", "--require", "warpdrive"], "--require", "warpdrive")
simple("install-unknown", ["install", "warpdrive"], "warpdrive")
simple("bench-infer-zero-prompts", ["bench", "--num-prompts", "0"], "--num-prompts")
simple("bench-infer-bad-dtype", ["bench", "--dtype", "float8"], "--dtype", "float8")
simple("bench-infer-bad-backend", ["bench", "--backend", "warp"], "--backend", "warp")
simple("bench-infer-unknown-preset", ["bench", "--preset", "nosuch"], "nosuch")
simple("bench-infer-json-error-is-json", ["bench", "--num-prompts", "0", "--json"], '{"error": ', "--num-prompts")
simple("bench-train-zero-steps", ["bench", "train", "--steps", "0"], "--steps")
simple("bench-train-bad-optimizer", ["bench", "train", "--optimizer", "sgd9"], "--optimizer", "sgd9")
simple("bench-kernels-bad-dtype", ["bench", "kernels", "--dtype", "float64"], "--dtype", "float64")
simple("eval-negative-examples", ["eval", "somerun", "--examples", "-1"], "--examples", "-1")


@case("tokenizer-missing-data")
def _(w, d):
    return ["tokenizer", "train", "--data", str(d / "none.txt"), "--out", str(d / "tok")], ["none.txt"]


@case("tokenizer-empty-data")
def _(w, d):
    return ["tokenizer", "train", "--data", write(d / "e.txt", ""), "--out", str(d / "tok")], ["e.txt"]


@case("tokenizer-tiny-vocab")
def _(w, d):
    return (["tokenizer", "train", "--data", write(d / "t.txt", "hello world\n" * 20), "--vocab-size", "3",
             "--out", str(d / "tok")], ["--vocab-size"])


@case("tokenizer-bad-kind")
def _(w, d):
    return (["tokenizer", "train", "--data", write(d / "t.txt", "hello\n"), "--kind", "csv", "--out", str(d / "tok")],
            ["--kind", "csv"])


@case("tokenizer-jsonl-bad-line")
def _(w, d):
    return (["tokenizer", "train", "--data", write(d / "t.jsonl", '{"text": "a"}\n{"text"\n'), "--out",
             str(d / "tok")], ["t.jsonl:2"])


@case("tokenizer-existing-out")
def _(w, d):
    write(d / "tok" / "tokenizer.json", "{}")
    return (["tokenizer", "train", "--data", write(d / "t.txt", "hello world\n" * 20), "--out", str(d / "tok")],
            ["--force"])


# ---- environment -------------------------------------------------------------------------------------------


def unwritable_home(w, d) -> dict[str, str]:
    (d / "afile").write_text("a file where a folder should be")
    return {"GHOSTVIS_HOME": str(d / "afile" / "home")}


CASES.append(Case("env-unwritable-home-train",
                  lambda w, d: (["train", "base_train", *TRAIN, *TINY], ["afile"]), unwritable_home))
CASES.append(Case("env-unwritable-home-tokenizer",
                  lambda w, d: (["tokenizer", "train", "--data", write(d / "t.txt", "hello world\n" * 20)],
                                ["afile"]), unwritable_home))
CASES.append(Case("env-unwritable-home-infer", lambda w, d: (["infer", "--prompt", "hi"], ["afile"]),
                  unwritable_home))


# ---- the runner ------------------------------------------------------------------------------------------


def _hashes(world: World, folder: Path) -> dict[str, str]:
    return {**{f"home/{k}": v for k, v in tree_hashes(world.home).items()},
            **{f"case/{k}": v for k, v in tree_hashes(folder).items()}}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stdout + stderr) of the CLI, or of the recipe entry point for "@recipe" argv."""
    if argv[0] != "@recipe":
        code, out, err = run_cli(argv, capsys)
        return code, out + err
    from helpers import fresh_log_handlers

    from recipes import base_train

    with fresh_log_handlers():
        code = base_train.main(argv[1:])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input(bad: Case, world: World, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(world.home))
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv("GHOSTVIS_DEBUG", raising=False)
    monkeypatch.setattr(launch, "run_child", in_process_child)
    folder = tmp_path / "case"
    folder.mkdir()
    argv, fragments = bad.prepare(world, folder)
    for key, value in (bad.env(world, folder) if bad.env else {}).items():
        monkeypatch.setenv(key, value)
    before = _hashes(world, folder)
    code, text = _run(argv, capsys)
    print(text[-3000:])
    flat = " ".join(text.split())
    assert code != 0, text
    assert "Traceback" not in text and "Logging error" not in text
    assert text.count("error:") <= 1, text  # one message per mistake
    missing = [f for f in fragments if " ".join(f.split()) not in flat]
    assert not missing, f"message lacks {missing}: {flat[-1500:]}"
    assert _hashes(world, folder) == before


def test_bad_input_count():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    print(f"bad-input cases: {len(ids)}")

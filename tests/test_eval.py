"""`ghostvis eval`: answer normalisation, per-kind scoring against chance and the text-only ceiling, reading
LLaVA-style question files, and the command on a saved VLM run (CPU, tiny, random weights)."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli
from saved_runs import save_vlm_run

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.config import GPTConfig
from ghostvis_core.data import default_tokenizer
from ghostvis_core.data.shapes import ShapesTask, chance_accuracy, draw_example, write_llava_dataset
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.evaluate import Question, evaluate_run, normalise_answer, read_questions, score


@pytest.mark.parametrize("raw, normal", [
    ("Red.", "red"), ("  the Circle ", "circle"), ("top-left", "top left"), ("A small, blue square!", "small blue square"),
    ("three", "three"), ("", ""),
])  # fmt: skip
def test_normalise_answer(raw, normal):
    assert normalise_answer(raw) == normal


def _questions(n_images=60):
    task = ShapesTask(32, 0, "heldout")
    return [Question(q, task.sample(i).image, a, k) for i in range(n_images) for q, a, k in task.sample(i).qa]


def test_scores_per_kind_against_chance_and_the_oracle():
    qs = _questions()
    perfect = score(qs, lambda q: q.answer + ".", chance=chance_accuracy)
    assert perfect.overall.accuracy == 1.0 and perfect.overall.num == len(qs)
    assert {s.kind: s.chance for s in perfect.scores} == {k: chance_accuracy(k) for k in {q.kind for q in qs}}
    # a constant answer scores exactly the share of questions it happens to answer
    red = score(qs, lambda q: "red", chance=chance_accuracy, text_only={"color": 0.2, "all": 0.3})
    colour = next(s for s in red.scores if s.kind == "color")
    assert colour.correct == sum(q.answer == "red" for q in qs if q.kind == "color")
    assert red.overall.correct == colour.correct and colour.text_only == 0.2 and red.overall.text_only == 0.3
    weighted = sum(chance_accuracy(q.kind) for q in qs) / len(qs)
    assert red.overall.chance == pytest.approx(weighted)


def test_reads_the_builtin_qa_file_with_its_kinds(tmp_path):
    data = write_llava_dataset(tmp_path / "qa", 10, "qa", image_size=32, split="heldout")
    qs = read_questions(data)
    records = json.loads(data.read_text())
    assert len(qs) == len(records) and [q.kind for q in qs] == [r["kind"] for r in records]
    assert all(q.image.is_file() and q.question.endswith("?") and "<image>" not in q.question for q in qs)
    assert read_questions(data, limit=3) == qs[:3]


def test_a_record_with_two_images_is_one_message(tmp_path):
    data = write_llava_dataset(tmp_path / "qa", 2, "qa", image_size=32, split="heldout")
    records = json.loads(data.read_text())
    records[1]["image"] = [records[1]["image"], records[0]["image"]]
    records[1]["conversations"][0]["value"] = "<image>\n" + records[1]["conversations"][0]["value"]
    data.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 1: an eval question has exactly one image, this one has 2"):
        read_questions(data)


def _save_run(tmp_path, monkeypatch):
    """A run folder "vlm" of a random tiny VLM with the default tokenizer (what load_for_inference needs)."""
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    return save_vlm_run("vlm")


def test_eval_command_on_a_saved_vlm_run(tmp_path, monkeypatch, capsys):
    run = _save_run(tmp_path, monkeypatch)
    data = write_llava_dataset(tmp_path / "qa", 3, "qa", image_size=32, split="heldout")
    report = evaluate_run("vlm", data=str(data), limit=4, baseline=True, max_new_tokens=3)
    assert report.overall.num == 4 and 0.0 <= report.overall.accuracy <= 1.0
    assert report.overall.chance is None and report.overall.text_only is not None  # a user file: no chance
    code, out, _ = run_cli(["eval", "vlm", "--data", str(data), "--num", "2", "--json"], capsys)
    assert code == 0
    parsed = json.loads(out)
    assert parsed["overall"]["num"] == 2 and parsed["run"].startswith(str(run))
    assert len(parsed["examples"]) == 2  # the default 5, capped by the 2 questions asked
    code, out, _ = run_cli(["eval", "vlm", "--data", str(data), "--num", "2", "--examples", "0"], capsys)
    assert code == 0 and "(expected" not in out and "│ all" in out  # the table, no sample answers
    image = draw_example(tmp_path / "demo.png")
    assert image.image.size == (32, 32) and (tmp_path / "demo-large.png").is_file()


def test_eval_refuses_a_text_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    tok = default_tokenizer(4096)
    from plans import cpu_gpt

    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=tok.vocab_size, sequence_len=32)
    run = tmp_path / "home" / "runs" / "text"
    ckpt.save_checkpoint(run, 1, model_state=cpu_gpt(config).state_dict(), optimizer_state={},
                         state=ckpt.TrainState(step=1, model_config=config.to_dict(), recipe="base_train").to_dict(),
                         keep_last=0)
    tok.save(run / "tokenizer")
    with pytest.raises(ConfigError, match="is a text model"):
        evaluate_run("text")

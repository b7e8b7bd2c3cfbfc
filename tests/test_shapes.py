"""The built-in shapes task: determinism, disjoint splits, balanced answers, captions true to the pixels."""

import json

import numpy as np
import pytest

from ghostvis_core.data.shapes import (
    BACKGROUND,
    COLOURS,
    NUMBER_WORDS,
    QUESTION_KINDS,
    ShapesTask,
    cell_box,
    chance_accuracy,
    scene_key,
    shape_box,
    text_only_accuracy,
    write_llava_dataset,
)
from ghostvis_core.errors import ConfigError

NUM = 600


def _pixels(sample):
    return np.asarray(sample.image, dtype=np.int64)


def test_same_seed_same_pixels_other_seed_differs():
    a, b = ShapesTask(32, seed=3), ShapesTask(32, seed=3)
    for i in (0, 1, 57):
        sa, sb = a.sample(i), b.sample(i)
        assert np.array_equal(_pixels(sa), _pixels(sb))
        assert (sa.caption, sa.qa) == (sb.caption, sb.qa)
    other = ShapesTask(32, seed=4)
    assert sum(a.scene(i) != other.scene(i) for i in range(50)) >= 40
    # Order of drawing does not matter: index 57 alone equals index 57 after others.
    assert np.array_equal(_pixels(ShapesTask(32, seed=3).sample(57)), _pixels(a.sample(57)))


def test_image_size_and_mode():
    for size in (32, 224):
        img = ShapesTask(size, seed=0).sample(0).image
        assert img.size == (size, size) and img.mode == "RGB"
    with pytest.raises(ConfigError, match="image_size=8"):
        ShapesTask(8)
    with pytest.raises(ConfigError, match="split='test'"):
        ShapesTask(32, split="test")


def test_splits_disjoint_across_seeds():
    train = {scene_key(ShapesTask(32, seed=s).scene(i)) for s in (0, 1) for i in range(NUM)}
    heldout = {scene_key(ShapesTask(32, seed=s, split="heldout").scene(i))
               for s in (0, 2) for i in range(NUM)}
    assert train.isdisjoint(heldout)
    # Mostly distinct scenes: only the ~27 held-out single-shape scenes repeat (a third of the samples).
    assert len(heldout) > 0.6 * 2 * NUM


def _qa(split, n=NUM, seed=0):
    task = ShapesTask(32, seed=seed, split=split)
    return [item for i in range(n) for item in task.sample(i).qa]


def test_answers_balanced_and_text_only_near_chance():
    train, heldout = _qa("train", 3000), _qa("heldout", 3000)
    for kind in QUESTION_KINDS:
        tr = [(q, a) for q, a, k in train if k == kind]
        ho = [(q, a) for q, a, k in heldout if k == kind]
        chance = chance_accuracy(kind)
        if kind == "larger":  # the answer is one of the two shapes named: balance is first vs second named
            tr_balance = [str(q.split(" or ")[0].endswith(a)) for q, a in tr]
        else:
            tr_balance = [a for _, a in tr]
        answers = set(tr_balance)
        shares = np.array([tr_balance.count(x) for x in answers]) / len(tr)
        # Every answer appears, each within 15% of uniform (3000 images: position's 1/9 share has sigma 5%).
        assert len(answers) == round(1 / chance)
        assert np.all(np.abs(shares - chance) < 0.15 * chance), (kind, shares)
        ceiling = text_only_accuracy(tr)
        baseline = text_only_accuracy(tr, ho)
        print(f"{kind}: chance {chance:.3f}  train ceiling {ceiling:.3f}  held-out {baseline:.3f}")
        # The band: a majority vote over a few hundred draws per question string beats chance by noise alone
        # (~0.02-0.04 here); anything the question gave away would show as a larger excess.
        assert ceiling < chance + 0.06
        assert baseline < chance + 0.04


def test_chance_levels():
    assert chance_accuracy("color") == 1 / len(COLOURS) == 0.25
    assert chance_accuracy("position") == 1 / 9
    assert chance_accuracy("count") == 1 / 3
    assert chance_accuracy("larger") == 0.5
    with pytest.raises(ConfigError, match="unknown question kind 'colour'"):
        chance_accuracy("colour")


def _shape_at(pixels, shape, size):
    """(colour name, pixel count, fill of its box) read back from the pixels of the shape's cell."""
    x0, y0, x1, y1 = cell_box(shape.cell, size)
    cell = pixels[y0:y1, x0:x1]
    painted = np.any(cell != BACKGROUND, axis=-1)
    colours = {tuple(c) for c in cell[painted]}
    assert len(colours) == 1, colours  # flat colours, no anti-aliasing
    rgb = colours.pop()
    name = next(n for n, c in COLOURS.items() if c == rgb)
    bx0, by0, bx1, by1 = shape_box(shape, size)
    return name, int(painted.sum()), painted.sum() / ((bx1 - bx0 + 1) * (by1 - by0 + 1))


@pytest.mark.parametrize("size", [32, 224])
def test_captions_and_answers_match_pixels(size):
    task = ShapesTask(size, seed=1)
    for i in range(40 if size == 32 else 8):
        sample = task.sample(i)
        pixels = _pixels(sample)
        seen = {}
        for cell in range(9):
            x0, y0, x1, y1 = cell_box(cell, size)
            if not any(s.cell == cell for s in sample.shapes):
                assert np.all(pixels[y0:y1, x0:x1] == BACKGROUND)
        for s in sample.shapes:
            colour, area, fill = _shape_at(pixels, s, size)
            # Box fill tells the type: square 1.0, circle ~0.78, triangle ~0.5 (0.56-0.63 at 32 px).
            kind = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
            seen[kind] = (colour, s.position, area)
            assert f"{colour} {kind} at {s.position}" in sample.caption
            side = shape_box(s, size)[2] - shape_box(s, size)[0] + 1
            assert (s.size == "large") == (side > size // 6)
        assert set(seen) == {s.kind for s in sample.shapes}
        assert sample.caption.count(" at ") == len(sample.shapes)
        for question, answer, kind in sample.qa:
            if kind == "color":
                assert seen[question.split()[-1].rstrip("?")][0] == answer
            elif kind == "position":
                assert seen[question.split()[-1].rstrip("?")][1] == answer
            elif kind == "count":
                assert answer == NUMBER_WORDS[len(seen)]
            else:
                a, b = question.removeprefix("Which is larger, the ").rstrip("?").split(" or the ")
                assert answer == (a if seen[a][2] > seen[b][2] else b)


def test_writer_outputs_llava_json(tmp_path):
    out = write_llava_dataset(tmp_path / "cap", 5, "caption", image_size=32, seed=2)
    records = json.loads(out.read_text())
    assert len(records) == 5 and out.parent.joinpath("images").is_dir()
    first = records[0]
    assert first["conversations"][0]["value"] == "<image>\nDescribe the image."
    assert first["conversations"][1]["value"] == ShapesTask(32, seed=2).sample(0).caption
    qa = json.loads(write_llava_dataset(tmp_path / "qa", 5, "qa", seed=2, split="heldout").read_text())
    assert len(qa) == sum(len(ShapesTask(32, seed=2, split="heldout").sample(i).qa) for i in range(5))
    assert {r["kind"] for r in qa} <= set(QUESTION_KINDS)
    assert json.loads((tmp_path / "qa" / "meta.json").read_text())["split"] == "heldout"
    # No temp folders left beside the output; existing output is not clobbered unless asked.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap", "qa"]
    with pytest.raises(ConfigError, match="already exists"):
        write_llava_dataset(tmp_path / "cap", 2)
    write_llava_dataset(tmp_path / "cap", 2, overwrite=True)
    assert len(json.loads(out.read_text())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap", "qa"]

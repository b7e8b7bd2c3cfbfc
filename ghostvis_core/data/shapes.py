"""The built-in image task: coloured shapes on a 3x3 grid, drawn by code with Pillow (no download).

A scene is 1-3 shapes of distinct types (circle, square, triangle), each with a colour (red, green, blue,
yellow), a size (small, large) and its own grid cell ("top left" ... "center" ... "bottom right"). From a
scene come a caption ("a large red circle at top left and a small blue square at bottom right") and one
question per kind:

    kind      question                                     answers                 chance
    color     "What colour is the circle?"                 red/green/blue/yellow   1/4
    position  "Where is the circle?"                       9 cell names            1/9
    count     "How many shapes are there?"                 one/two/three           1/3
    larger    "Which is larger, the circle or the square?" the two named shapes    1/2

Why a text-only model stays near chance: the question never carries its answer. Colour, cell and size are
drawn independently of the shape type, the shape a question names is drawn uniformly from the scene, the
number of shapes is uniform over 1..3, and the two shapes of a "larger" question are named in random order;
so for every question string the answers are (close to) uniform in training. `text_only_accuracy` scores the
best question-only predictor (the training majority answer per question string). Held-out scenes are a fixed
subset, so their answers are a little less uniform per question (single-shape scenes are few); a text-only
model fit on training data scores at or slightly below chance there (seed 0, 3000 images: color 0.23,
position 0.09, count 0.33, larger 0.49).
Each question is its own record when written (`write_llava_dataset`): several questions in one conversation
would leak (a "larger" question tells a count question that there are at least two shapes).

Why a tiny VLM learns it quickly: 3 shape types, 4 saturated colours, no anti-aliasing, no jitter, and large
shapes fill most of a cell, so at 32 px every shape is a solid block of 25-81 pixels in a fixed place.

Splits: the scene itself decides its split (a hash of its canonical description, ~1 in 8 scenes held out),
whatever the seed, so no held-out scene (hence no held-out image, at any size) is ever a training scene.
Samples are deterministic from (split, seed, index) and independent of each other, so any index can be drawn
alone, in any order, in any worker.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

from ghostvis_core.atomic import atomic_dir
from ghostvis_core.errors import ConfigError

# Bump when drawing or wording changes: materialised datasets record it, so stale caches can be detected.
SHAPES_VERSION = 1

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 210, 40),
}
BACKGROUND = (0, 0, 0)
# Row-major: cell index = 3 * row + column.
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
SIZES = ("small", "large")
# Side of a shape's box as a fraction of a cell's width: large fills most of its cell, small about half.
SIZE_FRACTION = {"small": 0.45, "large": 0.85}
NUMBER_WORDS = ("zero", "one", "two", "three")
MAX_SHAPES = len(SHAPES)  # shape types are distinct within a scene, so "the circle" always names one shape

QUESTION_KINDS = ("color", "position", "count", "larger")
QuestionKind = Literal["color", "position", "count", "larger"]
CAPTION_PROMPT = "Describe the image."

# A scene is held out when its hash falls in 1 of HELDOUT_BUCKETS buckets.
HELDOUT_BUCKETS = 8
MIN_IMAGE_SIZE = 24  # below this a small shape is under 4 pixels wide and the triangle stops being one

Split = Literal["train", "heldout"]


@dataclass(frozen=True, slots=True)
class Shape:
    """One shape of a scene."""

    kind: str
    """One of SHAPES."""
    colour: str
    """A key of COLOURS."""
    size: str
    """"small" or "large"."""
    cell: int
    """Grid cell 0..8, row-major (POSITIONS[cell] is its name)."""

    @property
    def position(self) -> str:
        """The cell's name, e.g. "top left"."""
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        """'a large red circle at top left'."""
        return f"a {self.size} {self.colour} {self.kind} at {self.position}"


@dataclass(frozen=True, slots=True)
class ShapesSample:
    """One drawn image with its caption and its questions (one per applicable kind)."""

    image: Image.Image
    """RGB image of image_size x image_size pixels."""
    caption: str
    """The shapes in reading order (top left first), e.g. 'a small red circle at center'."""
    qa: list[tuple[str, str, str]]
    """(question, answer, kind) for each kind in QUESTION_KINDS that applies to this scene."""
    shapes: tuple[Shape, ...]
    """The scene, sorted by cell (what the caption says, in the same order)."""


def chance_accuracy(kind: str) -> float:
    """Accuracy of guessing uniformly among the possible answers of one question kind."""
    num_answers = {"color": len(COLOURS), "position": len(POSITIONS), "count": MAX_SHAPES, "larger": 2}
    if kind not in num_answers:
        raise ConfigError(f"unknown question kind {kind!r}; use one of {', '.join(QUESTION_KINDS)}")
    return 1.0 / num_answers[kind]


def text_only_accuracy(
    train_pairs: Iterable[tuple[str, str]], eval_pairs: Iterable[tuple[str, str]] | None = None
) -> float:
    """Accuracy of the best question-only predictor fit on train_pairs (its majority answer per question).

    With eval_pairs None it is scored on train_pairs themselves: the most any text-only model can reach on
    that set (an upper bound that includes sampling noise). With eval_pairs it is the honest text-only
    baseline on held-out data; a question never seen in training counts as wrong.
    """
    by_question: dict[str, Counter] = {}
    train_pairs = list(train_pairs)
    for question, answer in train_pairs:
        by_question.setdefault(question, Counter())[answer] += 1
    scored = train_pairs if eval_pairs is None else list(eval_pairs)
    if not scored:
        raise ConfigError("text_only_accuracy needs at least one (question, answer) pair to score")
    majority = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    return sum(majority.get(q) == a for q, a in scored) / len(scored)


def scene_key(shapes: Iterable[Shape]) -> str:
    """Canonical description of a scene (order-free): what the split hash and equality are defined on."""
    return ";".join(f"{s.cell}:{s.kind}:{s.colour}:{s.size}" for s in sorted(shapes, key=lambda s: s.cell))


def scene_split(shapes: Iterable[Shape]) -> Split:
    """The split a scene belongs to, fixed by its content alone (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(scene_key(shapes).encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0 else "train"


def _random_scene(rng: random.Random, num_shapes: int) -> tuple[Shape, ...]:
    kinds = rng.sample(SHAPES, num_shapes)
    cells = rng.sample(range(len(POSITIONS)), num_shapes)
    shapes = [Shape(k, rng.choice(list(COLOURS)), rng.choice(SIZES), c)
              for k, c in zip(kinds, cells, strict=True)]
    return tuple(sorted(shapes, key=lambda s: s.cell))


def caption_of(shapes: tuple[Shape, ...]) -> str:
    """'a ... at top left', 'a ... and a ...', 'a ..., a ... and a ...'."""
    phrases = [s.phrase() for s in shapes]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _questions(rng: random.Random, shapes: tuple[Shape, ...]) -> list[tuple[str, str, str]]:
    target = rng.choice(shapes)
    qa = [(f"What colour is the {target.kind}?", target.colour, "color")]
    target = rng.choice(shapes)
    qa.append((f"Where is the {target.kind}?", target.position, "position"))
    qa.append(("How many shapes are there?", NUMBER_WORDS[len(shapes)], "count"))
    pairs = [(a, b) for a, b in itertools.combinations(shapes, 2) if a.size != b.size]
    if pairs:
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:  # mention order random, so "the first named" is right half the time
            a, b = b, a
        larger = a if a.size == "large" else b
        qa.append((f"Which is larger, the {a.kind} or the {b.kind}?", larger.kind, "larger"))
    return qa


def cell_box(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel bounds of a grid cell, end exclusive; cells tile the image exactly."""
    row, col = divmod(cell, 3)
    edges = [round(k * image_size / 3) for k in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def shape_box(shape: Shape, image_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive pixel box of a drawn shape, centred in its cell."""
    x0, y0, x1, y1 = cell_box(shape.cell, image_size)
    side = max(3, round(SIZE_FRACTION[shape.size] * (image_size // 3)))
    bx0 = (x0 + x1 - side) // 2
    by0 = (y0 + y1 - side) // 2
    return bx0, by0, bx0 + side - 1, by0 + side - 1


def draw_scene(shapes: Iterable[Shape], image_size: int) -> Image.Image:
    """The scene as an RGB image; flat colours, no anti-aliasing (every shape pixel is exactly its colour)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = shape_box(s, image_size)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


class ShapesTask:
    """Deterministic samples of one split: sample(i) depends only on (split, seed, i)."""

    def __init__(self, image_size: int = 32, seed: int = 0, split: Split = "train"):
        if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"image_size={image_size!r}: the shapes task needs an integer >= "
                              f"{MIN_IMAGE_SIZE} "
                              "(32 for the tiny CPU tower, 224 for siglip-base-224)")
        if split not in ("train", "heldout"):
            raise ConfigError(f"split={split!r}: use 'train' or 'heldout'")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed={seed!r} must be an integer")
        self.image_size, self.seed, self.split = image_size, seed, split

    def scene(self, index: int) -> tuple[Shape, ...]:
        """The shapes of sample `index` (no drawing)."""
        return self._scene_and_rng(index)[0]

    def _scene_and_rng(self, index: int) -> tuple[tuple[Shape, ...], random.Random]:
        if not isinstance(index, int) or index < 0:
            raise ConfigError(f"sample index {index!r} must be a non-negative integer")
        # A string seed goes through sha512 inside random.seed: stable across processes and PYTHONHASHSEED.
        rng = random.Random(f"ghostvis-shapes-v{SHAPES_VERSION}:{self.split}:{self.seed}:{index}")
        num_shapes = rng.randint(1, MAX_SHAPES)
        # Redraw until the scene belongs to this split, keeping num_shapes: the count stays uniform per split.
        while True:
            shapes = _random_scene(rng, num_shapes)
            if scene_split(shapes) == self.split:
                return shapes, rng

    def sample(self, index: int) -> ShapesSample:
        """Image, caption and questions of sample `index`."""
        shapes, rng = self._scene_and_rng(index)
        return ShapesSample(
            image=draw_scene(shapes, self.image_size),
            caption=caption_of(shapes),
            qa=_questions(rng, shapes),
            shapes=shapes,
        )

    def __repr__(self) -> str:
        return f"ShapesTask(image_size={self.image_size}, seed={self.seed}, split={self.split!r})"


def llava_record(record_id: str, image: str, prompt: str, answer: str, **extra: str) -> dict:
    """One LLaVA-style record: one image, one human turn ("<image>\\n" + prompt), one gpt turn."""
    return {
        "id": record_id,
        "image": image,
        **extra,
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
    }


def write_llava_dataset(
    out_dir: str | os.PathLike,
    n: int,
    kind: Literal["caption", "qa"] = "caption",
    *,
    image_size: int = 32,
    seed: int = 0,
    split: Split = "train",
    overwrite: bool = False,
) -> Path:
    """Draw samples 0..n-1 into OUT/images/*.png and OUT/data.json (LLaVA-style); returns OUT/data.json.

    kind="caption": one record per image ("Describe the image." -> caption). kind="qa": one record per
    question (each image's questions are separate records, see the module docstring), with a "kind" field
    naming the question kind for per-kind accuracy. OUT/meta.json records what was drawn. The folder is
    written under a temporary name beside OUT and renamed into place when complete.
    """
    if kind not in ("caption", "qa"):
        raise ConfigError(f"kind={kind!r}: use 'caption' or 'qa'")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r}: the number of images must be a positive integer")
    task = ShapesTask(image_size, seed, split)
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; delete it, choose another folder, or pass overwrite=True")
    with atomic_dir(out) as tmp:  # complete or absent: an old folder (overwrite=True) is replaced whole
        (tmp / "images").mkdir()
        records = []
        for i in range(n):
            sample = task.sample(i)
            rel = f"images/{split}-{i:06d}.png"
            sample.image.save(tmp / rel)
            if kind == "caption":
                records.append(llava_record(f"{split}-{i}", rel, CAPTION_PROMPT, sample.caption))
            else:
                records.extend(llava_record(f"{split}-{i}-{k}", rel, q, a, kind=k) for q, a, k in sample.qa)
        (tmp / "data.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        meta = {"task": "shapes", "version": SHAPES_VERSION, "kind": kind, "num_images": n,
                "num_records": len(records), "image_size": image_size, "seed": seed, "split": split}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out / "data.json"


def draw_example(out_path: str | os.PathLike, image_size: int = 32, shape: str = "circle", index: int = 0,
                 upscale: int = 8) -> ShapesSample:
    """Save the index-th held-out scene that contains `shape` as a PNG (a fresh image no training run saw) and
    return its sample; `upscale` > 1 also saves NAME-large.png, nearest-neighbour enlarged for people to look at.
    """
    if shape not in SHAPES:
        raise ConfigError(f"shape={shape!r}: use one of {', '.join(SHAPES)}")
    task = ShapesTask(image_size, 0, "heldout")
    found = (s for s in (task.sample(i) for i in itertools.count()) if any(x.kind == shape for x in s.shapes))
    sample = next(itertools.islice(found, index, None))
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(out)
    if upscale > 1:
        big = sample.image.resize((image_size * upscale,) * 2, Image.NEAREST)
        big.save(out.with_name(f"{out.stem}-large{out.suffix}"))
    return sample


def main(argv: list[str] | None = None) -> Path:
    """`python -c 'from ghostvis_core.data.shapes import main; main()' --run NAME [--size N] [--shape S]
    [--ask KIND]`: draw one held-out image into run NAME's folder (demo-image.png, and demo-image-large.png to
    look at), say what is in it (and with --ask, that kind's question and its right answer) on stderr, and print
    its path on stdout (the demo asks the trained VLM about it). stdout holds the path alone, so a shell takes it
    with $(...) while the rest shows; `tee /dev/stderr` would reopen, and so truncate, a log file stderr goes to.
    """
    import argparse
    import sys

    from ghostvis_core.paths import runs_dir

    parser = argparse.ArgumentParser(description="Draw one held-out shapes image next to a run.")
    parser.add_argument("--run", required=True, help="run name (the image goes into its folder)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (the tower's image size)")
    parser.add_argument("--shape", default="circle", help="a shape the image must contain")
    parser.add_argument("--index", type=int, default=0, help="which such held-out scene")
    parser.add_argument("--ask", choices=QUESTION_KINDS, help="print this kind's question and expected answer")
    args = parser.parse_args(argv)
    out = runs_dir() / args.run / "demo-image.png"
    sample = draw_example(out, args.size, args.shape, args.index)
    print(f"In the image: {sample.caption}", file=sys.stderr)
    if args.ask is not None:
        asked = [(q, a) for q, a, kind in sample.qa if kind == args.ask]
        if not asked:
            raise ConfigError(f"--ask {args.ask}: this scene has no such question ({sample.caption}); pick another "
                              "--index or --shape")
        print(f"Question: {asked[0][0]} (the right answer: {asked[0][1]})", file=sys.stderr)
    print(out)
    return out

"""`ghostvis eval`: a run's accuracy on short-answer image questions, next to chance and a text-only ceiling.

The default set is the built-in shapes task's held-out split (scenes no training image shows, see
data/shapes.py); any LLaVA-style file works too. A question is answered greedily with the image (the same
prompt form as training: the image, then "\\n" + question) and scored by exact match after `normalise_answer`.

The text-only column is the best any model that reads only the question can do: the majority answer per
question string, fit on the training split (on the evaluated file itself for a user file, which makes it an
upper bound). A text-only model of any size cannot beat it, so a VLM well above it is using the image.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ghostvis_core.errors import ConfigError, DataError

ALL_KINDS = "all"
DEFAULT_NUM_QUESTIONS = 300
DEFAULT_HELDOUT_IMAGES = 200
# Training images whose questions fit the text-only ceiling for the built-in task.
BASELINE_TRAIN_IMAGES = 3000


def normalise_answer(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed, a leading article dropped ("The circle." ->
    "circle"), so the score counts what was said, not how it was punctuated."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


@dataclass(frozen=True)
class Question:
    """One scored item: the question text, its image, the expected answer and its kind."""

    question: str
    image: Path
    answer: str
    kind: str


@dataclass
class KindScore:
    """Accuracy on one question kind."""

    kind: str
    num: int = 0
    correct: int = 0
    chance: float | None = None
    """Accuracy of a uniform guess among the kind's answers (built-in task only)."""
    text_only: float | None = None
    """The text-only ceiling (see the module docstring), when asked for."""

    @property
    def accuracy(self) -> float:
        """Share answered exactly right."""
        return self.correct / self.num if self.num else 0.0


@dataclass
class EvalReport:
    """What `ghostvis eval` prints: per-kind and overall scores, and a few examples."""

    run: str
    data: str
    scores: list[KindScore]
    overall: KindScore
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready report."""
        def row(s: KindScore) -> dict:
            return {"kind": s.kind, "num": s.num, "correct": s.correct, "accuracy": s.accuracy,
                    "chance": s.chance, "text_only": s.text_only}
        return {"run": self.run, "data": self.data, "overall": row(self.overall),
                "kinds": [row(s) for s in self.scores], "examples": self.examples}


def read_questions(path: Path, image_root: str | None = None, limit: int | None = None) -> list[Question]:
    """The single-image, single-answer questions of a LLaVA-style file (json list or jsonl), in file order.

    Each record must be one user turn holding one image and the question, then one assistant answer; a record
    may carry "kind" (the built-in task's question kinds), else it counts under "all".
    """
    from ghostvis_core.data.images import ImagePart, TextPart, iter_image_chats

    out: list[Question] = []
    for chat in iter_image_chats(path, image_root):
        if limit is not None and len(out) >= limit:
            break
        roles = [m.role for m in chat.messages if m.role != "system"]
        if roles != ["user", "assistant"]:
            raise DataError(f"{chat.where}: an eval record is one user question and one assistant answer, "
                            f"got the turns {roles}")
        user, reply = [m for m in chat.messages if m.role != "system"]
        images = [p.path for p in user.parts if isinstance(p, ImagePart)]
        if len(images) != 1:
            raise DataError(f"{chat.where}: an eval question has exactly one image, this one has {len(images)}")
        question = "".join(p.text for p in user.parts if isinstance(p, TextPart)).strip()
        answer = "".join(p.text for p in reply.parts if isinstance(p, TextPart)).strip()
        out.append(Question(question, Path(images[0]), answer, chat.kind or ALL_KINDS))
    if not out:
        raise DataError(f"{path}: no questions to evaluate")
    return out


def builtin_heldout(image_size: int, num_images: int = DEFAULT_HELDOUT_IMAGES) -> Path:
    """data.json of the built-in task's held-out questions (drawn into the cache once)."""
    from ghostvis_core.data.image_dataset import materialise_builtin

    return materialise_builtin("shapes-qa", num_images, image_size, split="heldout")


def _builtin_text_only(image_size: int, questions: list[Question]) -> dict[str, float]:
    """Per-kind text-only ceiling on `questions`, fit on the built-in training split's questions."""
    from ghostvis_core.data.shapes import ShapesTask, text_only_accuracy

    task = ShapesTask(image_size, 0, "train")
    train: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for i in range(BASELINE_TRAIN_IMAGES):
        for q, a, kind in task.sample(i).qa:
            train[kind].append((q, a))
    out = {}
    for kind in {q.kind for q in questions}:
        pairs = [(q.question, q.answer) for q in questions if q.kind == kind]
        out[kind] = text_only_accuracy(train[kind], pairs)
    out[ALL_KINDS] = text_only_accuracy([p for ps in train.values() for p in ps],
                                        [(q.question, q.answer) for q in questions])
    return out


def _self_fit_text_only(questions: list[Question]) -> dict[str, float]:
    from ghostvis_core.data.shapes import text_only_accuracy

    out = {}
    for kind in {q.kind for q in questions} | {ALL_KINDS}:
        pairs = [(q.question, q.answer) for q in questions if kind in (ALL_KINDS, q.kind)]
        out[kind] = text_only_accuracy(pairs)
    return out


def score(
    questions: list[Question],
    answer: Callable[[Question], str],
    *,
    chance: Callable[[str], float | None] = lambda kind: None,
    text_only: dict[str, float] | None = None,
    run: str = "",
    data: str = "",
    num_examples: int = 5,
) -> EvalReport:
    """Ask every question through `answer` and score exact matches per kind and overall."""
    by_kind: dict[str, KindScore] = {}
    overall = KindScore(ALL_KINDS)
    examples = []
    for q in questions:
        predicted = answer(q)
        ok = normalise_answer(predicted) == normalise_answer(q.answer)
        s = by_kind.setdefault(q.kind, KindScore(q.kind, chance=chance(q.kind)))
        for target in (s, overall):
            target.num += 1
            target.correct += ok
        if len(examples) < num_examples:
            examples.append({"question": q.question, "image": str(q.image), "answer": q.answer,
                             "predicted": predicted, "correct": ok})
    scores = sorted(by_kind.values(), key=lambda s: s.kind)
    kinds_chance = [(s.chance, s.num) for s in scores]
    if all(c is not None for c, _ in kinds_chance):
        overall.chance = sum(c * n for c, n in kinds_chance) / max(overall.num, 1)
    if text_only is not None:
        for s in [*scores, overall]:
            s.text_only = text_only.get(s.kind)
    return EvalReport(run, data, scores, overall, examples)


def evaluate_run(
    spec: str | None,
    *,
    data: str | None = None,
    image_root: str | None = None,
    limit: int | None = DEFAULT_NUM_QUESTIONS,
    baseline: bool = False,
    dtype: str = "auto",
    max_new_tokens: int = 8,
    num_examples: int = 5,
) -> EvalReport:
    """Load run `spec` (None: the default run) and score it on `data` (None: the built-in held-out questions);
    the report keeps `num_examples` sample answers."""
    from ghostvis_core.data.shapes import chance_accuracy
    from ghostvis_core.engine import generate_text, load_for_inference

    loaded = load_for_inference(spec, dtype=dtype)
    if loaded.data_format != "image-chat":
        raise ConfigError(f"ghostvis eval: run {loaded.checkpoint.parent} is a text model ({loaded.recipe}); "
                          "evaluate a vision run (vision_pretrain, or chat_sft started from one)")
    image_size = loaded.model.config.vision.image_size
    path = Path(data).expanduser() if data else builtin_heldout(image_size)
    if not path.exists():
        raise DataError(f"--data {path}: no such file")
    questions = read_questions(path, image_root, limit)
    builtin = data is None
    text_only = None
    if baseline:
        text_only = _builtin_text_only(image_size, questions) if builtin else _self_fit_text_only(questions)

    def answer(q: Question) -> str:
        return generate_text(loaded, q.question, max_new_tokens, image=q.image)

    chance = chance_accuracy if builtin else (lambda kind: None)
    where = "built-in shapes task, held-out split" if builtin else str(path)
    return score(questions, answer, chance=chance, text_only=text_only, run=str(loaded.checkpoint), data=where,
                 num_examples=num_examples)

"""Byte-level BPE tokenizer (HF `tokenizers`), the special tokens, and the one chat template.

Byte-level means every UTF-8 string maps to tokens and back exactly: the pre-tokenizer turns bytes into 256
printable stand-ins before BPE, and the decoder maps them back. Digits are split one per token first so
arithmetic stays regular for small models.

Special tokens are matched only where we put them: `encode(text)` treats "<|bos|>" typed by a user as plain
text (it becomes byte tokens), so chat content can never forge a turn boundary. `encode_chat` builds ids
piece by piece (specials by id, content as plain text) and gives the exact ids the template's string
tokenizes to, plus the loss mask. The saved folder (tokenizer.json, tokenizer_config.json,
chat_template.jinja) loads in transformers' `AutoTokenizer` and vLLM unchanged.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ghostvis_core.atomic import write_text_atomic
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.log import get_logger

BOS = "<|bos|>"
PAD = "<|pad|>"
SYSTEM_START, SYSTEM_END = "<|system_start|>", "<|system_end|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
IMAGE = "<image>"

# Order fixes the ids: the trainer puts special tokens first, so BOS is 0, PAD is 1, ..., <image> is 8.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, PAD, SYSTEM_START, SYSTEM_END, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, IMAGE,
)
ROLES = ("system", "user", "assistant")
_ROLE_MARKERS = {
    "system": (SYSTEM_START, SYSTEM_END),
    "user": (USER_START, USER_END),
    "assistant": (ASSISTANT_START, ASSISTANT_END),
}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
TEMPLATE_FILE = "chat_template.jinja"


def chat_template_source() -> str:
    """The text of the packaged chat template (ghostvis_core/templates/chat_template.jinja)."""
    return (importlib.resources.files("ghostvis_core") / "templates" / TEMPLATE_FILE).read_text("utf-8")


def _raise_template_error(message: str) -> None:
    raise DataError(f"chat template: {message}")


@functools.lru_cache(maxsize=1)
def _compiled_template():
    # Same environment settings transformers uses for chat templates, so rendering agrees byte for byte.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(chat_template_source())


def _content_parts(content: Any, where: str) -> list[tuple[str, str]]:
    """Normalize message content to [(kind, text)] with kind "text" or "image"; DataError if malformed."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise DataError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append(("image", IMAGE))
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append(("text", part["text"]))
        else:
            raise DataError(
                f"{where}: content part {j} must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}, "
                f"got {part!r}"
            )
    return parts


def validate_messages(messages: Any) -> None:
    """Raise DataError unless `messages` is a non-empty list of {"role", "content"} dicts with known roles."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"chat messages must be a non-empty list, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise DataError(f"message {i}: unknown role {message['role']!r} (use one of {', '.join(ROLES)})")
        _content_parts(message["content"], f"message {i}")


class Tokenizer:
    """Byte-level BPE with GhostVis special tokens and chat template; wraps a `tokenizers.Tokenizer`."""

    def __init__(self, hf_tokenizer: _HFTokenizer):
        self._tok = hf_tokenizer
        missing = [t for t in SPECIAL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer lacks special tokens {missing}: it is not a GhostVis tokenizer "
                            "(train one with `ghostvis tokenizer train`)")
        self._special_ids = {t: hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    # ---- training / persistence -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on an iterable of texts; deterministic for the same texts in the same order."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size={vocab_size!r} is too small: need at least {MIN_VOCAB_SIZE} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens); try --vocab-size 4096"
            )
        if min_frequency < 1:
            raise ConfigError(f"min_frequency={min_frequency} must be >= 1")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            # all 256 bytes up front, so text never seen in training still encodes
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(iter(texts), trainer=trainer)
        bos_id = tok.token_to_id(BOS)
        # Only for transformers/vLLM readers: `tokenizer(text)` there prepends BOS like our training documents.
        # Our own encode() passes add_special_tokens=False and never applies it.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS} $B:1", special_tokens=[(BOS, bos_id)]
        )
        out = cls(tok)
        if out.vocab_size < vocab_size:
            get_logger().info(
                "Tokenizer: corpus supports only %d tokens (asked for %d); using %d",
                out.vocab_size, vocab_size, out.vocab_size,
            )
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `directory` (atomic each)."""
        d = Path(directory)
        template = chat_template_source()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": ASSISTANT_END,
            "pad_token": PAD,
            "extra_special_tokens": {"image_token": IMAGE},
            "clean_up_tokenization_spaces": False,
            "chat_template": template,
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for t, i in self._special_ids.items()
            },
        }
        write_text_atomic(d / "tokenizer.json", self._tok.to_str(pretty=True))
        write_text_atomic(d / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(d / TEMPLATE_FILE, template)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer folder written by `save` (tokenizer.json is the one file read)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: no such file; point at a folder written by Tokenizer.save "
                            "or `ghostvis tokenizer train`")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception subclass for parse errors
            raise DataError(f"{path}: not a readable tokenizer.json ({e})") from e
        out = cls(tok)
        saved_template = Path(directory) / TEMPLATE_FILE
        if saved_template.is_file() and saved_template.read_text("utf-8") != chat_template_source():
            get_logger().warning("%s differs from this version's chat template; using the packaged one "
                                 "(encode_chat and render_chat must agree)", saved_template)
        return out

    # ---- properties -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included); ids are 0..vocab_size-1."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token string -> id, e.g. {"<|bos|>": 0, ...}."""
        return dict(self._special_ids)

    @property
    def bos_id(self) -> int:
        """Id of <|bos|>, which starts every document and every chat."""
        return self._special_ids[BOS]

    @property
    def eos_id(self) -> int:
        """Id of <|assistant_end|>: generation stops here."""
        return self._special_ids[ASSISTANT_END]

    @property
    def pad_id(self) -> int:
        """Id of <|pad|> (packing tails and batch padding; never a target)."""
        return self._special_ids[PAD]

    @property
    def image_id(self) -> int:
        """Id of <image>, the placeholder the VLM replaces with image features."""
        return self._special_ids[IMAGE]

    def token_id(self, token: str) -> int:
        """Id of one special token string, e.g. token_id("<|user_start|>")."""
        if token not in self._special_ids:
            raise KeyError(f"{token!r} is not a special token; known: {list(self._special_ids)}")
        return self._special_ids[token]

    @property
    def hf_tokenizer(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for export)."""
        return self._tok

    # ---- encode / decode --------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text` (no BOS added). Special-token strings stay plain text unless allow_special."""
        return self.encode_batch([text], allow_special=allow_special)[0]

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """Token ids of many texts at once (runs in parallel inside `tokenizers`)."""
        if not texts:
            return []
        # encode_special_tokens=True makes the added-vocabulary pass skip special-token matching; it is
        # toggled per call so the saved tokenizer.json keeps the HF default (specials recognized).
        self._tok.encode_special_tokens = not allow_special
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = False
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of token ids; special tokens appear as their strings unless skip_special."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (byte-level form for ordinary tokens)."""
        return self._tok.id_to_token(token_id)

    # ---- chat -------------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as one string through the packaged Jinja template (what exports ship)."""
        validate_messages(messages)
        return _compiled_template().render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=BOS
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a chat; mask is 1 exactly on assistant content tokens and <|assistant_end|>.

        The ids equal encode(render_chat(messages), allow_special=True) whenever the content holds no
        special-token strings; when it does, those are encoded as plain text here (never as specials).
        """
        validate_messages(messages)
        # Collect every text piece first so one encode_batch call tokenizes them all.
        plan: list[tuple[str, Any, int]] = []  # (what, payload, mask)
        plan.append(("id", self.bos_id, 0))
        for i, message in enumerate(messages):
            role = message["role"]
            start, end = _ROLE_MARKERS[role]
            mask = 1 if role == "assistant" else 0
            plan.append(("id", self._special_ids[start], 0))
            for kind, text in _content_parts(message["content"], f"message {i}"):
                if kind == "image":
                    if role == "assistant":
                        raise DataError(f"message {i}: an assistant message cannot contain an image part")
                    plan.append(("id", self.image_id, 0))
                elif text:
                    plan.append(("text", text, mask))
            plan.append(("id", self._special_ids[end], mask))
        if add_generation_prompt:
            plan.append(("id", self._special_ids[ASSISTANT_START], 0))
        pieces = iter(self.encode_batch([p for what, p, _ in plan if what == "text"]))
        ids: list[int] = []
        loss_mask: list[int] = []
        for what, payload, mask in plan:
            piece = [payload] if what == "id" else next(pieces)
            ids.extend(piece)
            loss_mask.extend([mask] * len(piece))
        return ids, loss_mask

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"

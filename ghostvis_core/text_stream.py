"""Incremental detokenisation for streaming: new text per token, stop strings, no half characters.

A byte-level BPE token can end inside a UTF-8 character, and a stop string can arrive split over tokens, so
the stream holds back a trailing U+FFFD and any tail that could still grow into a stop string; what it has
emitted is always a prefix of the final text.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Text of one reply as its tokens arrive; `push` returns the new text that is safe to show."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        """True once a stop string appeared: the reply ends before it."""
        self._final: str | None = None

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special=True)

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; return the text newly safe to show (sets `stopped` when a stop string appeared)."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        full = self._decode()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._final = full[:cut]
            return self._advance(self._final)
        safe = full.rstrip("\ufffd")
        for s in self.stop:  # hold back a tail that is the start of a stop string
            for n in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:n]):
                    safe = safe[:-n]
                    break
        return self._advance(safe)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # a later token re-segmented earlier bytes: show nothing new yet
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta

    def finish(self) -> str:
        """The rest of the text at the end of the reply."""
        return self._advance(self.text)

    @property
    def text(self) -> str:
        """The reply: everything before the first stop string."""
        return self._final if self._final is not None else self._decode()

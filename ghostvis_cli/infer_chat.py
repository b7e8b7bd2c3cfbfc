"""`ghostvis infer --chat`: an interactive, streaming conversation with a run.

Ctrl-C while an answer streams stops that answer (it is not kept in the history); Ctrl-C at the prompt, or a
second one in a row, leaves. History is kept as long as it fits the context: the oldest turns go first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

HELP = "/reset forgets the conversation, /image PATH adds an image (VLM runs), /exit leaves; Ctrl-C stops an answer"


def _fit_history(loaded, history: list[dict], prompt: str, room: int, turn_images: list, image) -> tuple:
    """The engine prompt with as many earlier turns as leave `room` tokens: (prompt, its length, turns dropped).

    turn_images[i]: the image of the i-th user turn kept in history (None for none); image: this turn's. A
    vision run's prompt is embeddings when any kept turn has an image (image_prompts.py)."""
    from ghostvis_core.image_prompts import chat_ids, image_prompt, user_turn

    vision = loaded.data_format == "image-chat"
    context = loaded.engine.context_len
    dropped = 0
    while True:
        kept = history[2 * dropped :]
        if vision:
            ids = chat_ids(loaded, [*kept, user_turn(prompt, image is not None)])
        else:
            ids = loaded.encode_prompt(prompt, kept if loaded.is_chat else None)
        if len(ids) + room <= context or 2 * dropped >= len(history):
            images = [p for p in [*turn_images[dropped:], image] if p is not None]  # none for text runs
            return image_prompt(loaded, ids, images), len(ids), dropped
        dropped += 1


def _image_command(loaded, text: str, err: Console) -> Path | None:
    """The image of `/image PATH` (it goes with the next message), or None after saying why not."""
    if loaded.data_format != "image-chat":
        err.print("/image needs a VLM run (an image-chat recipe); this run is a text model")
        return None
    arg = text[len("/image") :].strip()
    if not arg:
        err.print("/image needs a path: /image PATH")
        return None
    path = Path(arg).expanduser()
    if not path.is_file():
        err.print(f"/image {path}: no such image file")
        return None
    err.print(f"[dim](image {path} goes with your next message)[/]", highlight=False)
    return path


def chat_loop(loaded, sampling, max_tokens: int, console: Console, err: Console, warn_capped: bool = True) -> None:
    from ghostvis_core.errors import GhostVisError
    from ghostvis_core.image_prompts import user_turn

    engine = loaded.engine
    history: list[dict] = []
    turn_images: list[Path | None] = []  # the image of each user turn in history (None: none)
    image: Path | None = None  # from /image, for the next message
    context = engine.context_len
    err.print(f"[dim]{HELP}[/]", highlight=False)
    if not loaded.is_chat:
        err.print("[dim]a base run: each line is continued as plain text, without history[/]")
    interrupted = False
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            turn_images.clear()
            image = None
            err.print("[dim](conversation reset)[/]")
            continue
        if text.startswith("/image"):
            image = _image_command(loaded, text, err) or image
            continue
        try:
            request, n, dropped = _fit_history(loaded, history, text, min(max_tokens, 16), turn_images, image)
        except GhostVisError as exc:  # an image that no longer reads: say so, drop it, keep chatting
            err.print(str(exc), highlight=False, markup=False)
            image = None
            continue
        if dropped:
            history, turn_images = history[2 * dropped :], turn_images[dropped:]
            err.print(f"[dim](dropped the {dropped} oldest turn(s) to fit the {context}-token context)[/]")
        if n >= context:
            err.print(f"that message is {n} tokens; the context is {context}: shorten it")
            continue

        def show(_i: int, delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            done = engine.generate_many([request], sampling, max_tokens, batch_size=1, on_text=show,
                                        sync_every=1, cache_len=context, warn_capped=warn_capped)[0]  # fmt: skip
        except KeyboardInterrupt:
            print()
            if interrupted:
                return
            interrupted = True
            err.print("[dim](stopped; Ctrl-C again to leave)[/]")
            continue
        interrupted = False
        print()
        if loaded.is_chat:
            history += [user_turn(text, image is not None), {"role": "assistant", "content": done.text}]
            turn_images.append(image)
        image = None

"""`ghostvis infer --chat`: an interactive, streaming conversation with a run.

Ctrl-C while an answer streams stops that answer (it is not kept in the history); Ctrl-C at the prompt, or a
second one in a row, leaves. History is kept as long as it fits the context: the oldest turns go first.
"""

from __future__ import annotations

import sys

from rich.console import Console

HELP = "/reset forgets the conversation, /image PATH adds an image (VLM runs), /exit leaves; Ctrl-C stops an answer"


def _fit_history(loaded, history: list[dict], prompt: str, room: int) -> tuple[list[int], int]:
    """Prompt ids with as many earlier turns as leave `room` tokens; returns (ids, turns dropped)."""
    dropped = 0
    while True:
        ids = loaded.encode_prompt(prompt, history[2 * dropped :] if loaded.is_chat else None)
        if len(ids) + room <= loaded.model.config.sequence_len or 2 * dropped >= len(history):
            return ids, dropped
        dropped += 1


def chat_loop(loaded, sampling, max_tokens: int, console: Console, err: Console) -> None:
    engine = loaded.engine
    history: list[dict] = []
    context = loaded.model.config.sequence_len
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
            err.print("[dim](conversation reset)[/]")
            continue
        if text.startswith("/image"):
            err.print("/image needs a VLM run (an image-chat recipe); this run is a text model")
            continue
        ids, dropped = _fit_history(loaded, history, text, min(max_tokens, 16))
        if dropped:
            history = history[2 * dropped :]
            err.print(f"[dim](dropped the {dropped} oldest turn(s) to fit the {context}-token context)[/]")
        if len(ids) >= context:
            err.print(f"that message is {len(ids)} tokens; the context is {context}: shorten it")
            continue

        def show(_i: int, delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            done = engine.generate_many([ids], sampling, max_tokens, batch_size=1, on_text=show,
                                        sync_every=1, cache_len=context)[0]  # fmt: skip
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
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": done.text}]

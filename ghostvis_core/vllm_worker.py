"""The part of the vLLM backend that runs where vLLM is installed: probe it, build `vllm.LLM`, generate.

vLLM pins its own torch, so it usually lives in its own environment (`ghostvis install vllm`). The main
environment then runs this module in that environment's Python (`python -m ghostvis_core.vllm_worker`, GhostVis
being installed there too) and talks to it in JSON lines; in an environment that has vLLM itself,
vllm_backend.py calls `generate` below directly. Either way the same function turns a request into vLLM calls.

    --probe                    print one JSON object: vLLM's version and whether it imports, this GhostVis's
                               version and location (the caller checks it is the same GhostVis), Python
    --model DIR --engine-kwargs JSON
                               build vllm.LLM(model=DIR, **kwargs), answer {"ready": ...} (or {"error": ...}),
                               then one response line per request line read on stdin until EOF or "close"

Requests: {"op": "generate", "prompts": [[ids...] | {"messages": [...]}, ...], "sampling": [{...}, ...]}: token
ids go in as `TokensPrompt` (never a rendered string: the template and the tokenizer would both add BOS), chat
messages through `llm.chat()`. Responses: {"outputs": [{"token_ids", "text", "finish_reason", "stop_reason" (the
stop string that ended it, else null)}, ...]} or
{"error": "..."}. The protocol has its own file descriptor: whatever vLLM prints goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import ghostvis_core

PROTOCOL_VERSION = 1
# vLLM's defaults that suit this use: the engine core in this process (no spawned child, ~10 s faster to start
# and no __main__ guard needed in callers).
VLLM_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def probe() -> dict[str, Any]:
    """Facts about vLLM in this environment (importing it; seconds)."""
    facts: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "python": sys.executable,
        "ghostvis_version": ghostvis_core.__version__,
        "ghostvis_root": str(Path(ghostvis_core.__file__).resolve().parent.parent),
        "vllm_version": None,
        "usable": False,
        "error": None,
    }
    try:
        import vllm
    except Exception as err:  # any import failure is the fact to report (ImportError, OSError, RuntimeError)
        facts["error"] = f"{type(err).__name__}: {err}"
        return facts
    facts["vllm_version"] = getattr(vllm, "__version__", None)
    facts["usable"] = True
    return facts


def sampling_params(spec: dict[str, Any]):
    """vllm.SamplingParams from our JSON spec (only the keys given; top_k None = every token)."""
    from vllm import SamplingParams

    spec = dict(spec)
    if spec.get("top_k") is None:
        spec.pop("top_k", None)
    return SamplingParams(**spec)


def generate(llm, request: dict[str, Any]) -> dict[str, Any]:
    """Run one generate request on a vllm.LLM; outputs in prompt order."""
    from vllm import TokensPrompt

    prompts, specs = request["prompts"], request["sampling"]
    if len(prompts) != len(specs):
        raise ValueError(f"{len(prompts)} prompts but {len(specs)} sampling specs")
    params = [sampling_params(s) for s in specs]
    results: list[Any] = [None] * len(prompts)
    token_idx = [i for i, p in enumerate(prompts) if not isinstance(p, dict)]
    chat_idx = [i for i, p in enumerate(prompts) if isinstance(p, dict)]
    if token_idx:
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i])) for i in token_idx],
                            [params[i] for i in token_idx], use_tqdm=False)
        for i, out in zip(token_idx, outs, strict=True):
            results[i] = out
    if chat_idx:
        outs = llm.chat([prompts[i]["messages"] for i in chat_idx], [params[i] for i in chat_idx],
                        use_tqdm=False, add_generation_prompt=True)
        for i, out in zip(chat_idx, outs, strict=True):
            results[i] = out
    outputs = []
    for out in results:
        best = out.outputs[0]
        outputs.append({"prompt_token_ids": list(out.prompt_token_ids or []), "token_ids": list(best.token_ids),
                        "text": best.text, "finish_reason": best.finish_reason,
                        "stop_reason": best.stop_reason if isinstance(best.stop_reason, str) else None})
    return {"outputs": outputs}


def build_llm(model: str, engine_kwargs: dict[str, Any]):
    """vllm.LLM(model=..., **engine_kwargs) with this module's environment defaults."""
    for key, value in VLLM_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    return LLM(model=model, **engine_kwargs)


def _serve(model: str, engine_kwargs: dict[str, Any]) -> int:
    # The protocol keeps the real stdout; fd 1 becomes stderr so vLLM's prints never corrupt a response line.
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    try:
        llm = build_llm(model, engine_kwargs)
    except Exception as err:  # vLLM raises many kinds (ValueError, RuntimeError, its own): report, exit 1
        send({"error": f"vLLM could not load {model}: {type(err).__name__}: {err}"})
        return 1
    import vllm

    send({"ready": True, "vllm_version": getattr(vllm, "__version__", None)})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "close":
            break
        try:
            send(generate(llm, request))
        except Exception as err:  # a request vLLM refuses (too long, bad id) is an answer, not a crash
            send({"error": f"{type(err).__name__}: {err}"})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ghostvis_core.vllm_worker`."""
    parser = argparse.ArgumentParser(prog="python -m ghostvis_core.vllm_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="print vLLM's facts here as JSON and exit")
    parser.add_argument("--model", help="an HF model folder to serve")
    parser.add_argument("--engine-kwargs", default="{}", help="JSON object of vllm.LLM keyword arguments")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()), flush=True)
        return 0
    if not args.model:
        parser.error("--model DIR or --probe is required")
    return _serve(args.model, json.loads(args.engine_kwargs))


if __name__ == "__main__":
    sys.exit(main())

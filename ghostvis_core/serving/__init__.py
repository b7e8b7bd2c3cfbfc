"""`ghostvis serve`: an OpenAI-compatible HTTP API over the native engine's scheduler, and a web chat page.

app.py (routes, streaming, auth), service.py (prompts -> engine requests), schemas.py (request bodies),
limits.py (what a request may ask for; OpenAI-style errors), metrics.py (/metrics, the access log),
load.py (a bounded loopback load client), bench.py (the server under load beside `ghostvis bench`),
static/chat.html (the page). FastAPI and uvicorn come with the optional extra `serve`.
"""

from __future__ import annotations

import importlib.util

from ghostvis_core.errors import BackendUnavailableError

SERVE_EXTRA = "pip install 'ghostvis[serve]'"


def require_serve_extra() -> None:
    """BackendUnavailableError with the install command unless FastAPI and uvicorn are importable."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"ghostvis serve needs {' and '.join(missing)} (the optional extra "
                                      f"'serve'): {SERVE_EXTRA}")

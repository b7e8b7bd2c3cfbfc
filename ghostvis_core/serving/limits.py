"""What a served request may ask for, and the OpenAI-style error a request outside it gets.

Every limit has a default that keeps one laptop-sized server responsive and is a `ghostvis serve` flag. A
request outside a limit is refused before it reaches the engine, with a 4xx and a body shaped as OpenAI's
({"error": {"message", "type", "param", "code"}}), so client libraries raise their usual exceptions.

Images arrive as data URLs (base64) or, when the server was given an image root, as local paths inside it
(data/images.resolve_image_path: `../` and symlinks out of the root are refused). Remote URLs are never
fetched: a server that downloads whatever a prompt names is a request-forgery tool.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ghostvis_core.errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """Bounds on one request and on the server's load."""

    max_body_bytes: int = 16 * MIB
    """A request body larger than this is refused (413) before it is parsed."""
    max_image_bytes: int = 8 * MIB
    """Encoded size of one image (after base64 decoding)."""
    max_image_pixels: int = 4096 * 4096
    """width x height of one image, checked from its header before it is decoded."""
    max_images: int = 4
    """Images in one request."""
    max_prompt_tokens: int | None = None
    """Prompt tokens (images expanded); None: what the model's context leaves for one new token."""
    max_tokens: int = 2048
    """Largest max_tokens a request may ask for; a request without one gets what the context leaves, up to
    this."""
    max_concurrent: int = 512
    """Requests in flight (waiting or generating); one more gets 429 with Retry-After."""
    image_root: Path | None = None
    """Folder local image paths must stay inside; None: local paths are refused (data URLs only)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.max_images < 0:
            raise ConfigError(f"--max-images must be >= 0 (got {self.max_images})")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens must be >= 1 (got {self.max_prompt_tokens})")
        if self.image_root is not None and not self.image_root.is_dir():
            raise ConfigError(f"--image-root {self.image_root}: not a folder")


class ApiError(Exception):
    """A request the server refuses: HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def image_bytes(url: str, limits: ServeLimits, param: str) -> io.BytesIO | Path:
    """The bytes of a data URL, or the resolved path of a local image under the image root; ApiError if the
    URL is of another kind, malformed, too large, or a path outside the root."""
    from ghostvis_core.data.images import resolve_image_path

    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ApiError(400, "an image data URL must look like data:image/png;base64,<data>", param=param,
                           code="invalid_image")  # fmt: skip
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise _too_large_image(limits, param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data URL is not valid base64", param=param, code="invalid_image") from None
        if len(data) > limits.max_image_bytes:
            raise _too_large_image(limits, param)
        return io.BytesIO(data)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "remote image URLs are not fetched: send the image as a data URL "
                       "(data:image/png;base64,...)", param=param, code="invalid_image")  # fmt: skip
    if limits.image_root is None:
        raise ApiError(400, "local image paths are off on this server (start it with --image-root DIR to allow "
                       "paths inside DIR); send the image as a data URL", param=param, code="invalid_image")
    raw = url.removeprefix("file://")
    resolved = resolve_image_path(raw, Path(limits.image_root).resolve())
    if isinstance(resolved, str):
        code = "image_outside_root" if "outside the image root" in resolved else "invalid_image"
        raise ApiError(403 if code == "image_outside_root" else 400, resolved, param=param, code=code)
    if resolved.stat().st_size > limits.max_image_bytes:
        raise _too_large_image(limits, param)
    return resolved


def _too_large_image(limits: ServeLimits, param: str) -> ApiError:
    return ApiError(413, f"the image is larger than the server's limit of {limits.max_image_bytes} bytes "
                    "(--max-image-bytes)", param=param, code="image_too_large")  # fmt: skip


def image_pixels(url: str, limits: ServeLimits, param: str, image_size: int, mean, std) -> torch.Tensor:
    """(3, S, S) normalised pixels of an image_url (the tower's preprocessing, data/images.load_image);
    ApiError for anything the server refuses or cannot decode."""
    from ghostvis_core.data.images import load_image
    from ghostvis_core.errors import DataError

    source = image_bytes(url, limits, param)
    try:
        with Image.open(source) as im:  # reads the header only: the size is known before any decoding
            w, h = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"not a readable image ({type(e).__name__})", param=param, code="invalid_image") from None
    if w * h > limits.max_image_pixels:
        raise ApiError(413, f"the image is {w}x{h} = {w * h} pixels; the server's limit is {limits.max_image_pixels} "
                       "(--max-image-pixels)", param=param, code="image_too_large")  # fmt: skip
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        return load_image(source, image_size, mean, std)
    except DataError as e:
        raise ApiError(400, f"not a readable image: {str(e).split(': ', 1)[-1]}", param=param,
                       code="invalid_image") from None  # fmt: skip

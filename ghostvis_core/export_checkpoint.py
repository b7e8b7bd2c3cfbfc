"""Export a trained run's checkpoint (a step_NNNNNN folder) as a Hugging Face folder, once or into a cache.

`export_checkpoint(step_dir, out_dir)` reads the checkpoint through checkpoint.py (manifest verified, every
key and shape checked by export.py) and writes a `LlamaForCausalLM` (text runs) or a
`LlavaForConditionalGeneration` (VLM runs) folder atomically. With the HF files it writes `ghostvis.json`:
where the weights came from, the run's data format (chat runs are prompted through the chat template, text
runs continue BOS + text) and the content key, so a reader that knows GhostVis prompts the export exactly as
the native engine prompts the run. transformers and vLLM ignore the file.

`cached_export(step_dir)` is the export the vLLM backend serves: `RUN/hf_export/step_NNNNNN-<key>/`, where the
key hashes the checkpoint's manifest (size and sha256 of every file, already in state.json), the tokenizer and
this exporter's format, so a checkpoint rewritten in place (a resumed run re-reaching the step) is exported
again and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ghostvis_core.checkpoint import STEP_DIR_RE, TrainState, load_model_state, read_state
from ghostvis_core.errors import CheckpointError
from ghostvis_core.hf_import import WEIGHTS_FILE, WEIGHTS_INDEX

__all__ = ["EXPORT_INFO_FILE", "ExportInfo", "cached_export", "export_checkpoint", "export_key", "is_hf_folder"]

EXPORT_INFO_FILE = "ghostvis.json"
CACHE_DIR_NAME = "hf_export"
# Bump when export.py writes different files for the same checkpoint: every cached export is then redone.
EXPORT_FORMAT = 1


@dataclass(frozen=True)
class ExportInfo:
    """What ghostvis.json of an export says."""

    architecture: str
    """LlamaForCausalLM or LlavaForConditionalGeneration."""
    data_format: str
    """TrainState.data_format of the source: "text", "chat" or "image-chat"."""
    source: str
    """The step_NNNNNN folder it was exported from."""
    key: str
    """export_key of the source at export time."""

    @classmethod
    def read(cls, folder: Path) -> ExportInfo | None:
        """ghostvis.json of an export folder; None for an HF folder GhostVis did not write."""
        path = Path(folder) / EXPORT_INFO_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text("utf-8"))
            return cls(**{k: data[k] for k in ("architecture", "data_format", "source", "key")})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a GhostVis export record ({e}); export again with "
                                  "`ghostvis export`") from None


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json beside safetensors weights (model.safetensors or its index),
    no state.json. A GhostVis run folder has a config.json too (the run's), but its weights live in step_*
    folders; a checkpoint folder has a state.json."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file() and not (path / "state.json").is_file()
            and ((path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX).is_file()))  # fmt: skip


def _tokenizer_dir(step_dir: Path) -> Path:
    tok = step_dir.parent / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        raise CheckpointError(f"{step_dir.parent} has no tokenizer/tokenizer.json: it is not a complete GhostVis "
                              "run folder, so its checkpoint cannot be exported with a tokenizer")
    return tok


def export_key(step_dir: Path) -> str:
    """16 hex digits naming a checkpoint's content: its manifest (sha256 of every file), its tokenizer and
    the export format. Reads state.json and tokenizer.json only (the manifest already hashes the weights)."""
    step_dir = Path(step_dir)
    manifest = read_state(step_dir)["manifest"]
    h = hashlib.sha256(json.dumps({"format": EXPORT_FORMAT, "manifest": manifest}, sort_keys=True).encode())
    h.update((_tokenizer_dir(step_dir) / "tokenizer.json").read_bytes())
    return h.hexdigest()[:16]


def export_checkpoint(step_dir: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write checkpoint `step_dir` as an HF folder at `out_dir` (atomically; an existing one is replaced only
    with overwrite); returns out_dir."""
    from ghostvis_core.export import export_text, export_vlm
    from ghostvis_core.models import model_config_from_dict
    from ghostvis_core.tokenizer import Tokenizer

    step_dir = Path(step_dir)
    if not STEP_DIR_RE.match(step_dir.name):
        raise CheckpointError(f"{step_dir} is not a step_NNNNNN checkpoint folder")
    key = export_key(step_dir)
    state = TrainState.read(step_dir)  # verifies the manifest: a corrupted checkpoint is never exported
    config = model_config_from_dict(state.model_kind, state.require_model_config(state.model_kind, step_dir))
    tokenizer = Tokenizer.load(_tokenizer_dir(step_dir))
    weights = load_model_state(step_dir)
    vlm = state.model_kind == "vlm"
    arch = "LlavaForConditionalGeneration" if vlm else "LlamaForCausalLM"
    info = {"architecture": arch, "data_format": state.data_format, "source": str(step_dir.resolve()), "key": key}
    export = export_vlm if vlm else export_text
    return export(weights, config, tokenizer, out_dir, overwrite=overwrite, extra_files={EXPORT_INFO_FILE: info})


def cached_export(step_dir: Path) -> Path:
    """The HF export of checkpoint `step_dir` under RUN/hf_export/, written on first use and whenever the
    checkpoint's content changed (older exports of the same step are removed)."""
    step_dir = Path(step_dir).resolve()
    key = export_key(step_dir)
    cache = step_dir.parent / CACHE_DIR_NAME
    folder = cache / f"{step_dir.name}-{key}"
    info = ExportInfo.read(folder) if folder.is_dir() else None
    if info is None or info.key != key:
        export_checkpoint(step_dir, folder, overwrite=True)
    for stale in cache.glob(f"{step_dir.name}-*"):
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale)
    return folder

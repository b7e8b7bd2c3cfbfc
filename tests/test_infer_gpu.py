"""On CUDA, the inference paths that only CPU tests had covered: a VLM run answering about an image through the
batched engine (compiled step, CUDA graphs, the image as prompt embeddings) as its reference path does, and an
exported HF Llama folder loaded with --model answering as the run it came from."""

from __future__ import annotations

import pytest
import torch
from saved_runs import save_text_run, save_vlm_run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]  # fmt: skip


def test_vlm_answers_through_the_graphed_engine_as_its_reference_path(tmp_path):
    """fp32 (no bf16 near-ties on random weights): the engine (compiled, graphed) against VLM.generate
    recomputing the whole sequence each step, same weights, same image."""
    from ghostvis_core.data.shapes import ShapesTask
    from ghostvis_core.engine import generate_text, load_for_inference

    run = save_vlm_run("vlm")
    image = tmp_path / "scene.png"
    ShapesTask(32, 0, "heldout").sample(0).image.save(image)
    loaded = load_for_inference(str(run), "cuda", "float32", compile=True)
    assert loaded.plan.compiled and loaded.engine.cuda_graphs
    graphed = generate_text(loaded, "What colour is the circle?", 16, image=image)
    reference = generate_text(loaded, "What colour is the circle?", 16, image=image, use_cache=False)
    assert graphed == reference and graphed.strip()


def test_an_exported_folder_answers_as_its_run_on_cuda(tmp_path):
    from ghostvis_core import checkpoint as ckpt
    from ghostvis_core.engine import generate_text, load_for_inference
    from ghostvis_core.export_checkpoint import export_checkpoint

    run = save_text_run("chat", seed=3)
    folder = export_checkpoint(ckpt.latest_checkpoint(run), tmp_path / "hf")
    answers = [generate_text(load_for_inference(str(spec), "cuda", "float32", compile=True), "Name a colour.", 24)
               for spec in (run, folder)]  # fmt: skip
    assert answers[0] == answers[1] and answers[0].strip()

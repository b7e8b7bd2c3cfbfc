"""ImageBatchLoader: batch keys and shapes, pixels equal load_image of the rows' files in order, exact resume
with and without workers, decoding errors naming the record and file, and the VLM end to end on its batches
(finite loss; a packed batch's summed loss equals its documents' one by one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_batch
from PIL import Image
from plans import cpu_plan, device_plan

from ghostvis_core.config import GPTConfig
from ghostvis_core.data import ImageBatchLoader, PackedData, build_image_chat_dataset
from ghostvis_core.data.images import load_image
from ghostvis_core.data.loader import document_bounds
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.tokenizer import Tokenizer
from ghostvis_core.vision_config import VLMConfig, get_vision_config
from ghostvis_core.vlm import VLM

VISION = get_vision_config("tiny")
P = VISION.num_image_tokens
ROW_LEN = 64


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from ghostvis_core.data.shapes import ShapesTask

    task = ShapesTask(32, seed=0)
    texts = [t for i in range(40) for s in [task.sample(i)] for t in [s.caption, *sum(map(list, s.qa), [])]]
    return Tokenizer.train(texts, 400)


@pytest.fixture
def data(tok):
    return build_image_chat_dataset(None, tok, ROW_LEN, VISION, builtin="shapes-qa", builtin_count=10)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert_same_batch(x, y)


def test_batches_hold_the_rows_images_in_order(data, tok):
    loader = ImageBatchLoader(data, 3, seed=1, vision=VISION, num_workers=0)
    order = np.random.default_rng(1).permutation(data.num_rows)[:6]  # PackedBatchLoader's rule
    for k in range(2):
        batch = next(loader)
        rows = order[3 * k:3 * k + 3]
        assert set(batch) == {"input_ids", "targets", "position_ids", "pixel_values", "num_images", "cu_seqlens",
                              "max_seqlen"}  # fmt: skip
        assert torch.equal(batch["input_ids"], torch.from_numpy(data.input_ids[rows]))
        assert batch["input_ids"].shape == (3, ROW_LEN) and batch["input_ids"].dtype == torch.int64
        image_tokens = int((batch["input_ids"] == tok.image_id).sum())
        pixels = batch["pixel_values"]
        assert pixels.dtype == torch.float32 and pixels.shape[1:] == (3, 32, 32)
        assert pixels.shape[0] == image_tokens // P == int(batch["num_images"].sum()) > 0
        assert batch["num_images"].tolist() == [len(data.row_images(r)) for r in rows]
        files = [path for r in rows for path in data.row_images(r)]
        expected = torch.stack([load_image(f, 32, VISION.image_mean, VISION.image_std) for f in files])
        assert torch.equal(pixels, expected)
    assert loader.wait_seconds > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_the_same_batches_bitwise(data, num_workers):
    batch_size = 4
    assert data.num_rows > 2 * batch_size  # so the resume point is inside an epoch and later ones straddle
    straight = ImageBatchLoader(data, batch_size, seed=3, vision=VISION, num_workers=num_workers)
    take(straight, 2)
    state = straight.state_dict()
    after = take(straight, 4)
    resumed = ImageBatchLoader(data, batch_size, seed=0, vision=VISION, num_workers=num_workers)
    take(resumed, 1)  # decoded-ahead batches from another position must be dropped by load_state_dict
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert_same_batches(take(resumed, 4), after)
    assert resumed.state_dict() == straight.state_dict()


def test_worker_count_does_not_change_the_batches(data):
    in_process = take(ImageBatchLoader(data, 3, seed=2, vision=VISION, num_workers=0), 5)
    workers = take(ImageBatchLoader(data, 3, seed=2, vision=VISION, num_workers=2), 5)
    assert_same_batches(in_process, workers)


def test_rank_shards_concatenate_to_the_single_process_batch(data):
    whole = next(ImageBatchLoader(data, 4, seed=4, vision=VISION, num_workers=0))
    parts = [next(ImageBatchLoader(data, 2, rank=r, world_size=2, seed=4, vision=VISION, num_workers=0))
             for r in range(2)]
    for k in whole:
        if k in ("cu_seqlens", "max_seqlen"):  # each rank's documents, from its own rows
            for p in parts:
                assert_same_batch({k: p[k]}, {k: document_bounds(p["position_ids"])[k]})
        else:
            assert torch.equal(whole[k], torch.cat([p[k] for p in parts])), k


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_image_is_one_error_naming_record_and_path(tmp_path, tok, num_workers):
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{i}.png")
    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                       {"from": "gpt", "value": "red"}]} for i in range(2)]
    f = tmp_path / "data.json"
    f.write_text(json.dumps(records), encoding="utf-8")
    data = build_image_chat_dataset(f, tok, ROW_LEN, VISION)  # the header check passes here
    body = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(body[: len(body) // 2])  # the body is cut after the check
    loader = ImageBatchLoader(data, data.num_rows, vision=VISION, num_workers=num_workers)
    with pytest.raises(DataError) as e:
        next(loader)
    message = str(e.value)
    assert message.startswith(f"{f}:record 1: image {tmp_path.resolve() / '1.png'}: not a readable image")
    assert "\n" not in message and "Traceback" not in message


def test_loader_checks_its_inputs(data):
    with pytest.raises(ConfigError, match="ImageBatchLoader needs PackedImageData"):
        text_rows = PackedData(data.input_ids, data.targets, data.position_ids, data.seq_len, data.num_docs)
        ImageBatchLoader(text_rows, 2, vision=VISION)
    with pytest.raises(ConfigError, match="packed with 16 tokens per image but the tower gives 64"):
        ImageBatchLoader(data, 2, vision=get_vision_config("tiny", patch_size=4))


# ---------------------------------------------------------------------------------------------------------
# The VLM end to end


def tiny_vlm(tok: Tokenizer, device_type: str = "cpu") -> VLM:
    """A fp32 tiny VLM with seed-0 weights (the same on every device) and the plan of `device_type`."""
    text = GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=48, mlp_hidden=96, vocab_size=tok.vocab_size,
                     sequence_len=ROW_LEN, rope_theta=500.0)
    config = VLMConfig(text=text, vision=VISION, image_token_id=tok.image_id)
    plan = cpu_plan(config.text) if device_type == "cpu" else device_plan(config.text, device_type, "float32")
    torch.manual_seed(0)
    return VLM(config, plan).to(device_type).eval()


def document_spans(position_ids_T: torch.Tensor) -> list[tuple[int, int]]:
    starts = torch.nonzero(position_ids_T == 0).flatten().tolist()
    return list(zip(starts, starts[1:] + [len(position_ids_T)], strict=True))


def test_vlm_packed_batch_loss_equals_its_documents_one_by_one(data, tok):
    model = tiny_vlm(tok)
    batch = next(ImageBatchLoader(data, 4, seed=5, vision=VISION, num_workers=0))
    ids, targets, pos, pixels = (batch[k] for k in ("input_ids", "targets", "position_ids", "pixel_values"))
    with torch.no_grad():
        mean = model(ids, pixels, targets, pos)
        packed = model(ids, pixels, targets, pos, loss_reduction="sum")
        separate, used, num_docs = torch.zeros(()), 0, 0
        for b in range(ids.shape[0]):
            for s, e in document_spans(pos[b]):
                k = int((ids[b, s:e] == tok.image_id).sum()) // P
                separate += model(ids[b, s:e][None], pixels[used:used + k] if k else None,
                                  targets[b, s:e][None], pos[b, s:e][None], loss_reduction="sum")
                used, num_docs = used + k, num_docs + 1
    assert used == pixels.shape[0] and num_docs > ids.shape[0]  # rows do hold several documents
    print(f"mean loss {mean:.4f}; packed sum {packed:.6f} vs one by one {separate:.6f}: "
          f"diff {(packed - separate).abs():.2e}")
    assert torch.isfinite(mean) and 0 < mean.item() < 2 * np.log(tok.vocab_size)
    # fp32 sums of a few hundred per-token losses in a different order: rtol 1e-5.
    assert torch.allclose(packed, separate, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_are_pinned_and_feed_the_vlm(data, tok):
    loader = ImageBatchLoader(data, 4, seed=6, vision=VISION, num_workers=2)  # pin_memory defaults to on
    batch = next(loader)
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}  # max_seqlen is a host int
    assert loader.pin_memory and all(v.is_pinned() for v in tensors.values())
    on_gpu = {k: v.to("cuda", non_blocking=True) for k, v in tensors.items()}
    model = tiny_vlm(tok, "cuda")
    with torch.no_grad():
        loss = model(on_gpu["input_ids"], on_gpu["pixel_values"], on_gpu["targets"], on_gpu["position_ids"])
    assert torch.isfinite(loss)
    cpu_loss = tiny_vlm(tok)(batch["input_ids"], batch["pixel_values"], batch["targets"], batch["position_ids"])
    print(f"cuda loss {loss.item():.6f} vs cpu {cpu_loss.item():.6f}")
    assert abs(loss.item() - cpu_loss.item()) < 1e-3  # fp32 on both; TF32 may be on for matmuls on CUDA

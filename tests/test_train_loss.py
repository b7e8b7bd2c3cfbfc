"""Loss accounting: packing is invisible to the loss, SFT masks count exactly, normalisation is global."""

from __future__ import annotations

import torch
from plans import cpu_gpt

from ghostvis_core.config import GPTConfig
from ghostvis_core.data import IGNORE_INDEX, build_chat_dataset, embedded_chats, pack_documents
from ghostvis_core.gpt import GPT
from ghostvis_core.train.loop import forward_backward, forward_sum


def _model(vocab: int = 97) -> GPT:
    torch.manual_seed(0)
    model = cpu_gpt(GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, vocab_size=vocab, sequence_len=64))
    # give the zero-initialised output projections weights, so every layer actually mixes tokens
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(packed, rows) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(packed.input_ids[rows]),
        "targets": torch.from_numpy(packed.targets[rows]),
        "position_ids": torch.from_numpy(packed.position_ids[rows]),
    }


def test_packed_loss_equals_documents_run_one_by_one():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    bos = 0
    docs = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (5, 9, 3, 11)]
    packed = pack_documents(docs, None, seq_len=32, bos_id=bos)
    assert packed.num_rows == 1  # (5+1)+(9+1)+(3+1)+(11+1) = 32 tokens fit one row of 33
    with torch.no_grad():
        packed_sum = forward_sum(model, _batch(packed, [0])).item()
        separate = []
        for doc in docs:
            ids = torch.tensor([[bos] + doc])  # the packer prepends BOS; the last token predicts nothing
            separate.append(model(ids[:, :-1], ids[:, 1:], loss_reduction="sum").item())
    diff = abs(packed_sum - sum(separate))
    print(f"packed sum loss {packed_sum:.6f} vs per-document sum {sum(separate):.6f} (diff {diff:.2e})")
    assert packed.num_target_tokens == sum(len(d) for d in docs)
    assert diff <= 1e-4 * abs(packed_sum)


def test_sft_loss_counts_only_assistant_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path))
    from ghostvis_core.data import default_tokenizer

    tok = default_tokenizer(512)
    chats = embedded_chats(24, seed=0)
    masks = [tok.encode_chat(c)[1] for c in chats]
    packed = build_chat_dataset(None, tok, 256, max_docs=24)
    # the embedded chats are deterministic, so max_docs=24 packs exactly `chats`
    assert packed.num_docs == 24 and packed.num_split_docs == 0
    num_assistant = sum(sum(m) for m in masks)
    model = _model(tok.vocab_size)
    batch = _batch(packed, list(range(packed.num_rows)))
    loss_sum, count = forward_backward(model, [batch])
    assert int(count) == num_assistant == int((batch["targets"] != IGNORE_INDEX).sum())
    # same number by hand: cross-entropy of the logits at exactly the assistant-target positions
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
        keep = batch["targets"] != IGNORE_INDEX
        ref = torch.nn.functional.cross_entropy(logits[keep], batch["targets"][keep], reduction="sum")
    print(f"masked sum loss {loss_sum.item():.5f} vs reference {ref.item():.5f}")
    assert torch.allclose(loss_sum, ref, rtol=1e-5)


def test_fully_masked_batch_gives_zero_loss_and_finite_zero_grads():
    model = _model()
    ids = torch.randint(1, 97, (2, 16))
    masked = {"input_ids": ids, "targets": torch.full_like(ids, IGNORE_INDEX), "position_ids": torch.arange(16).repeat(2, 1)}
    loss_sum, count = forward_backward(model, [masked])
    assert loss_sum.item() == 0.0 and int(count) == 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_accumulation_normalises_by_the_global_token_count():
    """Two micro-batches (one partly masked, one fully masked) == one batch with a per-token mean."""
    torch.manual_seed(2)
    ids = torch.randint(1, 97, (3, 16))
    targets = torch.randint(1, 97, (3, 16))
    targets[1, :10] = IGNORE_INDEX
    pos = torch.arange(16).repeat(3, 1)
    full = {"input_ids": ids, "targets": targets, "position_ids": pos}
    masked_targets = torch.full((1, 16), IGNORE_INDEX)
    micro = [
        {"input_ids": ids[:2], "targets": targets[:2], "position_ids": pos[:2]},
        {"input_ids": ids[2:], "targets": masked_targets, "position_ids": pos[2:]},
        {"input_ids": ids[2:], "targets": targets[2:], "position_ids": pos[2:]},
    ]
    ref_model, acc_model = _model(), _model()
    ref_loss = ref_model(full["input_ids"], full["targets"], full["position_ids"], loss_reduction="mean")
    ref_loss.backward()
    loss_sum, count = forward_backward(acc_model, micro)
    assert int(count) == int((targets != IGNORE_INDEX).sum()) == 38
    assert torch.allclose(loss_sum / count, ref_loss.detach(), rtol=1e-5)
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(ref_model.parameters(), acc_model.parameters(), strict=True))
    print(f"max grad difference accumulated vs single batch: {worst:.2e}")
    assert worst < 1e-6

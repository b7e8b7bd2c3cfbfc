"""A freshly initialised model predicts near-uniformly: its first loss on random tokens is close to ln(V).

Regression guard for the tied-embedding init: with a tied head, a zero-initialised residual stream leaves the
final hidden state at norm(e_x) = e_x * sqrt(C) / |e_x|, so the input token's own logit is sqrt(C) * |e_x| =
C * std. An embedding std of 1/sqrt(C) made that logit sqrt(C) (every token predicted itself: loss 15.8 at
V=631); std 1/C keeps it near 1, so the loss on a random next token is about ln(V - 1 + e) ~ ln(V).
The untied head starts at N(0, 0.001): logits ~0, loss ~ln(V).
"""

from __future__ import annotations

import math

import pytest
import torch
from plans import cpu_plan

from ghostvis_core.config import GPTConfig
from ghostvis_core.gpt import GPT
from ghostvis_core.model_configs import get_config, get_preset

# |loss - ln V| bound. A uniform predictor scores exactly ln V; the residual gap comes from the init's small
# logit spread (std ~1/sqrt(C) tied, ~0.03 untied at C=64) plus the tied self-logit of ~1 (adds ~(e - 1)/V),
# each far below 0.5, while the broken init was more than 9 nats off.
TOL = 0.5


def _first_loss(config: GPTConfig, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = GPT(config, cpu_plan(config))
    model.init_weights()
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, config.vocab_size, (4, config.sequence_len + 1), generator=gen)
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:])
    return float(loss)


def _tiny(tied: bool, vocab_size: int) -> GPTConfig:
    return GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, vocab_size=vocab_size, sequence_len=64,
                     tie_embeddings=tied)


@pytest.mark.parametrize("vocab_size", [631, 4096])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_first_loss_is_near_ln_vocab(tied, vocab_size):
    loss = _first_loss(_tiny(tied, vocab_size))
    print(f"tied={tied} V={vocab_size}: first loss {loss:.4f}, ln V {math.log(vocab_size):.4f}")
    assert abs(loss - math.log(vocab_size)) < TOL


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(get_preset("tiny", vocab_size=631, sequence_len=64), id="tiny-preset-tied"),
        pytest.param(get_config(2, vocab_size=631, sequence_len=64), id="depth2-untied"),
    ],
)
def test_presets_first_loss_is_near_ln_vocab(config):
    loss = _first_loss(config)
    assert abs(loss - math.log(config.vocab_size)) < TOL


def test_tied_input_token_does_not_dominate():
    """The failure mode itself: a tied head must not give the current token a large logit."""
    config = _tiny(True, 631)
    torch.manual_seed(0)
    model = GPT(config, cpu_plan(config))
    model.init_weights()
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(tokens)
    own = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs_own = torch.softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1))
    # own logit ~ C * std = 1 with std 1/C (was sqrt(C) = 8 at std 1/sqrt(C)); its probability ~e/V, not ~1
    assert own.mean().item() < 2.0
    assert probs_own.max().item() < 10.0 / config.vocab_size

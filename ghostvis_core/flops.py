"""Training FLOPs of a forward and backward pass, counted along the forward in order, with the gradient flow of
what trains: the MFU that training reports is tokens/s x these over the card's peak (train/metrics.py).

A matmul with N weights costs per token (nanochat's 6N, split by what backward computes):

    2N forward  +  2N for its weight gradient, if the weight trains  +  2N for its input gradient, if anything
    upstream of it trains (autograd computes no gradient for an input that needs none)

So every matrix costs 6N when the whole model trains. A frozen layer between the trainable projector and the
trainable head of a VLM costs 4N, and a frozen tower reading pixels costs 2N. Attention's score and value
products (no weights) cost their forward F once, plus 2F in backward when their inputs need gradients. Norms,
biases, embeddings and elementwise work are left out: they are additions, not matmuls, except that a trainable
norm weight does make everything after it need gradients.
"""

from __future__ import annotations

import torch.nn as nn


class FlopCount:
    """FLOPs per token (or per image) accumulated along a forward; `grad` is whether the current activations
    need a gradient (something upstream trains)."""

    def __init__(self, input_needs_grad: bool = False):
        self.total = 0.0
        self.grad = input_needs_grad

    def trains(self, *modules: nn.Module) -> None:
        """Modules without matmul FLOPs (norms, embeddings) on the path: their trainable weights make everything
        after them need gradients."""
        self.grad |= any(p.requires_grad for m in modules for p in m.parameters())

    def matmuls(self, *modules: nn.Module, tokens: int = 1) -> None:
        """Matmuls reading the same input in parallel (q, k and v; gate and up), each applied to `tokens` rows;
        a module's matmul weights are its `weight` (a Linear's, or a patch Conv2d's)."""
        for m in modules:
            n = m.weight.numel()
            self.total += tokens * n * (2 + 2 * m.weight.requires_grad + 2 * self.grad)
        self.trains(*modules)

    def attention(self, forward_flops: float) -> None:
        """The score and value products of one layer (forward_flops per token)."""
        self.total += forward_flops * (3 if self.grad else 1)


def gpt_flops_per_token(gpt, seq_len: int, input_needs_grad: bool | None = None) -> float:
    """GPT: attention's 4 * H * D * T forward per token and layer at full causal length T (nanochat's 12 L H D T
    in all); input_needs_grad: whether the input embeddings need a gradient (None: the token embedding trains;
    a VLM passes whether its tower or projector trains as well)."""
    c = gpt.config
    decoder = gpt.model
    count = FlopCount(decoder.embed_tokens.weight.requires_grad if input_needs_grad is None else input_needs_grad)
    for block in decoder.layers:
        attn, mlp = block.self_attn, block.mlp
        count.trains(block.input_layernorm)
        count.matmuls(attn.q_proj, attn.k_proj, attn.v_proj)
        count.attention(4.0 * c.n_head * c.head_dim * seq_len)
        count.matmuls(attn.o_proj)
        count.trains(block.post_attention_layernorm)
        count.matmuls(mlp.gate_proj, mlp.up_proj)
        count.matmuls(mlp.down_proj)
    count.trains(decoder.norm)
    count.matmuls(gpt.lm_head)
    return count.total


def tower_flops_per_image(tower, projector_linears: tuple[nn.Module, ...] = ()) -> float:
    """Vision tower (pixels need no gradient) then the projector, per image of P patch tokens: the patch conv
    is a (P, C*p*p) x (C*p*p, W) matmul, attention 4 * P * W forward per token and layer."""
    P = tower.config.num_image_tokens
    count = FlopCount(input_needs_grad=False)
    count.matmuls(tower.embeddings.patch_embedding, tokens=P)
    count.trains(tower.embeddings.position_embedding)
    for layer in tower.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        count.trains(layer.layer_norm1)
        count.matmuls(attn.q_proj, attn.k_proj, attn.v_proj, tokens=P)
        count.attention(P * 4.0 * P * tower.config.hidden_size)
        count.matmuls(attn.out_proj, tokens=P)
        count.trains(layer.layer_norm2)
        count.matmuls(mlp.fc1, tokens=P)
        count.matmuls(mlp.fc2, tokens=P)
    # post_layernorm is on no gradient path (the projector reads the last encoder layer before it, freeze.py)
    for linear in projector_linears:
        count.matmuls(linear, tokens=P)
    return count.total


def needs_grad_after_tower(vlm) -> bool:
    """Whether the language model's input embeddings need a gradient in a VLM: its token embedding, the
    projector or anything in the tower before the projector's input trains."""
    parts = (vlm.language_model.model.embed_tokens, vlm.multi_modal_projector, vlm.vision_tower.embeddings,
             vlm.vision_tower.encoder)  # fmt: skip
    return any(p.requires_grad for m in parts for p in m.parameters())

"""VisionTower: a SigLIP-compatible ViT (conv patches, learned positions, no CLS token, pre-LN encoder).

Module names are exactly those of transformers' `SiglipVisionModel` (flat in transformers 5:
`embeddings.patch_embedding`, `embeddings.position_embedding`, `encoder.layers.N.{layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`, `post_layernorm`), so our state dict loads into
HF's unchanged, and one prefix places it elsewhere: `model.vision_tower.` inside an in-memory LLaVA,
`vision_tower.vision_model.` in a LLaVA safetensors export that vLLM loads (ARCHITECTURE.md, Export).
SigLIP's attention-pooling `head.*` is not built: a LLaVA tower never uses it.

Math (SigLIP): x = conv_p(pixels) + pos; per layer x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))));
LayerNorm eps 1e-6, biases everywhere, attention non-causal with scale D**-0.5.

Shape legend: N images, C channels, S image side (pixels), P patches per image (= num_image_tokens),
W tower width, H heads, D head dim, F MLP width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ghostvis_core.attention import AttentionContext, attention
from ghostvis_core.backends import BackendPlan
from ghostvis_core.errors import ConfigError
from ghostvis_core.vision_config import VisionConfig

__all__ = ["VisionTower", "VisionConfig", "normalize_pixels"]


def normalize_pixels(pixels_NCSS: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    """(pixels in [0, 1] - mean) / std per channel: what SigLIP's image processor feeds the tower."""
    mean = torch.tensor(config.image_mean, dtype=pixels_NCSS.dtype, device=pixels_NCSS.device)
    std = torch.tensor(config.image_std, dtype=pixels_NCSS.dtype, device=pixels_NCSS.device)
    return (pixels_NCSS - mean[:, None, None]) / std[:, None, None]


class VisionEmbeddings(nn.Module):
    """Patchify with a stride-p conv, add one learned position vector per patch (SiglipVisionEmbeddings)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        W, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, W, kernel_size=p, stride=p, padding="valid")
        self.position_embedding = nn.Embedding(config.num_image_tokens, W)

    def forward(self, pixel_values_NCSS: torch.Tensor) -> torch.Tensor:
        # HF casts the pixels to the conv's dtype, so fp32 pixels meet a bf16 tower without autocast
        x = self.patch_embedding(pixel_values_NCSS.to(self.patch_embedding.weight.dtype))
        x_NPW = x.flatten(2).transpose(1, 2)  # (N, W, g, g) -> (N, g*g, W), patches in row-major order
        return x_NPW + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    """Non-causal multi-head attention with biased q/k/v/out projections (SiglipAttention)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        W = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(W, W)
        self.k_proj = nn.Linear(W, W)
        self.v_proj = nn.Linear(W, W)
        self.out_proj = nn.Linear(W, W)

    def forward(self, x_NPW: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        N, P, W = x_NPW.shape
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(x_NPW).view(N, P, H, D)
        k = self.k_proj(x_NPW).view(N, P, H, D)
        v = self.v_proj(x_NPW).view(N, P, H, D)
        return self.out_proj(attention(q, k, v, ctx).reshape(N, P, W))


class VisionMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))) (SiglipMLP with hidden_act="gelu_pytorch_tanh")."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then + mlp(LN2(.)) (SiglipEncoderLayer)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x_NPW: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x_NPW = x_NPW + self.self_attn(self.layer_norm1(x_NPW), ctx)
        return x_NPW + self.mlp(self.layer_norm2(x_NPW))


class VisionEncoder(nn.Module):
    """The stack of encoder layers (SiglipEncoder); exists so the keys read `encoder.layers.N`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_layers))


class VisionTower(nn.Module):
    """SigLIP-compatible ViT; forward gives per-patch features (N, P, W).

    The plan is an argument (the model never plans): its "noncausal" attention choice serves every layer.
    """

    def __init__(self, config: VisionConfig, plan: BackendPlan):
        super().__init__()
        self.config = config
        self.plan = plan
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """SigLIP's init: xavier-uniform attention/MLP matrices, zero biases, lecun-normal patch conv
        (truncated normal, std 1/sqrt(fan_in)), positions N(0, 1/W), LayerNorms at weight 1 and bias 0."""
        conv = self.embeddings.patch_embedding
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=1.0 / math.sqrt(fan_in))
        conv.bias.zero_()
        self.embeddings.position_embedding.weight.normal_(0.0, 1.0 / math.sqrt(self.config.hidden_size))
        for layer in self.encoder.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.out_proj, m.fc1, m.fc2):
                nn.init.xavier_uniform_(lin.weight)
                lin.bias.zero_()
            for norm in (layer.layer_norm1, layer.layer_norm2):
                norm.reset_parameters()
        self.post_layernorm.reset_parameters()

    def num_params(self) -> int:
        """Parameter count."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Training FLOPs per image (flops.tower_flops_per_image): when everything trains, 6 x the encoder's
        matmul weights x P + 12 * L * P^2 * W for attention, and 4 x the patch conv's weights x P (pixels need
        no gradient)."""
        from ghostvis_core.flops import tower_flops_per_image

        return tower_flops_per_image(self)

    def forward(self, pixel_values_NCSS: torch.Tensor, *, apply_post_norm: bool = False) -> torch.Tensor:
        """Features (N, P, W) of normalised pixels (N, C, S, S).

        By default the last encoder layer's output before post_layernorm (HF's `hidden_states[-1]`, vLLM's
        tower with require_post_norm=False): what LLaVA's projector consumes with vision_feature_layer=-1.
        apply_post_norm=True gives HF's `last_hidden_state`.
        """
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values_NCSS.dim() != 4 or tuple(pixel_values_NCSS.shape[1:]) != expected:
            raise ConfigError(
                f"vision tower expects pixel_values of shape (N, {c.num_channels}, {c.image_size}, "
                f"{c.image_size}), got {tuple(pixel_values_NCSS.shape)}; resize images to vision.image_size"
            )
        ctx = AttentionContext(case="noncausal", backend=self.plan.attention["noncausal"].backend)
        x_NPW = self.embeddings(pixel_values_NCSS)
        for layer in self.encoder.layers:
            x_NPW = layer(x_NPW, ctx)
        return self.post_layernorm(x_NPW) if apply_post_norm else x_NPW

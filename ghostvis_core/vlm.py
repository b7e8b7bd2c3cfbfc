"""VLM: a LLaVA-style vision-language model (SigLIP tower -> projector -> Llama-compatible GPT).

Module names follow transformers' `LlavaForConditionalGeneration`, so keys map by prefix alone:

    ours                               transformers 5 (in memory)         LLaVA export (vLLM loads it)
    vision_tower.*                     model.vision_tower.*               vision_tower.vision_model.*
    multi_modal_projector.linear_{1,2} model.multi_modal_projector.*      multi_modal_projector.*
    language_model.model.*             model.language_model.*             language_model.model.*
    language_model.lm_head.weight      lm_head.weight                     language_model.lm_head.weight

Images enter as placeholders: at data time each `<image>` becomes num_image_tokens consecutive
`image_token_id`s with consecutive positions (as HF's LlavaProcessor and vLLM do), and forward replaces those
embedding rows with the projected patch features, images in order of appearance (row-major over the batch).

Shape legend: B batch, T tokens per row, N images in the batch, P tokens per image, W tower width,
C text width (n_embd), S image side.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ghostvis_core.backends import BackendPlan
from ghostvis_core.config import GPTConfig
from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.errors import ConfigError
from ghostvis_core.gpt import GPT
from ghostvis_core.vision import VisionTower
from ghostvis_core.vision_config import VLMConfig

__all__ = ["VLM", "VLMConfig", "MultiModalProjector", "hf_llava_key", "mask_image_targets"]

# Our key prefix -> transformers' LlavaForConditionalGeneration prefix, per layout (the table at the top).
# First match wins, so the lm_head entry comes before the general language_model one.
_HF_LLAVA_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "memory": (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
    "export": (
        ("language_model.", "language_model."),
        ("vision_tower.", "vision_tower.vision_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
    ),
}


def hf_llava_key(key: str, layout: str = "memory") -> str:
    """Our VLM state-dict key as transformers' LLaVA names it: "memory" is a built model's state_dict (v5),
    "export" the safetensors layout both transformers and vLLM load (vision_tower.vision_model.*)."""
    for ours, theirs in _HF_LLAVA_PREFIXES[layout]:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"{key!r} is not a VLM parameter name")


class MultiModalProjector(nn.Module):
    """linear_2(gelu(linear_1(x))) with exact (erf) GELU and biases: LLaVA's multi_modal_projector with
    projector_hidden_act="gelu"; maps tower width W to text width C."""

    def __init__(self, vision_width: int, hidden: int, text_width: int):
        super().__init__()
        # nn.Linear's default init (uniform, bound 1/sqrt(fan_in)) keeps the output near unit scale, the
        # scale of the N(0, 1) token embeddings the features sit between.
        self.linear_1 = nn.Linear(vision_width, hidden)
        self.linear_2 = nn.Linear(hidden, text_width)

    def forward(self, x_NPW: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x_NPW)))


def mask_image_targets(targets_BT: torch.Tensor, input_ids_BT: torch.Tensor, image_token_id: int):
    """Targets with no loss on images: IGNORE_INDEX wherever the input is an image token or the target is.

    Targets here are already shifted (targets[t] is the token after input t), so two rules are needed:
    input_ids[t] == image: position t holds a patch feature, not text, and takes no loss (HF's labels = -100
    over the image); targets[t] == image: the token before an image would learn to emit the placeholder,
    which is data layout, not language.
    """
    image = (input_ids_BT == image_token_id) | (targets_BT == image_token_id)
    return targets_BT.masked_fill(image, IGNORE_INDEX)


def _build_language_model(config: GPTConfig, plan: BackendPlan) -> GPT:
    """The text decoder: the one place the VLM constructs a GPT."""
    return GPT(config, plan)


class VLM(nn.Module):
    """LLaVA-style VLM: image features replace the `<image>` token embeddings, then the GPT runs as usual."""

    def __init__(self, config: VLMConfig, plan: BackendPlan):
        super().__init__()
        self.config = config
        self.plan = plan
        self.vision_tower = VisionTower(config.vision, plan)
        self.multi_modal_projector = MultiModalProjector(
            config.vision.hidden_size, config.projector_hidden, config.text.n_embd
        )
        self.language_model = _build_language_model(config.text, plan)

    def num_params(self) -> int:
        """Parameter count (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def image_features(self, pixel_values_NCSS: torch.Tensor) -> torch.Tensor:
        """Projected features (N, P, C): the last encoder layer before post_layernorm, through the projector
        (LLaVA with vision_feature_layer=-1, vision_feature_select_strategy="full")."""
        return self.multi_modal_projector(self.vision_tower(pixel_values_NCSS))

    def _check_image_tokens(self, input_ids_BT: torch.Tensor, num_images: int) -> torch.Tensor:
        """The (B, T) image-token mask, after checking that it holds exactly num_images whole images."""
        P, tid = self.config.num_image_tokens, self.config.image_token_id
        mask_BT = input_ids_BT == tid
        # One host sync per batch: a wrong count would otherwise misplace every later image silently.
        per_row = mask_BT.sum(dim=1).tolist()
        if sum(per_row) != num_images * P:
            raise ConfigError(
                f"the batch holds {sum(per_row)} image tokens (id {tid}) but {num_images} image(s) were "
                f"given, which need {num_images * P}: every <image> must be expanded to {P} consecutive ids "
                "at data time, and pixel_values must hold one image per expanded <image>, in order of "
                "appearance"
            )
        bad = [b for b, n in enumerate(per_row) if n % P]
        if bad:
            raise ConfigError(
                f"row {bad[0]} holds {per_row[bad[0]]} image tokens, not a multiple of {P} (tokens per "
                "image): an image was cut, e.g. by packing or truncation; a row must hold whole images"
            )
        return mask_BT

    def embed(self, input_ids_BT: torch.Tensor, pixel_values_NCSS: torch.Tensor | None = None):
        """Input embeddings (B, T, C): token embeddings with image features at the image-token positions."""
        num_images = 0 if pixel_values_NCSS is None else pixel_values_NCSS.shape[0]
        mask_BT = self._check_image_tokens(input_ids_BT, num_images)
        x_BTC = self.language_model.model.embed_tokens(input_ids_BT)
        if num_images == 0:
            return x_BTC
        # Features cast to the embedding dtype (fp32 under autocast) so the residual stream keeps its dtype.
        feats_NPC = self.image_features(pixel_values_NCSS).to(x_BTC.dtype)
        # masked_scatter fills the True rows in row-major order: image i lands on the i-th run of P tokens.
        return x_BTC.masked_scatter(mask_BT[..., None], feats_NPC)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        doc_bounds: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """Loss (fp32 scalar) when targets are given, else logits (B, T, V) fp32.

        input_ids (B, T) with every `<image>` already expanded to P image ids; pixel_values (N, C, S, S)
        normalised (`vision.normalize_pixels`), one per expanded image in order of appearance across the batch
        (None when there are none). targets (B, T) are pre-shifted as for GPT; they are set to IGNORE_INDEX at
        image positions and where they name the image token (`mask_image_targets`), so no loss is ever taken
        on images whatever the data gives. position_ids as in GPT.forward (packed rows restart at 0).
        """
        inputs_embeds = self.embed(input_ids, pixel_values)
        if targets is not None:
            targets = mask_image_targets(targets, input_ids, self.config.image_token_id)
        return self.language_model(None, targets, position_ids, loss_reduction, inputs_embeds=inputs_embeds,
                                   doc_bounds=doc_bounds)  # fmt: skip

    # -- training facts ------------------------------------------------------------------------------------

    def compile_blocks(self, **compile_kwargs) -> VLM:
        """torch.compile the language model's blocks (GPT.compile_blocks); the tower runs eager."""
        self.language_model.compile_blocks(**compile_kwargs)
        return self

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """The language model's training FLOPs per token (the tower's are per image: flops_per_image); its
        layers need input gradients when the tower, projector or token embedding trains (flops.py)."""
        from ghostvis_core.flops import gpt_flops_per_token, needs_grad_after_tower

        lm = self.language_model
        return gpt_flops_per_token(lm, seq_len or lm.config.sequence_len, needs_grad_after_tower(self))

    def flops_per_image(self) -> float:
        """Training FLOPs of one image through the tower and the projector (flops.tower_flops_per_image)."""
        from ghostvis_core.flops import tower_flops_per_image

        proj = self.multi_modal_projector
        return tower_flops_per_image(self.vision_tower, (proj.linear_1, proj.linear_2))

    # -- generation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, max_new_tokens: int,
                 **kwargs) -> torch.Tensor:
        """GPT.generate on the language model, the prompt (with its expanded `<image>` ids) prefilled by
        embeddings: image features at the image positions, then KV-cache decode of text tokens."""
        return self.language_model.generate(input_ids, max_new_tokens,
                                            embed=lambda ids: self.embed(ids, pixel_values),
                                            banned_token=self.config.image_token_id, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, step_dir, plan: BackendPlan, state=None) -> VLM:
        """The VLM saved in checkpoint folder `step_dir` (model_kind "vlm", its whole VLMConfig in state.json),
        built with `plan` on the plan's device, every key and shape checked (GPT.from_checkpoint's rules)."""
        from ghostvis_core.checkpoint import build_from_checkpoint

        return build_from_checkpoint(cls, VLMConfig, "vlm", step_dir, plan, state)

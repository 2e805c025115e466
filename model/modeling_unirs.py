"""UniRS modeling: SigLIP vision tower, change-extraction module, `mlp_downsample` projector, LLaMA glue.

Data path for one sample (spec section 1), with the released 3B sizes (C = 1152, D = 2560):

    image  (1, 3, 384, 384) -> SigLIP hidden_states[-2] (1, 729, C) -> single -> (1, 196, D)
    pair   (2, 3, 384, 384) -> (2, 729, C) -> change(f1, f2) (1, 729, C) -> single -> (1, 196, D)
    video  (8, 3, 384, 384) -> (8, 729, C) -> single per frame -> (8, 196, D)

`single` is VILA-1.5's projector: DownSampleBlock (27x27 -> 14x14 with 4C channels), LayerNorm,
Linear, GELU, Linear. Each (196, D) block replaces one `<image>` placeholder in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import LlamaForCausalLM, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_unirs import InputType, UniRSConfig
from .modeling_change import ChangeExtractionModule
from .processing import ImageProcessor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "ChangeExtractionModule",
    "DownSampleBlock",
    "UniRSModel",
    "UniRSMultimodalProjector",
    "UniRSVisionTower",
    "VisualInput",
]


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------
class UniRSVisionTower(nn.Module):
    """`SiglipVisionModel` returning `hidden_states[select_layer]` with all tokens (`cls_patch`).

    Only the encoder layers needed for the selected hidden state are run: for the default −2 the
    last encoder layer, the post-LayerNorm and the pooling head would be computed and discarded
    by VILA, so they are skipped here. The result equals
    `SiglipVisionModel(..., output_hidden_states=True).hidden_states[select_layer]` exactly.
    """

    def __init__(self, config: UniRSConfig, vision_model: SiglipVisionModel | None = None):
        super().__init__()
        self.config = config
        self.vision_model = vision_model if vision_model is not None else SiglipVisionModel(config.vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N, 3, H, W) -> features: (N, H/14 * W/14, C), e.g. (N, 729, 1152)."""
        model = self.vision_model
        hidden = model.embeddings(pixel_values.to(dtype=model.embeddings.patch_embedding.weight.dtype))
        for layer in model.encoder.layers[: self.config.vision_layers_to_run]:
            hidden = layer(hidden, None)
        return hidden


# ---------------------------------------------------------------------------------------------
# Projector
# ---------------------------------------------------------------------------------------------
class DownSampleBlock(nn.Module):
    """VILA's 2x2 space-to-channel merge, reproduced operation for operation.

    (N, L = g*g, C) -> (N, ceil(g/2)^2, 4C). For g = 27 the grid is zero-padded at the bottom and
    at the right to 28x28. Output token t = j * 14 + i holds the 2x2 block at rows 2i, 2i+1 and
    columns 2j, 2j+1 (column-major over the output grid), with channels ordered
    [(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)]. The frozen VILA projector and LLM were trained
    on exactly this layout, so it must not be "tidied up".
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"DownSampleBlock needs a square token grid, got {x.shape[1]} tokens")
        x = x.reshape(x.shape[0], h, w, -1)
        x = self.flat_square(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def flat_square(x: torch.Tensor) -> torch.Tensor:
        # VILA names dim 1 "w" and dim 2 "h" although dim 1 indexes rows; the names are kept to
        # make the comparison with the original line by line easy.
        n, w, h, c = x.size()
        if w % 2 == 1:
            x = torch.cat([x, x.new_zeros((n, 1, h, c))], dim=1).contiguous()
            n, w, h, c = x.size()
        if h % 2 == 1:
            x = torch.cat([x, x.new_zeros((n, w, 1, c))], dim=2).contiguous()
            n, w, h, c = x.size()
        x = x.view(n, w, h // 2, c * 2)
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.view(n, h // 2, w // 2, c * 4)


class UniRSMultimodalProjector(nn.Module):
    """`mm_projector` with `layers.single` (VILA mlp_downsample) and optionally `layers.change`.

    State-dict keys equal the UniRS checkpoint keys (`layers.single.{1,2,4}.*`, `layers.change.*`);
    VILA keys `layers.{1,2,4}.*` are remapped in `checkpoint.py`.
    """

    def __init__(self, config: UniRSConfig):
        super().__init__()
        self.config = config
        c, d = config.mm_hidden_size, config.hidden_size
        layers: dict[str, nn.Module] = {
            "single": nn.Sequential(
                DownSampleBlock(), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d)
            )
        }
        if config.use_change_module:
            layers["change"] = ChangeExtractionModule(config)
        self.layers = nn.ModuleDict(layers)

    @property
    def single(self) -> nn.Sequential:
        return self.layers["single"]

    @property
    def change(self) -> ChangeExtractionModule:
        if "change" not in self.layers:
            raise RuntimeError("This model has no change module (use_change_module=False)")
        return self.layers["change"]

    def forward(self, features: torch.Tensor, input_types: Sequence[InputType | str]) -> list[torch.Tensor]:
        """Route concatenated vision features by explicit input type.

        features: (sum of frames, L, C), the frames of each input contiguous and in order
        (pairs as [before, after]). Returns one (n_blocks, 196, D) tensor per input: 1 block for
        an image, 1 for a pair (2 without the change module), `num_video_frames` for a video.
        """
        counts = [frames_per_input(self.config, t) for t in input_types]
        if sum(counts) != features.shape[0]:
            raise ValueError(f"Got {features.shape[0]} frames of features for inputs needing {sum(counts)}")
        chunks = torch.split(features, counts, dim=0)
        types = [InputType(t) for t in input_types]
        pair_idx = [i for i, t in enumerate(types) if t is InputType.PAIR and self.config.use_change_module]
        fused: dict[int, torch.Tensor] = {}
        if pair_idx:
            if self.layers["change"].training:
                # Training-mode BatchNorm statistics are per pair in the released code (batch 1).
                for i in pair_idx:
                    fused[i] = self.change(chunks[i][0:1], chunks[i][1:2])
            else:
                before = torch.stack([chunks[i][0] for i in pair_idx])
                after = torch.stack([chunks[i][1] for i in pair_idx])
                for i, out in zip(pair_idx, self.change(before, after), strict=True):
                    fused[i] = out.unsqueeze(0)
        # One projector call for everything keeps the LayerNorm/Linear math identical per block.
        to_project = [fused.get(i, chunk) for i, chunk in enumerate(chunks)]
        projected = self.single(torch.cat(to_project, dim=0))
        return list(torch.split(projected, [t.shape[0] for t in to_project], dim=0))


def frames_per_input(config: UniRSConfig, input_type: InputType | str) -> int:
    """Frames fed to the vision tower for one input: 1, 2 (before, after) or num_video_frames."""
    input_type = InputType(input_type)
    if input_type is InputType.IMAGE:
        return 1
    if input_type is InputType.PAIR:
        return 2
    return config.num_video_frames


@dataclass
class VisualInput:
    """Preprocessed pixels of one sample. pixel_values: (frames_per_input, 3, H, W)."""

    input_type: InputType
    pixel_values: torch.Tensor

    def __post_init__(self) -> None:
        self.input_type = InputType(self.input_type)


# ---------------------------------------------------------------------------------------------
# Full model
# ---------------------------------------------------------------------------------------------
class UniRSModel(nn.Module):
    """UniRS network: SigLIP + (change module) + mlp_downsample projector + LLaMA, and the LLM glue.

    `UniRSModel(config)` has random weights. This is the bottom of the model's import order
    (configuration -> modeling -> inference / checkpoint -> `model.unirs.UniRS`): the text API
    lives in `model.inference`, loading and saving in `model.checkpoint`, and the public class
    `model.UniRS` combines them.
    """

    def __init__(
        self,
        config: UniRSConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        vision_model: SiglipVisionModel | None = None,
        llm: LlamaForCausalLM | None = None,
        image_processor: ImageProcessor | None = None,
    ):
        super().__init__()
        self.config = config
        self.vision_tower = UniRSVisionTower(config, vision_model)
        self.mm_projector = UniRSMultimodalProjector(config)
        if llm is None:
            config.text_config._attn_implementation = "sdpa"
            llm = LlamaForCausalLM(config.text_config)
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor.from_config(config)
        # Prompt augmentation (pass 1) runs the base VLM's LLM on the same visual features.
        self.base_llm: LlamaForCausalLM | None = None
        # Only set when the base checkpoint's projector differs from ours.
        self.base_projector: UniRSMultimodalProjector | None = None
        self.name_or_path: str | None = None
        self._apply_freezing()

    # ------------------------------------------------------------------ housekeeping
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def _apply_freezing(self) -> None:
        cfg = self.config
        self.llm.requires_grad_(cfg.tune_language_model)
        self.vision_tower.requires_grad_(cfg.tune_vision_tower)
        self.mm_projector.requires_grad_(cfg.tune_mm_projector)
        if cfg.use_change_module:
            self.mm_projector.change.requires_grad_(cfg.train_change_module or cfg.tune_mm_projector)
        if self.base_llm is not None:
            self.base_llm.requires_grad_(False)

    def train(self, mode: bool = True) -> UniRSModel:
        """Frozen parts stay in eval mode (VILA's `freezed_module_patch`), so BN/dropout never change them."""
        super().train(mode)
        cfg = self.config
        if mode:
            if not cfg.tune_vision_tower:
                self.vision_tower.eval()
            if not cfg.tune_mm_projector:
                self.mm_projector.eval()
                if cfg.use_change_module and cfg.train_change_module:
                    self.mm_projector.change.train()
            if self.base_llm is not None:
                self.base_llm.eval()
        return self

    @property
    def prompt_augmentation_enabled(self) -> bool:
        return self.base_llm is not None

    # ------------------------------------------------------------------ vision
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> vision features (N, 729, C)."""
        return self.vision_tower(pixel_values.to(self.device))

    def encode_visual_inputs(
        self, inputs: Sequence[VisualInput], return_features: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encode a batch of visual inputs with one vision-tower call.

        Frames are concatenated in input order, so a batch of pairs is interleaved
        [before_0, after_0, before_1, after_1, ...] and the projector splits consecutive pairs.
        (The released eval script concatenates [all before; all after], which pairs the wrong
        images as soon as batch > 1.)

        Returns per input a (n_blocks, 196, D) tensor, and with `return_features` also the raw
        vision features (frames, 729, C) per input (reused by the prompt-augmentation pass).
        """
        counts = [frames_per_input(self.config, v.input_type) for v in inputs]
        for v, n in zip(inputs, counts, strict=True):
            if v.pixel_values.shape[0] != n:
                raise ValueError(f"{v.input_type.value} input needs {n} frames, got {v.pixel_values.shape[0]}")
        pixels = torch.cat([v.pixel_values for v in inputs], dim=0)
        features = self.encode_vision(pixels)
        blocks = self.mm_projector(features, [v.input_type for v in inputs])
        if return_features:
            return blocks, list(torch.split(features, counts, dim=0))
        return blocks

    # ------------------------------------------------------------------ LLM glue
    def embed_prompt(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        visual_blocks: torch.Tensor | Sequence[torch.Tensor] | None,
        embed_tokens: nn.Embedding | None = None,
    ) -> torch.Tensor:
        """Text embeddings with 196 visual rows spliced at each `image_token_index` (−200).

        input_ids: (T,) with k placeholders; visual_blocks: (k, 196, D). Returns (T - k + 196k, D).
        embed_tokens: token embedding table, default this model's LLM (the clue pass uses the base LLM's).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        marker = self.config.image_token_index
        positions = (ids == marker).nonzero().flatten().tolist()
        n_blocks = 0 if visual_blocks is None else len(visual_blocks)
        if len(positions) != n_blocks:
            raise ValueError(
                f"Prompt has {len(positions)} {self.config.image_token} placeholders, got {n_blocks} visual blocks"
            )
        embed = embed_tokens if embed_tokens is not None else self.llm.get_input_embeddings()
        # Placeholders are replaced below; clamp them to a valid id only to make the lookup legal.
        text = embed(ids.clamp(min=0).to(self.device))
        pieces, start = [], 0
        for k, pos in enumerate(positions):
            pieces.append(text[start:pos])
            pieces.append(visual_blocks[k].to(text.dtype))
            start = pos + 1
        pieces.append(text[start:])
        return torch.cat(pieces, dim=0)

    def prepare_inputs_for_llm(
        self,
        input_ids: torch.Tensor,
        visual_blocks: Sequence[torch.Tensor | None],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch version of `embed_prompt` for training (VILA `prepare_inputs_labels_for_multimodal`).

        input_ids, attention_mask, labels: (B, T) with −200 placeholders (padding removed by the
        mask). visual_blocks[b]: (k_b, 196, D). Visual rows get label −100; sequences are
        truncated to `model_max_length` and right-padded. Returns `inputs_embeds` (B, T', D),
        `attention_mask` (B, T'), `position_ids` (B, T') and `labels` (B, T') or None.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        marker = self.config.image_token_index
        embeds, new_labels = [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b]]
            emb = self.embed_prompt(ids, visual_blocks[b])
            if labels is not None:
                lab = labels[b][attention_mask[b]]
                n_rows = self.config.tokens_per_image
                parts, start = [], 0
                for pos in (ids == marker).nonzero().flatten().tolist():
                    parts.append(lab[start:pos])
                    parts.append(lab.new_full((n_rows,), IGNORE_INDEX))
                    start = pos + 1
                parts.append(lab[start:])
                new_labels.append(torch.cat(parts)[: self.config.model_max_length])
            embeds.append(emb[: self.config.model_max_length])
        max_len = max(e.shape[0] for e in embeds)
        dim = embeds[0].shape[1]
        batch = embeds[0].new_zeros((len(embeds), max_len, dim))
        mask = torch.zeros((len(embeds), max_len), dtype=torch.long, device=self.device)
        out_labels = torch.full((len(embeds), max_len), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for b, emb in enumerate(embeds):
            batch[b, : emb.shape[0]] = emb
            mask[b, : emb.shape[0]] = 1
            if labels is not None:
                out_labels[b, : emb.shape[0]] = new_labels[b].to(self.device)
        position_ids = torch.arange(max_len, device=self.device).unsqueeze(0).expand(len(embeds), -1)
        return {
            "inputs_embeds": batch,
            "attention_mask": mask,
            "position_ids": position_ids,
            "labels": out_labels if labels is not None else None,
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        visual_inputs: Sequence[VisualInput | None],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Training/scoring forward pass.

        input_ids: (B, T) with −200 placeholders; visual_inputs: one `VisualInput` (or None for
        text-only) per sample. labels: (B, T) with −100 on prompt positions (see
        `processing.build_supervised_example`); visual positions are masked here.
        Returns the LLM output with logits (B, T', vocab) and the next-token CE loss.
        """
        present = [v for v in visual_inputs if v is not None]
        encoded = iter(self.encode_visual_inputs(present) if present else [])
        blocks = [next(encoded) if v is not None else None for v in visual_inputs]
        prepared = self.prepare_inputs_for_llm(input_ids.to(self.device), blocks, attention_mask, labels)
        return self.llm(**prepared, **llm_kwargs)

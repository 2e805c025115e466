"""High-level inference API of `UniRS`: change captions, VQA, sequence classification, pair analysis.

All methods accept PIL images, numpy arrays (H, W, 3) or file paths, decode greedily by default
(`sampling=SamplingConfig(do_sample=True, ...)` samples with a fixed seed; the clue pass is always
greedy, so that clues are reproducible) and run under `torch.inference_mode()`. With base-model
weights loaded (`base_path=`), every call first generates a clue with the base VLM (prompt
augmentation, spec section 4); the vision features are computed once and shared by both passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .class_mapping import match_class
from .configuration_unirs import InputType
from .conversation import build_augmented_instruction, build_clue_prompt, build_prompt, clean_clue
from .generation import SamplingConfig, generate_from_embeddings
from .modeling_unirs import UniRSModel, VisualInput
from .processing import load_video_frames, tokenizer_image_token

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["EncodedVisual", "PairAnalysis", "SequenceClassification", "UniRSInferenceMixin"]


@dataclass
class PairAnalysis:
    """Result of `UniRS.analyse_pair`: the change caption and one answer per question, in order."""

    caption: str
    answers: list[str]
    questions: list[str] = field(default_factory=list)
    clue: str | None = None


@dataclass
class SequenceClassification:
    """Result of `UniRS.classify_sequence`. Unpacks as `(label, raw_text)`."""

    label: str
    raw_text: str
    score: float
    clue: str | None = None
    method: str | None = None  # how raw_text was mapped: "exact" | "substring" | "fuzzy"

    def __iter__(self):
        yield self.label
        yield self.raw_text


@dataclass
class EncodedVisual:
    """One visual input after the vision tower and projector.

    blocks: (n_blocks, 196, D), spliced at the prompt's placeholders.
    features: (frames, 729, C) vision-tower output, kept for the clue pass.
    """

    input_type: InputType
    blocks: torch.Tensor
    features: torch.Tensor


class UniRSInferenceMixin:
    """Text API of UniRS, mixed into `model.UniRS` on top of `UniRSModel` (whose attributes it uses).

    See `model/__init__.py` for the stable service API.
    """

    # ------------------------------------------------------------------ input handling
    def prepare_visual(self: UniRSModel, visual: Any, input_type: InputType | str) -> VisualInput:
        """Raw input -> `VisualInput` with preprocessed pixels.

        image: one image; pair: (before, after); video: frames (sampled to `num_video_frames`).
        """
        input_type = InputType(input_type)
        if input_type is InputType.IMAGE:
            images = [visual]
        elif input_type is InputType.PAIR:
            if not isinstance(visual, (tuple, list)) or len(visual) != 2:
                raise ValueError("A pair input must be a (before, after) tuple")
            images = list(visual)
        else:
            images = load_video_frames(visual, self.config.num_video_frames)
        pixels = self.image_processor(images).to(device=self.device, dtype=self.dtype)
        return VisualInput(input_type, pixels)

    def encode(self: UniRSModel, visuals: Sequence[VisualInput]) -> list[EncodedVisual]:
        """Run the vision tower once for all inputs (pairs interleaved before/after)."""
        blocks, features = self.encode_visual_inputs(visuals, return_features=True)
        return [EncodedVisual(v.input_type, b, f) for v, b, f in zip(visuals, blocks, features, strict=True)]

    def _tokenize(self: UniRSModel, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RuntimeError("This model has no tokenizer; load it with UniRS.from_pretrained")
        return tokenizer_image_token(prompt, self.tokenizer, self.config.image_token, self.config.image_token_index)

    def _decode(self: UniRSModel, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return text.removesuffix("</s>").strip()

    def _run(
        self: UniRSModel,
        llm: LlamaForCausalLM,
        requests: Sequence[tuple[str, torch.Tensor]],
        max_new_tokens: int | Sequence[int],
        share_prefix: bool = True,
        sampling: SamplingConfig | None = None,
    ) -> list[str]:
        """Generate for (prompt with placeholders, visual blocks) requests in one batch."""
        # The base LLM of the clue pass has its own token embeddings; the visual rows are shared.
        table = llm.get_input_embeddings()
        embeddings = [self.embed_prompt(self._tokenize(prompt), blocks, table) for prompt, blocks in requests]
        ids = generate_from_embeddings(
            llm,
            embeddings,
            max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id or 0,
            share_prefix=share_prefix,
            sampling=sampling,
        )
        return [self._decode(x) for x in ids]

    # ------------------------------------------------------------------ prompt augmentation
    def _use_clues(self: UniRSModel, use_clues: bool | None) -> bool:
        if use_clues and self.base_llm is None:
            raise RuntimeError("Prompt augmentation needs base-model weights: pass base_path to from_pretrained")
        return self.base_llm is not None if use_clues is None else use_clues

    def _base_blocks(self: UniRSModel, encoded: EncodedVisual, separate_frames: bool) -> torch.Tensor:
        """Visual blocks as the base VLM sees them: VILA's `single` projector per frame, no change module."""
        projector = self.base_projector or self.mm_projector
        if encoded.input_type is not InputType.PAIR and self.base_projector is None:
            return encoded.blocks  # identical projector: reuse, no recomputation
        types = [InputType.IMAGE] * encoded.features.shape[0] if separate_frames else [encoded.input_type]
        return torch.cat(projector(encoded.features, types), dim=0)

    def generate_clues(self: UniRSModel, encoded: Sequence[EncodedVisual]) -> list[str]:
        """Pass 1: the base VLM describes each input with the per-input-type clue prompt (greedy, capped)."""
        cfg = self.config
        requests: list[tuple[str, torch.Tensor]] = []
        owners: list[int] = []
        for k, enc in enumerate(encoded):
            if enc.input_type is InputType.PAIR and cfg.clue_pair_mode == "separate":
                blocks = self._base_blocks(enc, separate_frames=True)
                for frame in range(2):
                    requests.append((build_clue_prompt(InputType.IMAGE, 1, cfg), blocks[frame : frame + 1]))
                    owners.append(k)
            else:
                blocks = self._base_blocks(enc, separate_frames=enc.input_type is InputType.PAIR)
                requests.append((build_clue_prompt(enc.input_type, blocks.shape[0], cfg), blocks))
                owners.append(k)
        texts = self._run(self.base_llm, requests, cfg.clue_max_new_tokens)
        clues: list[list[str]] = [[] for _ in encoded]
        for k, text in zip(owners, texts, strict=True):
            clues[k].append(clean_clue(text, cfg))
        out = []
        for parts in clues:
            out.append(parts[0] if len(parts) == 1 else f"Before: {parts[0]} After: {parts[1]}")
        return out

    # ------------------------------------------------------------------ generic entry point
    def generate_answers(
        self: UniRSModel,
        encoded: Sequence[EncodedVisual],
        instructions: Sequence[tuple[int, str, int]],
        clues: Sequence[str | None] | None = None,
        share_prefix: bool = True,
        sampling: SamplingConfig | None = None,
    ) -> list[str]:
        """One batched UniRS generation for (visual index, instruction, max_new_tokens) triples."""
        requests, limits = [], []
        for index, instruction, limit in instructions:
            enc = encoded[index]
            clue = clues[index] if clues is not None else None
            text = build_augmented_instruction(instruction, clue, enc.input_type, self.config)
            requests.append((build_prompt(text, enc.blocks.shape[0], self.config), enc.blocks))
            limits.append(limit)
        return self._run(self.llm, requests, limits, share_prefix=share_prefix, sampling=sampling)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def caption_change(
        self: UniRSModel,
        before: Any,
        after: Any,
        *,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        use_clues: bool | None = None,
        sampling: SamplingConfig | None = None,
    ) -> str:
        """Describe the changes between two co-registered images (t1 = before, t2 = after)."""
        return self.caption_changes(
            [(before, after)], prompt=prompt, max_new_tokens=max_new_tokens, use_clues=use_clues, sampling=sampling
        )[0]

    @torch.inference_mode()
    def caption_changes(
        self: UniRSModel,
        pairs: Sequence[tuple[Any, Any]],
        *,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        use_clues: bool | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[str]:
        """Batched `caption_change`: one vision-tower call, pairs interleaved correctly, one generation."""
        if not pairs:
            return []
        visuals = [self.prepare_visual(tuple(p), InputType.PAIR) for p in pairs]
        encoded = self.encode(visuals)
        clues = self.generate_clues(encoded) if self._use_clues(use_clues) else None
        limit = max_new_tokens if max_new_tokens is not None else self.config.caption_max_new_tokens
        instruction = prompt or self.config.caption_prompt
        requests = [(k, instruction, limit) for k in range(len(pairs))]
        return self.generate_answers(encoded, requests, clues, sampling=sampling)

    @torch.inference_mode()
    def answer(
        self: UniRSModel,
        image_or_pair: Any,
        question: str,
        *,
        input_type: InputType | str | None = None,
        max_new_tokens: int | None = None,
        use_clues: bool | None = None,
        sampling: SamplingConfig | None = None,
    ) -> str:
        """Answer a question about one image, or a (before, after) pair given as a tuple.

        `input_type` ("image", "pair", "video") overrides the inference from the argument's
        structure; a list of frames needs `input_type="video"`.
        """
        if input_type is None:
            if isinstance(image_or_pair, (tuple, list)):
                if len(image_or_pair) != 2:
                    raise ValueError("Pass a (before, after) pair, or set input_type='video' for a frame sequence")
                input_type = InputType.PAIR
            else:
                input_type = InputType.IMAGE
        encoded = self.encode([self.prepare_visual(image_or_pair, input_type)])
        clues = self.generate_clues(encoded) if self._use_clues(use_clues) else None
        limit = max_new_tokens if max_new_tokens is not None else self.config.answer_max_new_tokens
        return self.generate_answers(encoded, [(0, question, limit)], clues, sampling=sampling)[0]

    @torch.inference_mode()
    def classify_sequence(
        self: UniRSModel,
        frames: Any,
        classes: Sequence[str],
        *,
        question: str | None = None,
        max_new_tokens: int | None = None,
        use_clues: bool | None = None,
        sampling: SamplingConfig | None = None,
    ) -> SequenceClassification:
        """Classify an image sequence (video) into one of `classes`.

        `num_video_frames` frames are sampled as VILA-1.5 does; the model answers in free text
        (default question: "What is the event in the video?") and the text is mapped to a class
        by `model.class_mapping.match_class` (the mapper the ERA scorer uses). Returns
        `SequenceClassification(label, raw_text, score, clue, method)`,
        which also unpacks as `(label, raw_text)`.
        """
        encoded = self.encode([self.prepare_visual(frames, InputType.VIDEO)])
        clues = self.generate_clues(encoded) if self._use_clues(use_clues) else None
        limit = max_new_tokens if max_new_tokens is not None else self.config.answer_max_new_tokens
        instruction = question or self.config.video_question
        raw = self.generate_answers(encoded, [(0, instruction, limit)], clues, sampling=sampling)[0]
        match = match_class(raw, classes)
        return SequenceClassification(match.label, raw, match.score, clues[0] if clues else None, match.method)

    @torch.inference_mode()
    def analyse_pair(
        self: UniRSModel,
        before: Any,
        after: Any,
        questions: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        caption_prompt: str | None = None,
        use_clues: bool | None = None,
        sampling: SamplingConfig | None = None,
    ) -> PairAnalysis:
        """Change caption plus an answer to every question about one pair, in one batched generation.

        The images are encoded once; the caption prompt and all questions share the visual
        prefix, which is prefilled once (KV reuse). Outputs equal `caption_change` and `answer`
        called one by one. `max_new_tokens` applies to every prompt; by default the caption uses
        `config.caption_max_new_tokens` and the answers `config.answer_max_new_tokens`.
        """
        questions = list(questions)
        encoded = self.encode([self.prepare_visual((before, after), InputType.PAIR)])
        clues = self.generate_clues(encoded) if self._use_clues(use_clues) else None
        cfg = self.config
        caption_limit = max_new_tokens if max_new_tokens is not None else cfg.caption_max_new_tokens
        answer_limit = max_new_tokens if max_new_tokens is not None else cfg.answer_max_new_tokens
        instructions = [(0, caption_prompt or cfg.caption_prompt, caption_limit)]
        instructions += [(0, q, answer_limit) for q in questions]
        texts = self.generate_answers(encoded, instructions, clues, sampling=sampling)
        return PairAnalysis(caption=texts[0], answers=texts[1:], questions=questions, clue=clues[0] if clues else None)

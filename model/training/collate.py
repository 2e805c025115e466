"""From a validated `Record` to model inputs: media loading, prompt (with clue), tokens, labels, batches.

Tokenisation and masking are the model library's (`processing.build_supervised_example`,
VILA `preprocess_v1`): labels are −100 on the system prompt and every user turn, the answers and
their `</s>` are supervised; the visual rows spliced in later (196 per `<image>`) are masked by
`UniRS.prepare_inputs_for_llm`. With a clue, the first instruction is augmented exactly as at
inference (`conversation.build_augmented_instruction`), so training and test prompts match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..configuration_unirs import InputType, UniRSConfig
from ..conversation import build_augmented_instruction
from ..processing import ImageProcessor, build_supervised_example, left_pad_frames, load_video_frames
from .data import VIDEO_SUFFIXES, Record, load_video_file_frames

__all__ = ["IGNORE_INDEX", "Collator", "SampleBuilder", "load_visual_frames"]

IGNORE_INDEX = -100


def load_visual_frames(record: Record, num_video_frames: int) -> list[Any]:
    """The images fed to the vision tower for one record: 1, 2 (before, after) or `num_video_frames`."""
    if record.input_type in ("image", "pair"):
        return list(record.media)
    if record.input_type != "video":
        return []
    if len(record.media) > 1:  # an explicit frame list
        return load_video_frames(list(record.media), num_video_frames)
    target = record.media[0]
    if target.is_dir():
        return load_video_frames(target, num_video_frames)
    if target.suffix.lower() in VIDEO_SUFFIXES:
        frames = [
            Image.fromarray(np.asarray(f)).convert("RGB") for f in load_video_file_frames(target, num_video_frames)
        ]
        if not frames:
            raise ValueError(f"{record.source}: no frames decoded from {target}")
        return left_pad_frames(frames, num_video_frames)
    raise ValueError(f"{record.source}: {target} is neither a frame folder nor a video file")


@dataclass
class SampleBuilder:
    """Callable `Record -> dict` used as the `MixtureDataset` transform (runs in DataLoader workers).

    Sequences longer than `max_length` LLM positions (text tokens + 196 rows per placeholder) are
    cut at the end, like VILA does after splicing; a sample whose visual rows themselves would
    be cut raises, since it could never be trained on.
    """

    config: UniRSConfig
    tokenizer: Any
    image_processor: ImageProcessor
    max_length: int = 4096

    def __call__(self, record: Record) -> dict[str, Any]:
        cfg = self.config
        turns = list(record.turns)
        num_placeholders = cfg.num_placeholders(record.input_type) if record.input_type else 0
        if record.clue is not None and record.input_type is not None:
            first, answer = turns[0]
            turns[0] = (build_augmented_instruction(first, record.clue, record.input_type, cfg), answer)
        ids, labels = build_supervised_example(turns, self.tokenizer, num_placeholders, cfg)
        rows = cfg.tokens_per_image
        total = len(ids) + sum(1 for t in ids if t == cfg.image_token_index) * (rows - 1)
        truncated = total > self.max_length
        if truncated:
            keep = len(ids) - (total - self.max_length)
            placeholder_positions = [i for i, t in enumerate(ids) if t == cfg.image_token_index]
            if placeholder_positions and placeholder_positions[-1] >= keep:
                raise ValueError(
                    f"{record.source}: {total} positions exceed max_length={self.max_length} even without text"
                )
            ids, labels = ids[:keep], labels[:keep]
        pixel_values = None
        if record.input_type is not None:
            try:
                frames = load_visual_frames(record, cfg.num_video_frames)
                pixel_values = self.image_processor(frames)
            except Exception as exc:  # name the record: a corrupt image deep inside a run is otherwise opaque
                raise RuntimeError(f"{record.source}: cannot load media: {exc}") from exc
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "input_type": record.input_type,
            "truncated": truncated,
            "id": record.record_id,
        }


@dataclass
class Collator:
    """Right-pads a list of samples: input_ids with `pad_token_id`, labels with −100, attention mask."""

    pad_token_id: int = 0

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(s["input_ids"]) for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[b, :n] = s["input_ids"]
            labels[b, :n] = s["labels"]
            attention_mask[b, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": [s["pixel_values"] for s in samples],
            "input_types": [InputType(s["input_type"]) if s["input_type"] else None for s in samples],
            "truncated": sum(bool(s["truncated"]) for s in samples),
            "ids": [s["id"] for s in samples],
        }

"""Generating benchmark predictions with a UniRS checkpoint (batched, greedy or sampled).

Decoding defaults to greedy. The released eval scripts sample at temperature 0.2 and keep the
first 42 tokens of a change caption (spec section 6.1); `Decoding(temperature=0.2)` and
`max_new_tokens=42` reproduce that. The prompts and the optional clue pass are the model
library's (`UniRS.encode`, `generate_clues`, `generate_answers`), i.e. what `caption_change` /
`answer` do, batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration_unirs import InputType
from ..generation import SamplingConfig
from ..modeling_unirs import VisualInput
from ..processing import load_video_frames
from ..unirs import UniRS

__all__ = ["Decoding", "PredictionItem", "load_eval_model", "predict"]


@dataclass
class Decoding:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def sampling(self) -> SamplingConfig:
        if self.temperature <= 0:
            return SamplingConfig()
        return SamplingConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


@dataclass
class PredictionItem:
    """One question. media: [image], [before, after], or [frame folder / frame files] for a video.

    An empty instruction means the model's default for the input type (`caption_prompt` for a
    pair, `video_question` for a video).
    """

    item_id: str
    input_type: InputType
    media: Sequence[Any]
    instruction: str


def load_eval_model(
    path: str | Path, base: str | Path | None = None, device: str | None = None, dtype: str | None = None
) -> UniRS:
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]
    return UniRS.from_pretrained(path, base_path=base, device=device, dtype=torch_dtype)


def _frames(model: UniRS, item: PredictionItem) -> list[Any]:
    if item.input_type is InputType.VIDEO:
        source = item.media[0] if len(item.media) == 1 else list(item.media)
        if isinstance(source, (str, Path)) and Path(source).is_file():
            from ..training.collate import load_visual_frames
            from ..training.data import Record

            return load_visual_frames(
                Record("video", [Path(source)], [], source=item.item_id), model.config.num_video_frames
            )
        return load_video_frames(source, model.config.num_video_frames)
    return list(item.media)


def _default_instruction(model: UniRS, item: PredictionItem) -> str:
    if item.input_type is InputType.PAIR:
        return model.config.caption_prompt
    if item.input_type is InputType.VIDEO:
        return model.config.video_question
    raise ValueError(f"item {item.item_id}: empty question")


@torch.inference_mode()
def predict(
    model: UniRS,
    items: Sequence[PredictionItem],
    max_new_tokens: int,
    decoding: Decoding | None = None,
    batch_size: int = 8,
    use_clues: bool | None = None,
    progress: bool = True,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """[{"id", "prediction", "clue"}] in item order. `use_clues`: None = on iff a base model is loaded."""
    decoding = decoding or Decoding()
    if use_clues and model.base_llm is None:
        raise RuntimeError("Clues need the base model: pass --base (VILA-1.5 checkpoint)")
    use_clues = model.base_llm is not None if use_clues is None else use_clues
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="predict", unit="item", dynamic_ncols=True)
    results: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        visuals = []
        for item in chunk:
            try:
                pixels = model.image_processor(_frames(model, item)).to(device=model.device, dtype=model.dtype)
            except Exception as exc:
                raise RuntimeError(
                    f"item {item.item_id}: cannot load media {list(map(str, item.media))}: {exc}"
                ) from exc
            visuals.append(VisualInput(item.input_type, pixels))
        encoded = model.encode(visuals)
        clues = model.generate_clues(encoded) if use_clues else None
        requests = [
            (k, item.instruction or _default_instruction(model, item), max_new_tokens) for k, item in enumerate(chunk)
        ]
        texts = model.generate_answers(encoded, requests, clues, sampling=decoding.sampling())
        batch = [
            {"id": item.item_id, "prediction": text, "clue": clues[k] if clues else None}
            for k, (item, text) in enumerate(zip(chunk, texts, strict=True))
        ]
        results.extend(batch)
        if on_batch is not None:
            on_batch(batch)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results

"""Offline clue generation for prompt augmentation (`unirs-clues`, spec section 4).

Runs the *base* VLM (VILA-1.5-3B) over a training dataset and writes a copy of it with a
`"clue"` field per record (the authors' `*_Plus.json` files). At training time the first
instruction of a record with a clue becomes `conversation.build_augmented_instruction(...)`,
exactly the prompt the model sees at inference when it is loaded with `base_path=`.

The clue is produced by the model library's own pass-1 code (`UniRS.generate_clues`: the
per-input-type clue prompt, greedy decoding capped at `clue_max_new_tokens`, `clean_clue`), with
the base model's LLM as the clue model. The vision tower and `single` projector are the same
frozen weights in VILA-1.5 and UniRS, so these clues equal the ones generated at inference.

Progress is appended to `<out>.partial.jsonl`; an interrupted run resumes from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..configuration_unirs import InputType
from ..modeling_unirs import VisualInput
from ..unirs import UniRS
from .collate import load_visual_frames
from .data import DatasetFormatError, DatasetSpec, Record, load_dataset_records

__all__ = ["generate_clue_file", "load_clue_model", "visual_input_for_record"]


def load_clue_model(
    base_path: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    image_aspect_ratio: str | None = "pad",
    max_new_tokens: int | None = None,
) -> UniRS:
    """The base VLM set up as its own clue model (pass 1 runs `model.llm`)."""
    overrides: dict[str, Any] = {}
    if image_aspect_ratio:
        overrides["image_aspect_ratio"] = image_aspect_ratio
    model = UniRS.from_pretrained(base_path, device=device, dtype=dtype, **overrides)
    if model.tokenizer is None:
        raise RuntimeError(f"{base_path} has no tokenizer in llm/")
    model.base_llm = model.llm  # the base model is its own clue generator
    if max_new_tokens is not None:
        model.config.clue_max_new_tokens = max_new_tokens
    return model.eval()


def visual_input_for_record(model: UniRS, record: Record) -> VisualInput:
    frames = load_visual_frames(record, model.config.num_video_frames)
    pixels = model.image_processor(frames).to(device=model.device, dtype=model.dtype)
    return VisualInput(InputType(record.input_type), pixels)


def generate_clue_file(
    base_path: str | Path,
    spec: DatasetSpec,
    out_path: str | Path,
    *,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    device: str | None = None,
    image_aspect_ratio: str | None = "pad",
    resume: bool = True,
    limit: int | None = None,
    progress: bool = True,
    overwrite_existing: bool = False,
    log: Callable[[str], None] = print,
    model: UniRS | None = None,
) -> Path:
    """Write `out_path`: the records of `spec.path` (all fields kept) plus `"clue"`.

    Records without visual input get no clue. Records that already have a clue keep it unless
    `overwrite_existing`. `limit` processes only the first N records (the output then holds only those).
    """
    out_path = Path(out_path)
    raw = (
        json.loads(spec.path.read_text(encoding="utf-8"))
        if spec.path.suffix != ".jsonl"
        else [json.loads(line) for line in spec.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    )
    spec.use_clues = True
    records = load_dataset_records(spec)
    if len(records) != len(raw):  # cannot happen: the reader keeps every record or raises
        raise DatasetFormatError(f"{spec.path}: read {len(records)} of {len(raw)} records")
    count = len(records) if limit is None else min(limit, len(records))
    partial = out_path.with_name(out_path.name + ".partial.jsonl")
    done: dict[int, str] = {}
    if resume and partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                done[int(entry["index"])] = entry["clue"]
        log(f"resuming: {len(done)} clues already in {partial}")
    elif partial.exists():
        partial.unlink()
    todo = [
        i
        for i in range(count)
        if i not in done and records[i].input_type is not None and (overwrite_existing or records[i].clue is None)
    ]
    if todo:
        model = model or load_clue_model(
            base_path, device=device, image_aspect_ratio=image_aspect_ratio, max_new_tokens=max_new_tokens
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="unirs-clues", unit="record", dynamic_ncols=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("a", encoding="utf-8") as fh, torch.inference_mode():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                visuals = []
                for i in chunk:
                    try:
                        visuals.append(visual_input_for_record(model, records[i]))
                    except Exception as exc:
                        raise RuntimeError(f"{records[i].source}: cannot load media: {exc}") from exc
                clues = model.generate_clues(model.encode(visuals))
                for i, clue in zip(chunk, clues, strict=True):
                    done[i] = clue
                    fh.write(json.dumps({"index": i, "clue": clue}, ensure_ascii=False) + "\n")
                fh.flush()
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
    out = []
    for i in range(count):
        rec = dict(raw[i])
        if i in done:
            rec["clue"] = done[i]
        out.append(rec)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if partial.exists():
        partial.unlink()
    log(f"wrote {out_path}: {sum('clue' in r for r in out)} of {len(out)} records with clues")
    return out_path

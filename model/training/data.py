"""Training data: LLaVA-style JSON readers with validation, the dataset mixture and its sampler.

Record format (one JSON list per dataset, or JSON lines)::

    {"id": "...",
     "image": "a.png"                      # single image (GeoChat-Instruct / RSVQA)
            | ["A/x.png", "B/x.png"]       # pair, [before, after] (LEVIR-CC)
            | "A/x.png###B/x.png"          # pair, eval-file style
     "video": "clips/x.mp4" | "frames/x/"  # video file or a folder of frames (ERA)
            | ["f0.jpg", "f1.jpg", ...],   # or an explicit frame list
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...],
     "clue": "..."}                         # optional, written by `unirs-clues` (prompt augmentation)

Every record is validated when the file is read; the first problem raises `DatasetFormatError`
naming the file, the record index and the record id.

Mixture (spec section 5.2): each dataset is repeated `repeat` times (default geochat x1,
levir x5, era x10, else x1); every copy is a separate member, shuffled on its own each epoch, and
the datasets are interleaved evenly (`interleave_evenly`, `InterleavedSampler`), so mini-batches
mix input types.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "DEFAULT_REPEATS",
    "DatasetFormatError",
    "DatasetSpec",
    "InterleavedSampler",
    "MixtureDataset",
    "Record",
    "interleave_evenly",
    "load_dataset_records",
    "load_video_file_frames",
    "parse_dataset_spec",
]

# Repetition factors of the released mixture `geochat_instruct + 5 x levir_cc + 10 x era_class`.
DEFAULT_REPEATS = {"geochat": 1, "geochat_instruct": 1, "levir": 5, "levir_cc": 5, "era": 10, "era_class": 10}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v"}
HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
_PLACEHOLDER = re.compile(r"\s*<(?:image|video)>\s*")
_VIDEO_PLACEHOLDER = re.compile(r"\s*<video>\s*")
_LEADING_IMAGE = re.compile(r"^<image>\s*")


class DatasetFormatError(ValueError):
    """A malformed dataset file or record; the message names the file and the record index."""


@dataclass
class Record:
    """One validated training sample.

    media: [] (text only), [image], [before, after], [video file or frame folder] or [frame, ...].
    turns: [(instruction, answer), ...]. Video and text-only records have every `<image>`/`<video>`
    placeholder removed (the sample builder prepends `num_video_frames` of them, as the released
    ERA dataset does). Image and pair records keep an `<image>` where the data put it, laid out
    like the released `preprocess_multimodal` ("What is <image>\nhere?"); only a placeholder that
    opens the first instruction is removed, and the builder puts it back there, before any clue.
    """

    input_type: str | None  # "image" | "pair" | "video" | None (text only)
    media: list[Path]
    turns: list[tuple[str, str]]
    clue: str | None = None
    record_id: str | None = None
    source: str = ""  # "file: record i", for error messages while loading media


@dataclass
class DatasetSpec:
    """One dataset of the mixture. `media_root` defaults to the JSON file's folder."""

    name: str
    path: Path
    media_root: Path | None = None
    input_type: str = "auto"  # auto | image | pair | video
    repeat: int | None = None  # None: DEFAULT_REPEATS[name] or 1
    use_clues: bool = True

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.media_root is not None:
            self.media_root = Path(self.media_root)
        if self.input_type not in ("auto", "image", "pair", "video"):
            raise ValueError(f"dataset {self.name!r}: type must be auto, image, pair or video, got {self.input_type!r}")
        if self.repeat is None:
            self.repeat = DEFAULT_REPEATS.get(self.name.lower(), 1)
        if int(self.repeat) != self.repeat or self.repeat < 1:
            raise ValueError(f"dataset {self.name!r}: repeat must be a positive integer, got {self.repeat!r}")
        self.repeat = int(self.repeat)


def parse_dataset_spec(text: str) -> DatasetSpec:
    """Parse the command-line form ``NAME=PATH[,root=DIR][,type=pair][,repeat=5][,clues=no]``."""
    head, *options = [part.strip() for part in text.split(",")]
    if "=" not in head:
        raise ValueError(f"dataset spec {text!r}: expected NAME=PATH[,root=DIR][,type=TYPE][,repeat=N][,clues=yes|no]")
    name, path = head.split("=", 1)
    kwargs: dict[str, Any] = {}
    for opt in options:
        if "=" not in opt:
            raise ValueError(f"dataset spec {text!r}: option {opt!r} is not KEY=VALUE")
        key, value = opt.split("=", 1)
        if key in ("root", "media_root"):
            kwargs["media_root"] = Path(value)
        elif key == "type":
            kwargs["input_type"] = value
        elif key == "repeat":
            kwargs["repeat"] = int(value)
        elif key == "clues":
            kwargs["use_clues"] = value.lower() in ("1", "yes", "true", "on")
        else:
            raise ValueError(f"dataset spec {text!r}: unknown option {key!r} (root, type, repeat, clues)")
    return DatasetSpec(name=name.strip(), path=Path(path.strip()), **kwargs)


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------
def _read_json_records(path: Path) -> list[Any]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetFormatError(f"{path}: line {lineno + 1}: invalid JSON ({exc.msg})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _infer_type(rec: dict[str, Any]) -> str | None:
    if "video" in rec:
        return "video"
    image = rec.get("image")
    if image is None:
        return None
    if isinstance(image, str):
        return "pair" if "###" in image else "image"
    if isinstance(image, list):
        return {1: "image", 2: "pair"}.get(len(image), "video")
    return "invalid"


def _media_list(rec: dict[str, Any], input_type: str | None, fail) -> list[str]:
    if input_type is None:
        return []
    value = rec.get("video") if "video" in rec else rec.get("image")
    if isinstance(value, str):
        value = value.split("###") if input_type == "pair" else [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        fail(f"'{'video' if 'video' in rec else 'image'}' must be a path or a non-empty list of paths")
    if input_type == "image" and len(value) != 1:
        fail(f"an image sample needs exactly one image, got {len(value)}")
    if input_type == "pair" and len(value) != 2:
        fail(f"a pair sample needs exactly two images [before, after], got {len(value)}")
    return value


def _released_image_layout(value: str) -> str:
    """UniRS/VILA `preprocess_multimodal` on one human turn: every `<image>` stays in place.

    The text around each placeholder is stripped, a space goes before it and a newline after it
    ("Q\n<image>" -> "Q <image>", "<image>Q" -> "<image>\nQ"); a turn without one is only stripped.
    Source: `llava/data/dataset.py@476abda` (IntelliSensing/UniRS), `preprocess_multimodal`.
    """
    value = _VIDEO_PLACEHOLDER.sub(" ", value)
    if "<image>" not in value:
        return value.strip()
    chunks = [c.strip() for c in value.split("<image>")]
    return "<image>\n".join([c + " " for c in chunks[:-1]] + [chunks[-1]]).strip()


def _parse_turns(conversations: Any, fail, input_type: str | None) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        fail("'conversations' must be a non-empty list")
    if len(conversations) % 2:
        fail(f"'conversations' must alternate human/gpt turns and end with gpt; got {len(conversations)} turns")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            fail(f"conversations[{k}] must be an object with 'from' and a string 'value'")
        role = str(turn["from"]).lower()
        expected = HUMAN_ROLES if k % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            fail(f"conversations[{k}] is from {turn['from']!r}; expected {'human' if k % 2 == 0 else 'gpt'}")
    keep_image = input_type in ("image", "pair")
    for k in range(0, len(conversations), 2):
        value = conversations[k]["value"]
        instruction = _released_image_layout(value) if keep_image else _PLACEHOLDER.sub(" ", value).strip()
        answer = conversations[k + 1]["value"].strip()
        if not answer:
            fail(f"conversations[{k + 1}] (the answer) is empty")
        if "<image>" in answer or "<video>" in answer:
            fail(f"conversations[{k + 1}] (an answer) contains an <image>/<video> placeholder")
        turns.append((instruction, answer))
    if keep_image:
        count = sum(q.count("<image>") for q, _ in turns)
        if count > 1:
            fail(f"an {input_type} sample takes one <image> placeholder (a pair is fused into one), got {count}")
        turns[0] = (_LEADING_IMAGE.sub("", turns[0][0]), turns[0][1])
    if not turns[0][0] or turns[0][0] == "<image>":
        fail("the first instruction is empty")
    return turns


def load_dataset_records(spec: DatasetSpec, check_files: bool = True) -> list[Record]:
    """Read and validate every record of `spec.path`; raise `DatasetFormatError` on the first problem."""
    path = spec.path
    root = spec.media_root if spec.media_root is not None else path.parent
    raw = _read_json_records(path)
    records = []
    for i, rec in enumerate(raw):
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = f"{path}: record {i}" + (f" (id={rid!r})" if rid is not None else "")

        def fail(msg: str, where: str = where) -> None:
            raise DatasetFormatError(f"{where}: {msg}")

        if not isinstance(rec, dict):
            fail(f"expected a JSON object, got {type(rec).__name__}")
        input_type = _infer_type(rec)
        if input_type == "invalid":
            fail("'image' must be a path or a list of paths")
        if spec.input_type != "auto":
            if input_type is None:
                fail(f"dataset type is {spec.input_type!r} but the record has no 'image' or 'video'")
            if spec.input_type == "video" and input_type in ("image", "pair") and "video" not in rec:
                input_type = "video"  # a video given under "image" (one folder/file or a frame list)
            elif input_type != spec.input_type:
                fail(f"dataset type is {spec.input_type!r} but the record looks like {input_type!r}")
        media = [root / m.strip() for m in _media_list(rec, input_type, fail)]
        if spec.input_type == "auto" and input_type == "image" and "image" in rec:
            # A single folder or video file under "image" is a video.
            if media[0].is_dir() or media[0].suffix.lower() in VIDEO_SUFFIXES:
                input_type = "video"
        if input_type == "video" and len(media) == 1:
            target = media[0]
            if check_files and not (target.is_dir() or target.is_file()):
                fail(f"video {target} not found")
            if target.is_file() and target.suffix.lower() not in VIDEO_SUFFIXES:
                fail(f"{target} is neither a frame folder nor a video file ({', '.join(sorted(VIDEO_SUFFIXES))})")
            if (
                target.is_dir()
                and check_files
                and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in target.iterdir())
            ):
                fail(f"frame folder {target} contains no image files")
        elif check_files:
            for m in media:
                if not m.is_file():
                    fail(f"media file {m} not found")
        turns = _parse_turns(rec.get("conversations"), fail, input_type)
        clue = rec.get("clue")
        if clue is not None and not isinstance(clue, str):
            fail("'clue' must be a string")
        records.append(
            Record(
                input_type=input_type,
                media=media,
                turns=turns,
                clue=clue if spec.use_clues else None,
                record_id=str(rid) if rid is not None else None,
                source=where,
            )
        )
    if not records:
        raise DatasetFormatError(f"{path}: no records")
    return records


# ---------------------------------------------------------------------------------------------
# Media loading
# ---------------------------------------------------------------------------------------------
def load_video_file_frames(path: Path, num_frames: int) -> list[np.ndarray]:
    """Decode the frames VILA-1.5 keeps from a video file (needs PyAV or imageio; not required otherwise).

    The kept frame indices are `processing.sample_frame_indices(frame_count, num_frames)`; only
    those frames are converted to arrays.
    """
    from ..processing import sample_frame_indices

    try:
        import av  # type: ignore[import-not-found]
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            count = stream.frames
            if not count:  # unknown: decode once to count
                count = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            wanted = set(sample_frame_indices(count, num_frames))
            frames = [f.to_ndarray(format="rgb24") for k, f in enumerate(container.decode(video=0)) if k in wanted]
        return frames
    try:
        import imageio.v3 as iio  # type: ignore[import-not-found]
    except ImportError:
        iio = None
    if iio is not None:
        all_frames = list(iio.imiter(str(path)))
        return [all_frames[k] for k in sample_frame_indices(len(all_frames), num_frames)]
    raise RuntimeError(
        f"{path}: reading video files needs PyAV or imageio with an ffmpeg plugin, and neither is installed "
        "(pip install av). Alternatively extract the frames to a folder and point the record at the folder."
    )


# ---------------------------------------------------------------------------------------------
# Mixture and sampler
# ---------------------------------------------------------------------------------------------
@dataclass
class _Member:
    spec: DatasetSpec
    copy: int
    records: list[Record]


@dataclass
class MixtureDataset(Dataset):
    """All dataset copies concatenated; item i -> (member, record). `transform` makes the sample."""

    specs: Sequence[DatasetSpec]
    transform: Any = None
    check_files: bool = True
    members: list[_Member] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for spec in self.specs:
            records = load_dataset_records(spec, check_files=self.check_files)
            for c in range(spec.repeat):
                self.members.append(_Member(spec, c, records))
        self.offsets = np.cumsum([0] + [len(m.records) for m in self.members]).tolist()

    @property
    def member_sizes(self) -> list[int]:
        return [len(m.records) for m in self.members]

    @property
    def member_datasets(self) -> list[int]:
        """Index (into `specs`) of the dataset each member is a copy of."""
        return [next(k for k, spec in enumerate(self.specs) if spec is m.spec) for m in self.members]

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[_Member, int]:
        member = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.members[member], index - self.offsets[member]

    def record(self, index: int) -> Record:
        member, local = self.locate(index)
        return member.records[local]

    def __getitem__(self, index: int) -> Any:
        rec = self.record(index)
        return self.transform(rec) if self.transform is not None else rec

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for spec in self.specs:
            records = next(m.records for m in self.members if m.spec is spec)
            types: dict[str, int] = {}
            for r in records:
                types[str(r.input_type)] = types.get(str(r.input_type), 0) + 1
            out.append(
                {
                    "name": spec.name,
                    "path": str(spec.path),
                    "records": len(records),
                    "repeat": spec.repeat,
                    "samples_per_epoch": len(records) * spec.repeat,
                    "types": types,
                    "with_clue": sum(r.clue is not None for r in records),
                }
            )
        return out


def interleave_evenly(groups: Sequence[Sequence[int]]) -> list[int]:
    """Spread the groups over one sequence as evenly as possible.

    Largest group first: a group of n items takes the free slots at positions floor(j * m / n),
    j = 0..n-1, of the m slots still free. The result contains every item exactly once and keeps
    each group's internal order.
    """
    total = sum(len(g) for g in groups)
    out = np.full(total, -1, dtype=np.int64)
    free = np.arange(total)
    order = sorted(range(len(groups)), key=lambda k: -len(groups[k]))  # stable: ties keep their order
    for k in order:
        group = np.asarray(groups[k], dtype=np.int64)
        n, m = len(group), len(free)
        if n == 0:
            continue
        picks = (np.arange(n) * m) // n
        out[free[picks]] = group
        free = np.delete(free, picks)
    return out.tolist()


class InterleavedSampler(Sampler[int]):
    """Per-epoch order over a `MixtureDataset`: every member (dataset copy) shuffled on its own, then interleaved.

    member_groups: the dataset index of each member. Members of one group are concatenated (copy
    1, then copy 2, ... each in its own random order) and the groups are interleaved evenly, so
    every dataset is spread uniformly over the epoch and the `repeat` passes over a dataset fall
    in different parts of it. Without `member_groups` every member is its own group, which is
    VILA's `VILADistributedSampler` order (copies of a dataset then tend to cluster locally).

    With `world_size > 1` each member is first truncated to a multiple of `world_size` and split
    round-robin between ranks (as VILA does per member). `start_index` skips samples of the
    current epoch that were already consumed (resume).
    """

    def __init__(
        self,
        member_sizes: Sequence[int],
        seed: int = 42,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
        member_groups: Sequence[int] | None = None,
    ):
        self.member_sizes = list(member_sizes)
        self.member_groups = list(member_groups) if member_groups is not None else list(range(len(member_sizes)))
        if len(self.member_groups) != len(self.member_sizes):
            raise ValueError("member_groups needs one entry per member")
        self.seed = seed
        self.shuffle = shuffle
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch = epoch
        self.start_index = start_index

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict[int, list[int]] = {}
        offset = 0
        for size, group in zip(self.member_sizes, self.member_groups, strict=True):
            idx = np.arange(offset, offset + size)
            offset += size
            if self.shuffle:
                idx = rng.permutation(idx)
            usable = (size // self.world_size) * self.world_size
            groups.setdefault(group, []).extend(idx[:usable][self.rank :: self.world_size].tolist())
        return interleave_evenly([groups[g] for g in sorted(groups)])

    def __len__(self) -> int:
        return max(0, sum(s // self.world_size for s in self.member_sizes) - self.start_index)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start_index :])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(num_samples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (the last incomplete accumulation is still applied)."""
    return max(1, math.ceil(math.ceil(num_samples / batch_size) / grad_accum))

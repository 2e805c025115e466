"""Input processing: image loading, SigLIP preprocessing (PIL + numpy), video frame sampling, tokenisation.

No torchvision: resizing is PIL bicubic, as in `SiglipImageProcessor`'s PIL backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .configuration_unirs import UniRSConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ImageLike = Image.Image | np.ndarray | str | Path

__all__ = [
    "ImageLike",
    "ImageProcessor",
    "build_supervised_example",
    "expand2square",
    "left_pad_frames",
    "load_image",
    "load_video_frames",
    "sample_frame_indices",
    "tokenizer_image_token",
]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def load_image(image: ImageLike) -> Image.Image:
    """PIL image, file path, or numpy array (H, W, 3) / (H, W) -> RGB PIL image.

    Float arrays are taken to be in [0, 1]; integer arrays in [0, 255].
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            return img.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"Expected an (H, W, 3) or (H, W) array, got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.rint(arr * 255.0), 0, 255)
        arr = np.ascontiguousarray(arr.astype(np.uint8))
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"Unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a path")


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `background`, the original centred (VILA/LLaVA `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


@dataclass
class ImageProcessor:
    """SigLIP preprocessing: optional pad-to-square with the mean colour, bicubic resize, x/255, (x - mean) / std.

    For so400m: 384x384, mean = std = 0.5, fill colour (127, 127, 127). Output (N, 3, H, W) float32.
    """

    size: int = 384
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    aspect_ratio: str = "pad"

    @classmethod
    def from_config(cls, config: UniRSConfig) -> ImageProcessor:
        return cls(
            size=config.image_size,
            image_mean=tuple(config.image_mean),
            image_std=tuple(config.image_std),
            aspect_ratio=config.image_aspect_ratio,
        )

    @classmethod
    def from_pretrained(cls, vision_tower_dir: str | Path, aspect_ratio: str = "pad") -> ImageProcessor:
        """Read a `preprocessor_config.json` written by `SiglipImageProcessor`."""
        data = json.loads((Path(vision_tower_dir) / "preprocessor_config.json").read_text())
        size = data.get("size", {})
        if isinstance(size, dict):
            height, width = size.get("height", 384), size.get("width", 384)
            if height != width:
                raise ValueError(f"Only square SigLIP inputs are supported, got {height}x{width}")
            size = height
        return cls(
            size=int(size),
            image_mean=tuple(data.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(data.get("image_std", (0.5, 0.5, 0.5))),
            resample=int(data.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            aspect_ratio=aspect_ratio,
        )

    def to_dict(self) -> dict[str, Any]:
        """`preprocessor_config.json` in the `SiglipImageProcessor` format."""
        return {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": self.size, "width": self.size},
            "resample": int(self.resample),
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory, "preprocessor_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def fill_colour(self) -> tuple[int, int, int]:
        # VILA: tuple(int(x * 255) for x in image_processor.image_mean) -> (127, 127, 127).
        return tuple(int(x * 255) for x in self.image_mean)

    def preprocess_one(self, image: ImageLike) -> np.ndarray:
        """One image -> (3, size, size) float32."""
        img = load_image(image)
        if self.aspect_ratio == "pad":
            img = expand2square(img, self.fill_colour)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample=Image.Resampling(self.resample))
        arr = np.asarray(img, dtype=np.float32) * np.float32(self.rescale_factor)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        arr = (arr - mean) / std
        return arr.transpose(2, 0, 1)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images -> pixel_values (N, 3, size, size) float32."""
        if isinstance(images, (Image.Image, str, Path)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        return torch.from_numpy(np.stack([self.preprocess_one(im) for im in images]))


# ---------------------------------------------------------------------------------------------
# Video frames
# ---------------------------------------------------------------------------------------------
def sample_frame_indices(frame_count: int, num_frames: int) -> list[int]:
    """Frame indices kept by VILA-1.5's sampler (`get_frame_from_vcap`, NVlabs/VILA `llava/mm_utils.py`).

    A clip of at least `num_frames` frames is decoded sequentially and frame k is kept if k is in
    `np.linspace(0, frame_count - 2, N, dtype=int)`; duplicate indices yield a single frame.
    For 120 frames and N = 8: [0, 16, 33, 50, 67, 84, 101, 118].
    A shorter clip (frame_count < N) keeps *every* frame, [0, ..., T - 1]: VILA's "left padding"
    branch reads them all, and the caller pads the front (`left_pad_frames`). The one deviation:
    for a single-frame clip VILA returns N empty images; the frame is kept here instead.
    """
    if frame_count <= 0:
        return []
    if frame_count < num_frames:
        return list(range(frame_count))
    wanted = np.linspace(0, frame_count - 2, num_frames, dtype=int)
    return sorted({int(i) for i in wanted if 0 <= i < frame_count})


def left_pad_frames(frames: list[Image.Image], num_frames: int) -> list[Image.Image]:
    """Prepend black frames of the first frame's size up to `num_frames`, as VILA-1.5 does for short clips."""
    if not frames:
        raise ValueError("No frames to pad")
    missing = num_frames - len(frames)
    if missing <= 0:
        return frames
    return [Image.new("RGB", frames[0].size, (0, 0, 0))] * missing + frames


def load_video_frames(frames: Any, num_frames: int) -> list[Image.Image]:
    """Sample `num_frames` frames from a sequence, VILA style, left-padding short clips with black.

    frames: a list of images/arrays/paths, a (T, H, W, 3) array, or a directory of image files
    (sorted by name). Returns exactly `num_frames` PIL images: for T < num_frames all T frames in
    order after num_frames - T black ones (see `sample_frame_indices`).
    """
    if isinstance(frames, (str, Path)) and Path(frames).is_dir():
        frames = sorted(p for p in Path(frames).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    elif isinstance(frames, (str, Path)):
        raise ValueError(
            f"{frames}: video files are not decoded here (no OpenCV dependency); pass frames or a directory of frames"
        )
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"Expected a (T, H, W, 3) array of frames, got shape {frames.shape}")
        frames = list(frames)
    frames = list(frames)
    if not frames:
        raise ValueError("No frames given")
    picked = [load_image(frames[i]) for i in sample_frame_indices(len(frames), num_frames)]
    return left_pad_frames(picked, num_frames)


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------
def tokenizer_image_token(
    prompt: str, tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>", image_token_index: int = -200
) -> list[int]:
    """VILA `tokenizer_image_token`: split on `<image>`, tokenise each chunk, BOS only once, −200 between chunks.

    Each chunk is tokenised on its own (so each gets SentencePiece's dummy-prefix "▁"), exactly
    as the released code does; the BOS of every chunk after the first is dropped.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(image_token)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[offset:])
    return input_ids


def build_supervised_example(
    turns: Sequence[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    num_images: int,
    config: UniRSConfig,
) -> tuple[list[int], list[int]]:
    """Tokenise a conversation for SFT with VILA `preprocess_v1` masking.

    turns: [(instruction, answer), ...]; `num_images` `<image>\\n` placeholders are put at the
    start of the first instruction, unless the instructions already hold exactly `num_images`
    (the released `preprocess_multimodal` leaves a placeholder where the data put it; any other
    count raises ValueError). Labels are −100 on the system prompt and every user turn
    (including "ASSISTANT:"); the answers and their `</s>` are supervised. Visual positions are
    masked later, when the placeholders are expanded (`UniRS.prepare_inputs_for_llm`).
    Returns (input_ids, labels), both with −200 placeholders still in place.
    """
    from .conversation import get_conversation_template

    conv = get_conversation_template(config.conv_template, system=config.system_prompt)
    present = sum(instruction.count(config.image_token) for instruction, _ in turns)
    if present not in (0, num_images):
        raise ValueError(
            f"The conversation holds {present} {config.image_token} placeholders; the input needs {num_images}"
        )
    placeholders = (config.image_token + "\n") * (num_images if present == 0 else 0)
    for k, (instruction, answer) in enumerate(turns):
        conv.append_message(conv.roles[0], (placeholders if k == 0 else "") + instruction.strip())
        conv.append_message(conv.roles[1], answer.strip())
    full = conv.get_prompt()
    ids = tokenizer_image_token(full, tokenizer, config.image_token, config.image_token_index)
    labels = list(ids)
    # Mask every prefix that ends with "ASSISTANT:" of turn k and the tail of the previous answer.
    cursor = 0
    for k in range(len(turns)):
        head = conv.copy()
        head.messages = [*conv.messages[: 2 * k + 1], [conv.roles[1], None]]
        prefix = head.get_prompt()
        prefix_ids = tokenizer_image_token(prefix, tokenizer, config.image_token, config.image_token_index)
        if ids[: len(prefix_ids)] != prefix_ids:
            raise ValueError("Prompt tokenisation is not a prefix of the conversation tokenisation; cannot mask")
        done = conv.copy()
        done.messages = conv.messages[: 2 * k + 2]
        answered = tokenizer_image_token(done.get_prompt(), tokenizer, config.image_token, config.image_token_index)
        for i in range(cursor, len(prefix_ids)):
            labels[i] = -100
        cursor = len(answered)
    return ids, labels

"""Synthetic data and tiny checkpoints for the training/evaluation tests.

`write_small_checkpoint` writes a real-layout random checkpoint like `model.testing` does, but with
56-pixel inputs (a 4x4 patch grid, so 4 LLM rows per image instead of 196) and 4 video frames, which
keeps a few dozen CPU training steps to seconds. Everything else (tokenizer, SigLIP, change module,
projector, LLaMA, checkpoint IO) is the real code path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import LlamaConfig, SiglipVisionConfig

from model.configuration_unirs import PRESETS, UniRSConfig
from model.testing import build_random_model, train_tiny_tokenizer
from model.tokenization import tokenizer_from_sentencepiece

IMAGE_SIZE = 56
VIDEO_FRAMES = 4

QUESTION = "What is in the image?"
CAPTION_PROMPT = "Please briefly describe the main changes between the above two remote sensing images."
VIDEO_QUESTION = "What is the event in the video?"

# (colour, answer): the answer depends only on the image.
IMAGES = [
    ((200, 30, 30), "There is a harbour with ships."),
    ((30, 180, 40), "It is an urban area with dense buildings."),
    ((30, 40, 200), "There are two tennis courts."),
    ((220, 220, 40), "The scene shows an airport runway."),
]
# (before colour, after colour, square in the after image?, caption)
PAIRS = [
    ((120, 120, 120), (120, 120, 120), False, "There is no change between the two images."),
    ((120, 120, 120), (120, 120, 120), True, "Some new buildings have been constructed."),
    ((30, 160, 40), (150, 110, 70), False, "The trees on the left side are removed."),
]
# (frame colours, event)
VIDEOS = [
    ([(20, 60, 200), (30, 70, 210), (40, 80, 220), (50, 90, 230)], "flood"),
    ([(230, 90, 10), (240, 60, 10), (250, 40, 10), (255, 20, 0)], "fire"),
    ([(90, 90, 90), (30, 30, 30), (90, 90, 90), (30, 30, 30)], "police chase"),
]


# A smaller LLaMA than the "tiny" preset: the training tests run ~100 optimizer steps on one core.
SMALL_LLM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    initializer_range=0.02,
)


def write_small_checkpoint(path: Path, layout: str = "vila", seed: int = 0, **overrides) -> Path:
    """A random VILA-layout (default, like the real starting point) or UniRS-layout checkpoint."""
    path = Path(path)
    llm_dir = path / "llm"
    llm_dir.mkdir(parents=True, exist_ok=True)
    (llm_dir / "tokenizer.model").write_bytes(train_tiny_tokenizer())
    (llm_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "model_max_length": 4096,
            }
        )
    )
    tokenizer = tokenizer_from_sentencepiece(llm_dir / "tokenizer.model", pad_token="<unk>")
    preset = copy.deepcopy(PRESETS["tiny"])
    vision, text = preset.pop("vision_config"), preset.pop("text_config")
    vision["image_size"] = IMAGE_SIZE
    text["vocab_size"] = len(tokenizer)
    text.update(SMALL_LLM)
    preset.update(use_change_module=layout == "unirs", num_video_frames=VIDEO_FRAMES)
    preset.update(overrides)
    config = UniRSConfig(vision_config=SiglipVisionConfig(**vision), text_config=LlamaConfig(**text), **preset)
    model = build_random_model(config, seed=seed)
    model.save_pretrained(path, layout=layout)
    return path


def solid(colour, square: bool = False, size: int = IMAGE_SIZE) -> Image.Image:
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:] = colour
    if square:
        arr[: size // 2, :] = (250, 250, 250)  # a large bright block: the new buildings
    return Image.fromarray(arr)


def write_mixture(root: Path) -> dict[str, Path]:
    """Three LLaVA-style JSON datasets (image, pair, video as frame folders) under `root`."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    geochat = []
    for k, (colour, answer) in enumerate(IMAGES):
        solid(colour).save(root / "img" / f"{k}.png")
        geochat.append(
            {
                "id": f"img{k}",
                "image": f"img/{k}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}],
            }
        )
    levir = []
    for k, (before, after, square, caption) in enumerate(PAIRS):
        for side in ("A", "B"):
            (root / "levir" / side).mkdir(parents=True, exist_ok=True)
        solid(before).save(root / "levir" / "A" / f"{k}.png")
        solid(after, square).save(root / "levir" / "B" / f"{k}.png")
        levir.append(
            {
                "id": f"pair{k}",
                "image": [f"levir/A/{k}.png", f"levir/B/{k}.png"],
                "conversations": [
                    # Placeholder first, as the eval and inference prompts put it: training keeps
                    # the data's placement (released `preprocess_multimodal`), so it must match.
                    {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    era = []
    for k, (colours, event) in enumerate(VIDEOS):
        folder = root / "era" / f"clip{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for f, colour in enumerate(colours):
            solid(colour).save(folder / f"frame_{f:03d}.png")
        era.append(
            {
                "id": f"video{k}",
                "video": f"era/clip{k}",
                "conversations": [
                    {"from": "human", "value": f"<video>\n{VIDEO_QUESTION}"},
                    {"from": "gpt", "value": f"This is a video about {event}."},
                ],
            }
        )
    out = {}
    for name, records in (("geochat", geochat), ("levir", levir), ("era", era)):
        out[name] = root / f"{name}.json"
        out[name].write_text(json.dumps(records, indent=1))
    return out


def video_frames(k: int) -> list[Image.Image]:
    return [solid(c) for c in VIDEOS[k][0]]

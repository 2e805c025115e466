"""Preprocessing, frame sampling, tokenisation, prompts and labels."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from model import UniRSConfig
from model.conversation import build_augmented_instruction, build_prompt
from model.processing import (
    ImageProcessor,
    build_supervised_example,
    expand2square,
    load_image,
    load_video_frames,
    sample_frame_indices,
    tokenizer_image_token,
)
from model.testing import random_image
from model.tokenization import load_tokenizer

CONFIG = UniRSConfig.from_preset("tiny", vocab_size=512)


# ---------------------------------------------------------------------------- images
def test_resize_matches_transformers_siglip_pil_processor():
    image = random_image(3, (200, 300))
    reference = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    expected = reference(images=[image], return_tensors="pt")["pixel_values"]
    ours = ImageProcessor(aspect_ratio="resize")([image])
    assert ours.shape == (1, 3, 384, 384) and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-6)


def test_pad_to_square_with_mean_colour():
    image = Image.fromarray(np.full((40, 100, 3), 255, np.uint8))
    square = expand2square(image, (127, 127, 127))
    assert square.size == (100, 100)
    arr = np.asarray(square)
    assert (arr[:30] == 127).all() and (arr[30:70] == 255).all() and (arr[70:] == 127).all()
    processor = ImageProcessor()
    assert processor.fill_colour == (127, 127, 127)
    pixels = processor([image])
    assert pixels[0, :, 0, 0].allclose(torch.full((3,), 127 / 255 * 2 - 1), atol=1e-6)  # padded corner
    assert pixels[0, :, 192, 192].allclose(torch.ones(3))  # white centre


def test_inputs_as_pil_numpy_or_path_are_equivalent(tmp_path):
    array = random_image(5, (50, 70))
    Image.fromarray(array).save(tmp_path / "x.png")
    processor = ImageProcessor()
    a = processor(array)
    b = processor(Image.fromarray(array))
    c = processor(str(tmp_path / "x.png"))
    d = processor(array.astype(np.float32) / 255.0)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    with pytest.raises(TypeError):
        load_image(42)


# ---------------------------------------------------------------------------- video frames
def test_video_frame_indices_match_vila():
    """VILA-1.5 `get_frame_from_vcap` (NVlabs/VILA llava/mm_utils.py, used by UniRS): linspace(0, T - 2, 8)."""
    assert sample_frame_indices(120, 8) == [0, 16, 33, 50, 67, 84, 101, 118]  # ERA: 5 s at 24 fps
    assert sample_frame_indices(9, 8) == [0, 1, 2, 3, 4, 5, 6, 7]  # linspace(0, 7, 8): no duplicates
    assert sample_frame_indices(8, 8) == [0, 1, 2, 3, 4, 5, 6]  # linspace(0, 6, 8) repeats index 0 once


@pytest.mark.parametrize("length", [1, 2, 5, 7])
def test_clips_shorter_than_8_frames_keep_every_frame(length):
    """VILA's short-clip branch reads all T < 8 frames (no linspace), so none is dropped."""
    assert sample_frame_indices(length, 8) == list(range(length))


def test_short_videos_keep_all_frames_and_pad_the_front_with_black():
    """VILA-1.5 / UniRS: a 5-frame clip becomes [black x 3, f0, f1, f2, f3, f4].

    The earlier sampler took linspace(0, 3, 8) = {0, 1, 2, 3}: it dropped f4 and padded 4 black frames.
    """
    frames = [random_image(k, (32, 32)) for k in range(5)]
    picked = load_video_frames(frames, 8)
    assert [np.asarray(f).max() for f in picked[:3]] == [0, 0, 0]
    assert [np.asarray(f).shape for f in picked[:3]] == [(32, 32, 3)] * 3
    for k in range(5):
        assert np.array_equal(np.asarray(picked[3 + k]), frames[k])
    assert len(picked) == 8
    stacked = load_video_frames(np.stack([random_image(k, (16, 16)) for k in range(120)]), 8)
    assert np.array_equal(np.asarray(stacked[1]), random_image(16, (16, 16)))


def test_video_frames_from_directory(tmp_path):
    for k in range(10):
        Image.fromarray(random_image(k, (16, 16))).save(tmp_path / f"frame_{k:03d}.png")
    picked = load_video_frames(tmp_path, 8)
    assert np.array_equal(np.asarray(picked[-1]), random_image(8, (16, 16)))


# ---------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tokenizer(unirs_ckpt):
    return load_tokenizer(unirs_ckpt / "llm")


@pytest.fixture(scope="module")
def sentencepiece(unirs_ckpt):
    return spm.SentencePieceProcessor(model_file=str(unirs_ckpt / "llm" / "tokenizer.model"))


def test_tokenizer_special_ids(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0  # VILA: pad = unk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t"), max_size=40
    ).filter(lambda s: not s.startswith(" ") and "<" not in s)
)
def test_tokenizer_matches_sentencepiece(tokenizer, sentencepiece, text):
    assert tokenizer(text).input_ids == [1, *sentencepiece.encode(text)]


def test_tokenizer_image_token_matches_vila(tokenizer):
    prompt = build_prompt("How many tennis courts in the image?", 1, CONFIG)
    ids = tokenizer_image_token(prompt, tokenizer)
    head, tail = prompt.split("<image>")
    assert ids.count(-200) == 1 and ids[0] == 1 and ids.count(1) == 1
    k = ids.index(-200)
    assert ids[:k] == tokenizer(head).input_ids
    assert ids[k + 1 :] == tokenizer(tail).input_ids[1:]  # BOS of later chunks dropped
    video = tokenizer_image_token(build_prompt("What is the event in the video?", 8, CONFIG), tokenizer)
    assert video.count(-200) == 8


def test_prompt_templates():
    prompt = build_prompt(" Is there a road? ", 1, CONFIG)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs there a road? ASSISTANT:"
    )
    assert build_prompt("q", 8, CONFIG).count("<image>\n") == 8
    augmented = build_augmented_instruction("Is there a road?", "A <clue>city</clue>\n with  roads", "pair", CONFIG)
    assert augmented == "<clue>A city with roads</clue>\n[change] Is there a road?"
    assert build_augmented_instruction("q", None, "pair", CONFIG) == "q"


def test_supervised_labels_mask_prompt_positions(tokenizer):
    turns = [("Describe the changes.", "A new road."), ("Anything else?", "No.")]
    ids, labels = build_supervised_example(turns, tokenizer, num_images=1, config=CONFIG)
    assert len(ids) == len(labels) and ids.count(-200) == 1
    supervised = [i for i, lab in zip(ids, labels, strict=False) if lab != -100]
    text = tokenizer.decode(supervised)
    assert "A new road." in text and "No." in text and "</s>" in text
    assert "USER" not in text and "ASSISTANT" not in text and "Describe" not in text
    assert labels[ids.index(-200)] == -100
    assert supervised.count(tokenizer.eos_token_id) == 2

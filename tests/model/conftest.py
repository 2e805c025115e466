"""Shared fixtures: tiny random checkpoints in the real VILA/UniRS layouts (built once per session)."""

from __future__ import annotations

import pytest

from model import UniRS
from model.testing import random_image, write_random_checkpoint


@pytest.fixture(scope="session")
def unirs_ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "unirs", layout="unirs", seed=0)


@pytest.fixture(scope="session")
def vila_ckpt(tmp_path_factory):
    # Base VLM: a different LLM (seed 1) but the same vision tower and projector as `unirs_ckpt`,
    # like VILA-1.5-3B and the UniRS model fine-tuned from it.
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "vila", layout="vila", seed=1, vision_seed=0)


@pytest.fixture(scope="session")
def model(unirs_ckpt):
    """Shared read-only model; tests that change settings load their own copy."""
    return UniRS.from_pretrained(unirs_ckpt, device="cpu")


@pytest.fixture(scope="session")
def images():
    return [random_image(k, (96, 128)) for k in range(4)]

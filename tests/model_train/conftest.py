"""Fixtures for the training/evaluation tests: one small VILA-layout checkpoint, one synthetic
mixture, and one trained model shared by the tests that only read it."""

from __future__ import annotations

import pytest

from .synthetic import write_mixture, write_small_checkpoint


@pytest.fixture(scope="session")
def small_vila(tmp_path_factory):
    """Random VILA-1.5-layout starting checkpoint (no change module), 56-px inputs, 4 video frames."""
    return write_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "vila", layout="vila", seed=0)


@pytest.fixture(scope="session")
def mixture(tmp_path_factory):
    """{"geochat": json, "levir": json, "era": json} with synthetic images, pairs and frame folders."""
    return write_mixture(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(small_vila, mixture, tmp_path_factory):
    """The default recipe (LLM only) for 80 steps on the mixture; returns (TrainConfig, TrainResult)."""
    from model.training.data import DatasetSpec
    from model.training.trainer import TrainConfig, train

    specs = [
        DatasetSpec("geochat", mixture["geochat"], repeat=2),
        DatasetSpec("levir", mixture["levir"], repeat=2),
        DatasetSpec("era", mixture["era"], repeat=2),
    ]
    cfg = TrainConfig(
        model_path=small_vila,
        output_dir=tmp_path_factory.mktemp("run") / "out",
        datasets=specs,
        max_steps=80,
        batch_size=4,
        grad_accum=1,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        save_steps=40,
        progress=False,
    )
    return cfg, train(cfg, log=lambda msg: None)

"""The SFT loop on a tiny model: loss, memorisation, freezing, checkpoints/resume, LoRA, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from model import UniRS
from model.training.cli import train_main
from model.training.collate import Collator, SampleBuilder
from model.training.data import DatasetSpec, load_dataset_records
from model.training.trainer import (
    TrainConfig,
    apply_training_policy,
    batch_loss,
    cosine_schedule,
    load_model_for_training,
    train,
)

from .synthetic import CAPTION_PROMPT, IMAGES, PAIRS, QUESTION, VIDEO_QUESTION, VIDEOS, solid, video_frames


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _specs(mixture, repeat=2):
    return [DatasetSpec(name, mixture[name], repeat=repeat) for name in ("geochat", "levir", "era")]


def test_training_lowers_loss_and_memorises(trained):
    cfg, result = trained
    losses = result.losses
    assert len(losses) == 80 and result.steps == 80
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert first > 4.0  # ~ln(vocab) for a random LLM
    assert last < first / 10

    log = [json.loads(line) for line in (cfg.output_dir / "loss_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 81))
    assert [e["loss"] for e in log] == pytest.approx(losses)
    # Warmup ceil(0.1 * 80) = 8 steps from 0, then cosine to 0.
    assert log[0]["lr"] == 0.0 and log[8]["lr"] == pytest.approx(3e-3)
    assert log[44]["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 36 / 72)))
    assert log[-1]["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 71 / 72)))
    assert (cfg.output_dir / "checkpoint-40" / "trainer_state.pt").is_file()
    summary = json.loads((cfg.output_dir / "train_summary.json").read_text())
    assert summary["steps"] == 80 and [d["samples_per_epoch"] for d in summary["datasets"]] == [8, 6, 6]

    model = UniRS.from_pretrained(cfg.output_dir, device="cpu")
    expected, got = [], []
    for colour, answer in IMAGES:
        expected.append(answer)
        got.append(model.answer(solid(colour), QUESTION))
    for before, after, square, caption in PAIRS:
        expected.append(caption)
        got.append(model.caption_change(solid(before), solid(after, square), prompt=CAPTION_PROMPT))
    events = []
    for k, (_, event) in enumerate(VIDEOS):
        expected.append(f"This is a video about {event}.")
        got.append(model.answer(video_frames(k), VIDEO_QUESTION, input_type="video"))
        result = model.classify_sequence(video_frames(k), ["flood", "fire", "police chase"], question=VIDEO_QUESTION)
        events.append((result.label, result.raw_text, result.method, result.score))
    # The seeded 80-step run memorises every one of the 10 samples (single-threaded CPU, greedy decoding).
    assert got == expected
    assert events == [(event, f"This is a video about {event}.", "substring", 1.0) for _, event in VIDEOS]


def test_frozen_modules_stay_bit_identical(trained, small_vila):
    cfg, _ = trained
    start = load_model_for_training(small_vila, cfg, torch.device("cpu"))  # change module at its seeded init
    final = UniRS.from_pretrained(cfg.output_dir, device="cpu")
    assert final.config.use_change_module and not final.config.train_change_module
    assert _bit_identical(_state(start.vision_tower), _state(final.vision_tower))
    assert _bit_identical(_state(start.mm_projector.single), _state(final.mm_projector.single))
    # Including the BatchNorm running statistics of the (frozen, eval-mode) change module.
    assert _bit_identical(_state(start.mm_projector.change), _state(final.mm_projector.change))
    assert not _bit_identical(_state(start.llm), _state(final.llm))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_is_bit_exact(small_vila, mixture, tmp_path, mode):
    """6 steps straight vs. 3 steps, checkpoint, resume for 3 more: identical weights and losses.

    10 samples per epoch with batch 2 x accum 2 (3 steps per epoch), so the resumed run starts
    exactly at an epoch boundary and crosses into the next epoch. LoRA runs with dropout and a
    trained change module (BN statistics), so the RNG state and the extra trained weights matter.
    """
    extra = (
        {"llm_mode": "lora", "lora_r": 4, "lora_dropout": 0.1, "train_change_module": True} if mode == "lora" else {}
    )
    base = TrainConfig(
        model_path=small_vila,
        output_dir=tmp_path / "a",
        datasets=_specs(mixture, 1),
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        learning_rate=1e-3,
        save_steps=3,
        progress=False,
        **extra,
    )
    straight = train(base, log=lambda m: None)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["consumed_in_epoch"]) == (3, 0, 10)
    if mode == "lora":
        assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
        assert any(k.startswith("mm_projector.layers.change.") for k in load_file(checkpoint / "trainable.safetensors"))
    else:
        assert (checkpoint / "llm").is_dir() and (checkpoint / "mm_projector").is_dir()
    resumed_cfg = dataclasses.replace(
        base, output_dir=tmp_path / "b", resume_from=checkpoint, datasets=_specs(mixture, 1)
    )
    resumed = train(resumed_cfg, log=lambda m: None)
    if mode == "full":  # resuming with another data set-up is refused
        other = dataclasses.replace(resumed_cfg, output_dir=tmp_path / "c", datasets=_specs(mixture, 2))
        with pytest.raises(ValueError, match="different data/batch set-up"):
            train(other, log=lambda m: None)
    assert resumed.losses == straight.losses[3:]
    a = UniRS.from_pretrained(tmp_path / "a", device="cpu")
    b = UniRS.from_pretrained(tmp_path / "b", device="cpu")
    assert _bit_identical(_state(a), _state(b))


def test_lora_adapters_save_and_merge(small_vila, mixture, tmp_path):
    cfg = TrainConfig(
        model_path=small_vila,
        output_dir=tmp_path / "lora",
        datasets=_specs(mixture, 1),
        max_steps=8,
        batch_size=4,
        grad_accum=1,
        learning_rate=1e-2,
        llm_mode="lora",
        lora_r=8,
        lora_alpha=16,
        train_change_module=True,
        gradient_checkpointing=True,
        save_steps=0,
        progress=False,
    )
    train(cfg, log=lambda m: None)
    adapter = cfg.output_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    adapter_keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert adapter_keys and all("lora_" in k for k in adapter_keys)

    start = load_model_for_training(small_vila, cfg, torch.device("cpu"))
    merged = UniRS.from_pretrained(cfg.output_dir, device="cpu")
    assert _bit_identical(_state(start.vision_tower), _state(merged.vision_tower))
    assert _bit_identical(_state(start.mm_projector.single), _state(merged.mm_projector.single))
    assert not _bit_identical(_state(start.mm_projector.change), _state(merged.mm_projector.change))  # trained
    assert not _bit_identical(_state(start.llm), _state(merged.llm))  # adapters merged in

    # The un-merged model (base + saved adapter + trained change module) computes the same loss.
    from peft import set_peft_model_state_dict

    unmerged = start
    apply_training_policy(unmerged, cfg)
    set_peft_model_state_dict(unmerged.llm, load_file(adapter / "adapter_model.safetensors"))
    unmerged.mm_projector.change.load_state_dict(merged.mm_projector.change.state_dict())
    builder = SampleBuilder(merged.config, merged.tokenizer, merged.image_processor)
    records = [load_dataset_records(spec)[0] for spec in _specs(mixture, 1)]
    batch = Collator()([builder(r) for r in records])
    unmerged.eval()
    merged.eval()
    with torch.no_grad():
        loss_a, n_a = batch_loss(unmerged, batch, None)
        loss_b, n_b = batch_loss(merged, batch, None)
    assert n_a == n_b > 0
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-4)


def test_bf16_path_with_lora(small_vila, mixture, tmp_path):
    """bf16 autocast with bf16 frozen weights (base LLM under LoRA, visual parts, BN buffers) and fp32 adapters."""
    cfg = TrainConfig(
        model_path=small_vila,
        output_dir=tmp_path / "bf16",
        datasets=_specs(mixture, 1),
        max_steps=2,
        batch_size=5,
        grad_accum=1,
        llm_mode="lora",
        lora_r=4,
        precision="bf16",
        save_steps=0,
        progress=False,
    )
    result = train(cfg, log=lambda m: None)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    model = UniRS.from_pretrained(cfg.output_dir, device="cpu")
    assert next(model.llm.parameters()).dtype == torch.float32  # save_dtype auto: fp32 on CPU


def test_cosine_schedule():
    f = cosine_schedule(10, 110)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert cosine_schedule(2, 10, "constant")(7) == 1.0


def test_train_config_validation(tmp_path):
    spec = [DatasetSpec("x", tmp_path / "x.json")]
    with pytest.raises(ValueError, match="llm_mode"):
        TrainConfig(tmp_path, tmp_path, spec, llm_mode="half")
    with pytest.raises(ValueError, match="train_change_module needs"):
        TrainConfig(tmp_path, tmp_path, spec, change_module=False, train_change_module=True)
    with pytest.raises(ValueError, match="No datasets"):
        TrainConfig(tmp_path, tmp_path, [])


def test_existing_checkpoints_need_resume_or_overwrite(trained, mixture):
    cfg, _ = trained  # its output dir holds checkpoint-40
    again = dataclasses.replace(cfg, datasets=_specs(mixture, 1), max_steps=1)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(again, log=lambda m: None)


def test_nothing_to_train_is_refused(small_vila, mixture, tmp_path):
    cfg = TrainConfig(small_vila, tmp_path / "x", _specs(mixture, 1), llm_mode="frozen", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="Nothing to train"):
        train(cfg, log=lambda m: None)


def test_cli_dry_run_counts_the_mixture_and_refuses_bad_input(mixture):
    runner = CliRunner()
    refused = runner.invoke(train_main, ["--model", str(mixture["era"].parent), "--output-dir", "unused", "--dry-run",
                                         "--llm", "half", "--dataset", f"geochat={mixture['geochat']}"])
    assert refused.exit_code == 2 and "Invalid value for '--llm': 'half' is not one of 'full', 'lora', 'frozen'." \
        in refused.output
    result = runner.invoke(
        train_main,
        [
            "--model",
            str(mixture["era"].parent),
            "--output-dir",
            "unused",
            "--dry-run",
            "--dataset",
            f"geochat={mixture['geochat']}",
            "--dataset",
            f"levir={mixture['levir']},type=pair",
            "--dataset",
            f"era={mixture['era']},type=video",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "49 samples per epoch" in result.output  # 4 x1 + 3 x5 + 3 x10
    mix_file = mixture["era"].parent / "mixture.json"
    mix_file.write_text(
        json.dumps(
            {
                "datasets": [
                    {"name": "geochat", "path": "geochat.json"},
                    {"name": "levir", "path": "levir.json", "type": "pair", "repeat": 2},
                ]
            }
        )
    )
    result = runner.invoke(
        train_main, ["--model", str(mix_file.parent), "--output-dir", "unused", "--dry-run", "--mixture", str(mix_file)]
    )
    assert result.exit_code == 0, result.output
    assert "10 samples per epoch" in result.output  # 4 x1 + 3 x2
    bad = mixture["era"].parent / "bad.json"
    bad.write_text(json.dumps([{"image": "img/0.png", "conversations": []}]))
    result = runner.invoke(
        train_main, ["--model", str(bad.parent), "--output-dir", "unused", "--dry-run", "--dataset", f"x={bad}"]
    )
    assert result.exit_code != 0 and "bad.json: record 0: 'conversations' must be a non-empty list" in result.output


def test_cli_trains_the_real_tiny_geometry(mixture, tmp_path):
    """`unirs-train` end to end on the `tiny` preset of the model library (384 px, 196 rows per image)."""
    from model.testing import write_random_checkpoint

    vila = write_random_checkpoint(tmp_path / "vila", layout="vila", preset="tiny")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        train_main,
        [
            "--model",
            str(vila),
            "--output-dir",
            str(out),
            "--dataset",
            f"geochat={mixture['geochat']}",
            "--dataset",
            f"levir={mixture['levir']},type=pair,repeat=1",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--save-steps",
            "0",
            "--no-progress",
            "--gradient-checkpointing",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 2
    model = UniRS.from_pretrained(out, device="cpu")
    assert model.config.use_change_module and model.config.tokens_per_image == 196
    assert len((out / "loss_log.jsonl").read_text().splitlines()) == 2

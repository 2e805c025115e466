"""Checkpoint layouts: save -> load, VILA remap, strict key checks, released-config recovery."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, UniRS, VisualInput
from model.conversation import build_prompt
from model.processing import tokenizer_image_token
from model.testing import random_image, write_random_checkpoint


def logits_for(model: UniRS, input_type: str = "pair") -> torch.Tensor:
    """LLM logits (1, T, V) for a fixed prompt and fixed images."""
    frames = {"image": 1, "pair": 2, "video": 8}[input_type]
    pixels = model.image_processor([random_image(k, (48, 64)) for k in range(frames)])
    prompt = build_prompt("Describe the changes.", model.config.num_placeholders(input_type), model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, model.tokenizer)])
    with torch.no_grad():
        return model(ids, [VisualInput(input_type, pixels)]).logits


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_layout_on_disk(unirs_ckpt, vila_ckpt):
    for ckpt in (unirs_ckpt, vila_ckpt):
        assert (ckpt / "llm" / "tokenizer.model").is_file()
        assert (ckpt / "llm" / "config.json").is_file()
        assert (ckpt / "vision_tower" / "preprocessor_config.json").is_file()
        assert all(k.startswith("vision_model.") for k in load_file(ckpt / "vision_tower" / "model.safetensors"))
    vila_keys = set(load_file(vila_ckpt / "mm_projector" / "model.safetensors"))
    assert vila_keys == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    unirs_keys = set(load_file(unirs_ckpt / "mm_projector" / "model.safetensors"))
    assert {"layers.single.2.weight", "layers.change.Conv1.weight", "layers.change.LN.left.7.running_var"} <= unirs_keys
    top = json.loads((vila_ckpt / "config.json").read_text())
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample" and "unirs" not in top


def test_save_load_gives_identical_logits(model, tmp_path):
    before = logits_for(model)
    model.save_pretrained(tmp_path / "again")
    reloaded = UniRS.from_pretrained(tmp_path / "again", device="cpu")
    assert torch.equal(logits_for(reloaded), before)
    assert reloaded.config.to_dict() == model.config.to_dict()


def test_change_module_settings_survive_save(tmp_path):
    ckpt = write_random_checkpoint(
        tmp_path / "hsa", layout="unirs", seed=2, cc_n_layers=1, cc_head=4, cc_attention_dim=16
    )
    model = UniRS.from_pretrained(ckpt, device="cpu")
    assert (model.config.cc_n_layers, model.config.cc_head, model.config.cc_attention_dim) == (1, 4, 16)
    reference = logits_for(model)
    model.save_pretrained(tmp_path / "saved")
    projector_cfg = json.loads((tmp_path / "saved" / "mm_projector" / "config.json").read_text())
    assert projector_cfg["cc_n_layers"] == 1 and projector_cfg["cc_head"] == 4
    assert torch.equal(logits_for(UniRS.from_pretrained(tmp_path / "saved", device="cpu")), reference)


def test_released_unirs_config_without_cc_keys_is_recovered_from_weights(tmp_path):
    ckpt = write_random_checkpoint(
        tmp_path / "released", layout="unirs", seed=2, cc_n_layers=1, cc_attention_dim=16, cc_head=2
    )
    reference = logits_for(UniRS.from_pretrained(ckpt, device="cpu"))
    # The released save_pretrained drops the cc_* settings; emulate that config.
    top = json.loads((ckpt / "config.json").read_text())
    top.pop("unirs")
    top["mm_projector_cfg"] = {"mm_projector_type": str(ckpt / "mm_projector"), "model_type": "v2l_projector"}
    (ckpt / "config.json").write_text(json.dumps(top))
    model = UniRS.from_pretrained(ckpt, device="cpu", cc_head=2)  # head count is not recoverable from weights
    assert model.config.use_change_module and model.config.cc_n_layers == 1 and model.config.cc_attention_dim == 16
    assert torch.equal(logits_for(model), reference)


def test_vila_layout_loads_with_projector_remap(vila_ckpt):
    model = UniRS.from_pretrained(vila_ckpt, device="cpu")
    assert not model.config.use_change_module
    assert model.config.image_aspect_ratio == "resize"  # VILA-1.5's own setting is kept
    on_disk = load_file(vila_ckpt / "mm_projector" / "model.safetensors")
    for index in (1, 2, 4):
        for param in ("weight", "bias"):
            assert torch.equal(
                model.mm_projector.single[index].get_parameter(param), on_disk[f"layers.{index}.{param}"]
            )
    # Without a change module a pair is two images (two placeholders).
    assert logits_for(model, "pair").shape[1] > 2 * 196
    assert logits_for(model, "image").shape[1] > 196


def test_missing_projector_key_fails_clearly(vila_ckpt, tmp_path):
    broken = copy_ckpt(vila_ckpt, tmp_path / "broken")
    state = load_file(broken / "mm_projector" / "model.safetensors")
    del state["layers.2.bias"]
    save_file(state, str(broken / "mm_projector" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"Missing keys \(1\): mm_projector\.layers\.single\.2\.bias"):
        UniRS.from_pretrained(broken, device="cpu")
    # Explicitly allowed: loads (the bias keeps its init).
    UniRS.from_pretrained(broken, device="cpu", allow_missing_keys=["mm_projector.layers.single.2.bias"])


def test_unexpected_and_llm_keys_fail_clearly(unirs_ckpt, tmp_path):
    broken = copy_ckpt(unirs_ckpt, tmp_path / "extra")
    state = load_file(broken / "mm_projector" / "model.safetensors")
    state["layers.change.extra.weight"] = torch.zeros(2)
    save_file(state, str(broken / "mm_projector" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"Unexpected keys \(1\): mm_projector\.layers\.change\.extra\.weight"):
        UniRS.from_pretrained(broken, device="cpu")

    no_head = copy_ckpt(unirs_ckpt, tmp_path / "nohead")
    state = load_file(no_head / "llm" / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, str(no_head / "llm" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"llm\.lm_head\.weight"):
        UniRS.from_pretrained(no_head, device="cpu")


def test_vila_checkpoint_as_unirs_needs_explicit_permission_for_the_change_module(vila_ckpt):
    with pytest.raises(CheckpointError, match=r"mm_projector\.layers\.change\.Conv1\.weight"):
        UniRS.from_pretrained(vila_ckpt, device="cpu", use_change_module=True)
    model = UniRS.from_pretrained(
        vila_ckpt, device="cpu", use_change_module=True, allow_missing_keys=["mm_projector.layers.change.*"]
    )
    assert model.config.use_change_module and logits_for(model, "pair").shape[1] < 2 * 196


def test_random_checkpoints_are_deterministic(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", layout="unirs", seed=5)
    b = write_random_checkpoint(tmp_path / "b", layout="unirs", seed=5)
    for part in (
        "llm/model.safetensors",
        "vision_tower/model.safetensors",
        "mm_projector/model.safetensors",
        "llm/tokenizer.model",
    ):
        assert (a / part).read_bytes() == (b / part).read_bytes(), part


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a VILA/UniRS checkpoint"):
        UniRS.from_pretrained(tmp_path, device="cpu")

"""Architecture pieces: DownSampleBlock order, change module, projector routing, vision tower, config."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from model import InputType, UniRSConfig, VisualInput
from model.modeling_unirs import ChangeExtractionModule, DownSampleBlock, UniRSMultimodalProjector
from model.testing import build_random_model


def tiny_config(**overrides) -> UniRSConfig:
    return UniRSConfig.from_preset("tiny", vocab_size=512, **overrides)


# ---------------------------------------------------------------------------- DownSampleBlock
def test_downsample_hand_computed_3x3_grid():
    # 3x3 grid, token n = r * 3 + c, two channels (n + 1, -(n + 1)).
    values = torch.arange(1, 10, dtype=torch.float32)
    x = torch.stack([values, -values], dim=-1).unsqueeze(0)  # (1, 9, 2)
    out = DownSampleBlock()(x)
    assert out.shape == (1, 4, 8)
    # Output token t = j * 2 + i covers rows 2i..2i+1, cols 2j..2j+1; channel blocks in the order
    # (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1); the padded row/column is zero.
    expected_tokens = [
        [1, 2, 4, 5],  # t=0: i=0, j=0
        [7, 8, 0, 0],  # t=1: i=1, j=0 (column-major)
        [3, 0, 6, 0],  # t=2: i=0, j=1
        [9, 0, 0, 0],  # t=3: i=1, j=1
    ]
    expected = torch.tensor(
        [[v for cell in tok for v in (cell, -cell)] for tok in expected_tokens], dtype=torch.float32
    )
    assert torch.equal(out[0], expected)


def test_downsample_27x27_to_196_tokens_with_4c_channels():
    x = torch.randn(2, 729, 5)
    out = DownSampleBlock()(x)
    assert out.shape == (2, 196, 20)
    grid = x.view(2, 27, 27, 5)
    # token t = j * 14 + i <- block at rows 2i, 2i+1 and cols 2j, 2j+1
    i, j = 3, 7
    t = j * 14 + i
    assert torch.equal(out[:, t, 0:5], grid[:, 2 * i, 2 * j])
    assert torch.equal(out[:, t, 5:10], grid[:, 2 * i, 2 * j + 1])
    assert torch.equal(out[:, t, 10:15], grid[:, 2 * i + 1, 2 * j])
    assert torch.equal(out[:, t, 15:20], grid[:, 2 * i + 1, 2 * j + 1])
    # Last row/column are the zero padding.
    assert torch.equal(out[:, 13 * 14 + 13, 5:], torch.zeros(2, 15))


# ---------------------------------------------------------------------------- change module
def _released_attentive_encoder(module: ChangeExtractionModule, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
    """Line-by-line port of the released `AttentiveEncoder.forward` (model_encoder.py@476abda), einops removed."""
    batch, _, dep = img1.shape
    h = w = module.grid
    pos_h, pos_w = torch.arange(h), torch.arange(w)
    embed_h = module.w_embedding(pos_h)
    embed_w = module.h_embedding(pos_w)
    pos = torch.cat([embed_w.unsqueeze(0).repeat(h, 1, 1), embed_h.unsqueeze(1).repeat(1, w, 1)], dim=-1)
    pos = pos.permute(2, 0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)
    pos = pos.view(batch, dep, -1).transpose(-1, 1)
    img1, img2 = img1 + pos, img2 + pos
    sa1, sa2 = img1, img2

    def att(block, x):
        a = block.att
        b_, n, _ = x.shape

        def heads(t):
            return t.view(b_, n, a.heads, -1).permute(0, 2, 1, 3)

        q, k, v = heads(a.to_q(x)), heads(a.to_k(x)), heads(a.to_k(x))
        out = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * a.scale, dim=-1), v)
        out = a.to_out(out.permute(0, 2, 1, 3).reshape(b_, n, -1))
        x = block.norm1(out + x)
        return block.norm2(block.feedforward(x) + x)

    for layer, joint in module.selftrans:
        sa1 = att(layer, sa1) + sa1
        sa2 = att(layer, sa2) + sa2
        both = att(joint, torch.cat([sa1, sa2], dim=-1))
        sa1, sa2 = both[:, :, :dep] + img1, both[:, :, dep:] + img2
    m1 = sa1.reshape(batch, h, w, dep).permute(0, 3, 1, 2)
    m2 = sa2.reshape(batch, h, w, dep).permute(0, 3, 1, 2)
    x = torch.cat([m1, m2], dim=1) + module.cos(m1, m2).unsqueeze(1)
    x = module.LN(module.Conv1(x))
    return x.view(batch, x.size(1), -1).permute(0, 2, 1)


@pytest.mark.parametrize("n_layers", [0, 1])
def test_change_module_matches_released_forward(n_layers):
    module = ChangeExtractionModule(tiny_config(cc_n_layers=n_layers)).eval()
    f1, f2 = torch.randn(2, 1, 729, 64).unbind(0)
    with torch.no_grad():
        assert torch.allclose(module(f1, f2), _released_attentive_encoder(module, f1, f2), atol=1e-5)


def test_change_module_identical_inputs_give_cosine_one_and_swap_changes_output():
    module = ChangeExtractionModule(tiny_config()).eval()
    f1, f2 = torch.randn(2, 1, 729, 64).unbind(0)
    with torch.no_grad():
        out, cosine = module(f1, f1, return_cosine=True)
        assert out.shape == (1, 729, 64)
        assert cosine.shape == (1, 27, 27)
        assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6)
        _, cos_diff = module(f1, f2, return_cosine=True)
        assert cos_diff.abs().max() < 0.9
        assert not torch.allclose(module(f1, f2), module(f2, f1), atol=1e-4)


def test_change_module_position_table_order():
    module = ChangeExtractionModule(tiny_config())
    table = module.position_table()
    r, c = 4, 19
    n = r * 27 + c  # SigLIP emits tokens row-major
    assert torch.equal(table[n, :32], module.h_embedding.weight[c])  # first half indexes the column
    assert torch.equal(table[n, 32:], module.w_embedding.weight[r])  # second half the row


def test_change_module_parameters_and_init():
    module = ChangeExtractionModule(tiny_config())
    keys = set(module.state_dict())
    assert {"h_embedding.weight", "Conv1.weight", "LN.left.0.weight", "LN.left.7.running_var"} <= keys
    assert module.Conv1.weight.shape == (64, 128, 1, 1)
    assert module.LN.left[3].weight.shape == (32, 32, 3, 3)
    # Seeded xavier init: reproducible, BatchNorm at its defaults.
    again = ChangeExtractionModule(tiny_config())
    assert all(
        torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values(), strict=False)
    )
    assert torch.equal(module.LN.left[1].running_mean, torch.zeros(32))


# ---------------------------------------------------------------------------- projector routing
def test_projector_routes_by_explicit_type():
    config = tiny_config()
    projector = UniRSMultimodalProjector(config).eval()
    feats = torch.randn(1 + 2 + 8, 729, 64)
    with torch.no_grad():
        out = projector(feats, [InputType.IMAGE, InputType.PAIR, InputType.VIDEO])
        assert [o.shape for o in out] == [(1, 196, 256), (1, 196, 256), (8, 196, 256)]
        pair = projector.single(projector.change(feats[1:2], feats[2:3]))
        assert torch.allclose(out[1], pair, atol=1e-5)
        assert torch.allclose(out[2], projector.single(feats[3:]), atol=1e-5)
    with pytest.raises(ValueError):
        projector(feats, [InputType.IMAGE, InputType.PAIR])


def test_video_with_two_frames_is_not_mistaken_for_a_pair():
    # With num_video_frames == 2, routing by count (as released) would send videos through the change module.
    config = tiny_config(num_video_frames=2)
    projector = UniRSMultimodalProjector(config).eval()
    feats = torch.randn(2, 729, 64)
    with torch.no_grad():
        video = projector(feats, [InputType.VIDEO])[0]
        assert video.shape == (2, 196, 256)
        assert torch.allclose(video, projector.single(feats), atol=1e-6)


def test_pairs_are_interleaved_in_batches():
    model = build_random_model(tiny_config(), seed=3)
    pixels = torch.randn(4, 3, 384, 384)  # before0, after0, before1, after1
    pairs = [VisualInput("pair", pixels[0:2]), VisualInput("pair", pixels[2:4])]
    with torch.no_grad():
        batched = model.encode_visual_inputs(pairs)
        alone = [model.encode_visual_inputs([p])[0] for p in pairs]
        crossed = model.encode_visual_inputs([VisualInput("pair", pixels[[0, 2]])])[0]
    for b, a in zip(batched, alone, strict=False):
        assert torch.allclose(b, a, atol=1e-5)
    # The released eval script's [all before; all after] order would pair before0 with before1.
    assert not torch.allclose(batched[0], crossed, atol=1e-3)


def test_vision_tower_equals_hidden_states_minus_two():
    model = build_random_model(tiny_config(), seed=0)
    pixels = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        reference = model.vision_tower.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(model.vision_tower(pixels), reference)
    assert reference.shape == (2, 729, 64)


def test_frozen_parts_stay_in_eval_mode_when_training():
    model = build_random_model(tiny_config(), seed=0)
    model.train()
    assert model.llm.training
    assert not model.vision_tower.training and not model.mm_projector.training
    assert not any(p.requires_grad for p in model.mm_projector.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())


# ---------------------------------------------------------------------------- config
def test_config_json_round_trip(tmp_path):
    config = tiny_config(cc_n_layers=2, cc_head=4, image_aspect_ratio="resize", clue_max_new_tokens=7)
    config.to_json_file(tmp_path / "c.json")
    again = UniRSConfig.from_json_file(tmp_path / "c.json")
    assert again.to_dict() == config.to_dict()
    vila = json.loads(json.dumps(config.to_vila_dict()))
    assert vila["mm_projector_cfg"]["cc_n_layers"] == 2 and vila["num_video_frames"] == 8
    assert UniRSConfig.from_vila_dict(vila).to_dict() == config.to_dict()


def test_config_defaults_and_validation():
    config = UniRSConfig.from_preset("unirs-3b")
    assert (config.mm_hidden_size, config.hidden_size, config.grid_size) == (1152, 2560, 27)
    assert (config.num_vision_tokens, config.tokens_per_image) == (729, 196)
    assert config.mm_vision_select_layer == -2 and config.vision_layers_to_run == 26
    assert config.num_video_frames == 8 and config.cc_n_layers == 0
    with pytest.raises(ValueError, match="cls_patch"):
        tiny_config(mm_vision_select_feature="patch")
    assert config.num_placeholders("pair") == 1
    assert tiny_config(use_change_module=False).num_placeholders("pair") == 2


def test_tiny_preset_is_a_few_million_parameters():
    model = build_random_model(tiny_config(), seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 1e7
    assert isinstance(model.mm_projector.single[3], nn.GELU)

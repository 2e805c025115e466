"""Dataset readers (validation), mixture, sampler, sample building and collation."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from model.training.collate import Collator, SampleBuilder, load_visual_frames
from model.training.data import (
    DatasetFormatError,
    DatasetSpec,
    InterleavedSampler,
    MixtureDataset,
    interleave_evenly,
    load_dataset_records,
    parse_dataset_spec,
)

from .synthetic import CAPTION_PROMPT, VIDEO_FRAMES, solid


def _conv(question="<image>\nQ?", answer="A."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def media(tmp_path):
    solid((1, 2, 3)).save(tmp_path / "a.png")
    solid((4, 5, 6)).save(tmp_path / "b.png")
    (tmp_path / "frames").mkdir()
    for k in range(6):
        solid((k, k, k)).save(tmp_path / "frames" / f"{k:02d}.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    return tmp_path


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_reader_accepts_all_input_types(media):
    path = _write(
        media / "d.json",
        [
            {"id": "i", "image": "a.png", "conversations": _conv("Q?\n<image>")},
            {"id": "p", "image": ["a.png", "b.png"], "conversations": _conv()},
            {"id": "p2", "image": "a.png###b.png", "conversations": _conv()},
            {"id": "v", "video": "frames", "conversations": _conv("<video>\nWhat?")},
            {"id": "v2", "image": "frames", "conversations": _conv()},  # a folder under "image" is a video
            {"id": "v3", "video": "clip.mp4", "conversations": _conv()},
            {"id": "t", "conversations": _conv("Just text?", "Yes.") + _conv("More?", "No."), "clue": "c"},
        ],
    )
    recs = load_dataset_records(DatasetSpec("x", path))
    assert [r.input_type for r in recs] == ["image", "pair", "pair", "video", "video", "video", None]
    assert recs[0].turns == [("Q? <image>", "A.")]  # kept where the data put it (released preprocess_multimodal)
    assert recs[1].turns == [("Q?", "A.")] and recs[3].turns == [("What?", "A.")]  # leading / video: removed
    assert recs[1].media == [media / "a.png", media / "b.png"] == recs[2].media
    assert recs[6].turns == [("Just text?", "Yes."), ("More?", "No.")] and recs[6].clue == "c"
    assert load_dataset_records(DatasetSpec("x", path, use_clues=False))[6].clue is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("not a dict", "expected a JSON object"),
        ({"image": "a.png"}, "'conversations' must be a non-empty list"),
        ({"image": "a.png", "conversations": _conv()[:1]}, "must alternate human/gpt"),
        ({"image": "a.png", "conversations": list(reversed(_conv()))}, "expected human"),
        (
            {"image": "a.png", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]},
            "must be an object with 'from' and a string 'value'",
        ),
        ({"image": "a.png", "conversations": _conv(answer="  ")}, r"\(the answer\) is empty"),
        ({"image": "a.png", "conversations": _conv(answer="<image> A")}, "contains an <image>"),
        ({"image": "missing.png", "conversations": _conv()}, "media file .*missing.png not found"),
        ({"image": 5, "conversations": _conv()}, "'image' must be a path or a list of paths"),
        ({"image": ["a.png", ""], "conversations": _conv()}, "non-empty list of paths"),
        ({"video": "empty", "conversations": _conv()}, "contains no image files"),
        ({"video": "a.png", "conversations": _conv()}, "neither a frame folder nor a video file"),
        ({"image": "a.png", "conversations": _conv(), "clue": 3}, "'clue' must be a string"),
        ({"image": "a.png", "conversations": _conv("<image>")}, "the first instruction is empty"),
        ({"image": "a.png", "conversations": _conv("<image> Q? <image>")}, "takes one <image> placeholder"),
    ],
)
def test_reader_rejects_malformed_records_with_file_and_index(media, record, message):
    good = {"id": "ok", "image": "a.png", "conversations": _conv()}
    path = _write(media / "bad.json", [good, good, record])
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_dataset_records(DatasetSpec("x", path))
    assert str(info.value).startswith(f"{path}: record 2")


def test_reader_forced_type_and_file_errors(media):
    path = _write(media / "d.json", [{"id": "q", "image": ["a.png", "b.png"], "conversations": _conv()}])
    with pytest.raises(DatasetFormatError, match=r"record 0 \(id='q'\): dataset type is 'image'"):
        load_dataset_records(DatasetSpec("x", path, input_type="image"))
    frames = _write(
        media / "f.json", [{"image": ["frames/00.png", "frames/01.png", "frames/02.png"], "conversations": _conv()}]
    )
    assert load_dataset_records(DatasetSpec("x", frames, input_type="video"))[0].input_type == "video"
    assert load_dataset_records(DatasetSpec("x", frames))[0].input_type == "video"  # > 2 images
    (media / "broken.json").write_text("[{")
    with pytest.raises(DatasetFormatError, match=r"broken\.json: invalid JSON"):
        load_dataset_records(DatasetSpec("x", media / "broken.json"))
    (media / "obj.json").write_text("{}")
    with pytest.raises(DatasetFormatError, match="expected a JSON list"):
        load_dataset_records(DatasetSpec("x", media / "obj.json"))
    (media / "lines.jsonl").write_text(json.dumps({"image": "a.png", "conversations": _conv()}) + "\n{oops\n")
    with pytest.raises(DatasetFormatError, match=r"lines\.jsonl: line 2: invalid JSON"):
        load_dataset_records(DatasetSpec("x", media / "lines.jsonl"))


def test_media_root_and_dataset_spec_parsing(media, tmp_path_factory):
    other = tmp_path_factory.mktemp("json")
    path = _write(other / "d.json", [{"image": "a.png", "conversations": _conv()}])
    with pytest.raises(DatasetFormatError, match="not found"):
        load_dataset_records(DatasetSpec("x", path))
    assert load_dataset_records(DatasetSpec("x", path, media_root=media))[0].media == [media / "a.png"]
    spec = parse_dataset_spec(f"levir={path},root={media},type=pair,clues=no")
    assert (spec.name, spec.path, spec.media_root, spec.input_type, spec.repeat, spec.use_clues) == (
        "levir",
        path,
        media,
        "pair",
        5,
        False,
    )
    assert parse_dataset_spec("era=x.json").repeat == 10
    assert parse_dataset_spec("geochat=x.json").repeat == 1
    assert parse_dataset_spec("other=x.json,repeat=3").repeat == 3
    for bad in ("nopath", "a=b,colour=red", "a=b,type=audio", "a=b,repeat=0"):
        with pytest.raises(ValueError):
            parse_dataset_spec(bad)


def test_video_files_need_an_optional_decoder(media):
    rec = load_dataset_records(
        DatasetSpec("x", _write(media / "v.json", [{"video": "clip.mp4", "conversations": _conv()}]))
    )[0]
    try:
        import av  # noqa: F401
    except ImportError:
        try:
            import imageio  # noqa: F401
        except ImportError:
            with pytest.raises(RuntimeError, match=r"needs PyAV or imageio.*pip install av"):
                load_visual_frames(rec, VIDEO_FRAMES)
            return
    pytest.skip("a video decoder is installed")


def test_frame_folder_sampling_matches_vila(media):
    rec = load_dataset_records(
        DatasetSpec("x", _write(media / "v.json", [{"video": "frames", "conversations": _conv()}]))
    )[0]
    frames = load_visual_frames(rec, 4)
    # 6 frames, N = 4: np.linspace(0, 4, 4, dtype=int) = [0, 1, 2, 4] (VILA's sampler).
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [0, 1, 2, 4]
    frames = load_visual_frames(rec, 8)  # short clip: left-padded with black frames
    assert len(frames) == 8 and np.asarray(frames[0]).max() == 0


def test_interleave_evenly():
    groups = [list(range(100, 106)), list(range(200, 203)), [300]]
    out = interleave_evenly(groups)
    assert sorted(out) == sorted(x for g in groups for x in g)
    # 10 slots. Group of 6 first: slots floor(j * 10 / 6) = 0, 1, 3, 5, 6, 8; free 2, 4, 7, 9.
    # Group of 3: free[floor(j * 4 / 3)] = free[0, 1, 2] = 2, 4, 7; the last one takes slot 9.
    assert out == [100, 101, 200, 102, 201, 103, 104, 202, 105, 300]
    for g in groups:  # each group keeps its order
        assert [x for x in out if x in g] == g
    # Large groups are spread evenly: between consecutive items of a group of 10 in 100 slots, ~10 apart.
    big = interleave_evenly([list(range(90)), list(range(1000, 1010))])
    pos = [i for i, x in enumerate(big) if x >= 1000]
    assert all(8 <= b - a <= 12 for a, b in itertools.pairwise(pos))


def test_sampler_shuffles_members_independently_and_resumes():
    sampler = InterleavedSampler([5, 5, 3], seed=1)
    first = sampler.epoch_order(0)
    assert sorted(first) == list(range(13))
    assert first == InterleavedSampler([5, 5, 3], seed=1).epoch_order(0)  # deterministic
    assert first != sampler.epoch_order(1)  # reshuffled every epoch
    copy_a = [x for x in first if x < 5]
    copy_b = [x - 5 for x in first if 5 <= x < 10]
    assert copy_a != copy_b  # two copies of one dataset are shuffled differently
    sampler.set_epoch(0, start_index=4)
    assert list(sampler) == first[4:] and len(sampler) == 9
    ranks = [InterleavedSampler([5, 5, 3], seed=1, world_size=2, rank=r).epoch_order(0) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 2 + 2 + 1


def test_mixture_repeats_and_interleaves(mixture):
    specs = [
        DatasetSpec("geochat", mixture["geochat"]),
        DatasetSpec("levir", mixture["levir"]),
        DatasetSpec("era", mixture["era"]),
    ]
    mix = MixtureDataset(specs)
    assert mix.member_sizes == [4] + [3] * 5 + [3] * 10  # geochat x1, levir x5, era x10
    assert len(mix) == 4 + 15 + 30
    assert mix.member_datasets == [0] + [1] * 5 + [2] * 10
    order = InterleavedSampler(mix.member_sizes, seed=0, member_groups=mix.member_datasets).epoch_order(0)
    types = [mix.record(i).input_type for i in order]
    assert Counter(types) == {"image": 4, "pair": 15, "video": 30}
    # Datasets evenly interleaved: pairs are 15 of 49 samples, one about every 3.3 slots.
    assert all("pair" in types[i : i + 5] for i in range(len(types) - 5))
    assert all("image" in types[i : i + 13] for i in range(len(types) - 13))
    # Every record appears exactly `repeat` times, and each levir copy is a full pass.
    assert Counter(order) == dict.fromkeys(range(len(mix)), 1)
    levir = [mix.record(i).record_id for i in order if mix.record(i).input_type == "pair"]
    assert all(sorted(levir[k : k + 3]) == ["pair0", "pair1", "pair2"] for k in range(0, 15, 3))
    # VILA's per-copy order is available too.
    vila = InterleavedSampler(mix.member_sizes, seed=0).epoch_order(0)
    assert sorted(vila) == sorted(order) and vila != order


def _tokenizer_and_config(small_vila):
    from model import UniRS
    from model.checkpoint import load_unirs

    model = load_unirs(
        UniRS, small_vila, device="cpu", use_change_module=True, allow_missing_keys=["mm_projector.layers.change.*"]
    )
    return model


def test_sample_builder_masks_prompt_and_merges_clue(small_vila, mixture, tmp_path):
    from model.conversation import build_augmented_instruction

    model = _tokenizer_and_config(small_vila)
    cfg, tok = model.config, model.tokenizer
    records = json.loads(mixture["levir"].read_text())
    records[0]["clue"] = "Two grey images."
    path = tmp_path / "levir_plus.json"
    path.write_text(json.dumps(records))
    for f in ("levir",):
        (tmp_path / f).symlink_to(mixture["levir"].parent / f)
    rec = load_dataset_records(DatasetSpec("levir", path))[0]
    builder = SampleBuilder(cfg, tok, model.image_processor, max_length=4096)
    sample = builder(rec)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids.count(cfg.image_token_index) == 1  # a pair is ONE placeholder (196 rows after the change module)
    assert sample["pixel_values"].shape == (2, 3, 56, 56)
    supervised = [t for t, y in zip(ids, labels, strict=True) if y != -100]
    assert tok.decode(supervised) == "There is no change between the two images.</s>"
    prompt = tok.decode([t for t in ids if t >= 0])
    augmented = build_augmented_instruction(CAPTION_PROMPT, "Two grey images.", "pair", cfg)
    assert augmented.startswith("<clue>Two grey images.</clue>\n[change] ")
    assert augmented in prompt and prompt.rstrip().endswith("ASSISTANT: There is no change between the two images.</s>")
    # Without the clue the instruction is unchanged.
    plain = SampleBuilder(cfg, tok, model.image_processor)(
        load_dataset_records(DatasetSpec("l", path, use_clues=False))[0]
    )
    assert "<clue>" not in tok.decode([t for t in plain["input_ids"].tolist() if t >= 0])
    # Video: num_video_frames placeholders, one frame each.
    era = load_dataset_records(DatasetSpec("era", mixture["era"]))[0]
    video = builder(era)
    assert video["input_ids"].tolist().count(cfg.image_token_index) == VIDEO_FRAMES
    assert video["pixel_values"].shape == (VIDEO_FRAMES, 3, 56, 56)
    # Truncation: text is cut at the end; a sample whose visual rows would be cut is refused.
    rows = len(ids) - 1 + cfg.tokens_per_image
    cut = SampleBuilder(cfg, tok, model.image_processor, max_length=rows - 3)(rec)
    assert cut["truncated"] and len(cut["input_ids"]) == len(ids) - 3
    with pytest.raises(ValueError, match="exceed max_length"):
        SampleBuilder(cfg, tok, model.image_processor, max_length=10)(rec)
    batch = Collator(pad_token_id=0)([sample, video])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).tolist() == [len(ids), len(video["input_ids"])]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert [t.value for t in batch["input_types"]] == ["pair", "video"]
    assert torch.equal(batch["pixel_values"][0], sample["pixel_values"])


@pytest.mark.parametrize(
    ("value", "instruction"),
    [
        ("What is in <image> this picture?", "What is in <image>\nthis picture?"),
        ("Q?\n<image>", "Q? <image>"),
        ("  <image>Q?", "Q?"),  # opens the turn: removed here, put back at the front by the builder
        ("Q?", "Q?"),  # no placeholder: the builder prepends one, as preprocess_multimodal does
    ],
)
def test_reader_keeps_an_image_placeholder_where_the_released_code_leaves_it(media, value, instruction):
    """UniRS `preprocess_multimodal` (llava/data/dataset.py@476abda) prepends `<image>\\n` only when the
    conversation has none; an existing one stays in place (text around it stripped, a space before it
    and a newline after it). The earlier reader moved every placeholder to the front."""
    path = _write(media / "d.json", [{"image": "a.png", "conversations": _conv(value)}])
    assert load_dataset_records(DatasetSpec("x", path))[0].turns == [(instruction, "A.")]


def test_sample_builder_tokenises_the_placeholder_in_place(small_vila, media):
    model = _tokenizer_and_config(small_vila)
    cfg, tok = model.config, model.tokenizer
    records = [
        {"id": "mid", "image": "a.png", "conversations": _conv("Q? <image> Which colour?")},
        {"id": "second", "image": "a.png", "conversations": _conv("Hi.", "Hello.") + _conv("<image> Q?", "A.")},
        {"id": "front", "image": "a.png", "conversations": _conv("<image>\nQ?")},
        {"id": "video", "video": "frames", "conversations": _conv("Q? <video>")},
    ]
    recs = load_dataset_records(DatasetSpec("x", _write(media / "d.json", records)))
    builder = SampleBuilder(cfg, tok, model.image_processor)

    def around_placeholder(ids):
        k = ids.index(cfg.image_token_index)
        return tok.decode(ids[:k]).strip(), tok.decode(ids[k + 1 :]).strip()

    mid = builder(recs[0])["input_ids"].tolist()
    assert mid.count(cfg.image_token_index) == 1
    before, after = around_placeholder(mid)
    assert before.endswith("USER: Q?") and after.startswith("Which colour? ASSISTANT: A.")
    second = builder(recs[1])["input_ids"].tolist()
    before, after = around_placeholder(second)  # the first turn gets no placeholder
    assert before.endswith("ASSISTANT: Hello.</s>USER:") and after.startswith("Q? ASSISTANT: A.")
    front = builder(recs[2])["input_ids"].tolist()
    before, after = around_placeholder(front)
    assert before.endswith("USER:") and after.startswith("Q? ASSISTANT: A.")
    video = builder(recs[3])["input_ids"].tolist()
    assert video.count(cfg.image_token_index) == VIDEO_FRAMES  # ERA: stripped, then 8 at the front
    assert tok.decode([t for t in video[video.index(cfg.image_token_index) - 3 :] if t >= 0]).startswith("USER:")

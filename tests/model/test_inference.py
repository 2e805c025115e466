"""Inference: shapes and token order per input type, labels, batched prefix-shared generation, prompt augmentation.

Generated text is checked against `reference_greedy`, an independent decoder (full recomputation each
step, no KV cache, no batching), so a wrong splice, cache or batch row shows up as different tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

import model.inference as inference_module
from model import CheckpointError, InputType, UniRS, VisualInput, match_class
from model.configuration_unirs import DEFAULT_SYSTEM_PROMPT
from model.conversation import build_clue_prompt, build_prompt, clean_clue
from model.generation import generate_from_embeddings
from model.processing import build_supervised_example, tokenizer_image_token
from model.testing import random_image, write_random_checkpoint

QUESTIONS = [
    "Has any new building been constructed?",
    "Trees?",
    "Is there any change in the water area near the river?",
]


def reference_greedy(model, prompt, blocks, max_new_tokens, llm=None):
    """Greedy decoding the slow way: the whole sequence through the LLM at every step, argmax, stop at EOS."""
    llm = llm if llm is not None else model.llm
    table = llm.get_input_embeddings()
    embeds = model.embed_prompt(tokenizer_image_token(prompt, model.tokenizer), blocks, table)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(llm(inputs_embeds=embeds[None]).logits[0, -1].argmax())
            if token == model.tokenizer.eos_token_id:
                break
            out.append(token)
            embeds = torch.cat([embeds, table(torch.tensor([token]))])
    return model.tokenizer.decode(out, skip_special_tokens=True).strip()


def pair_blocks(model, before, after):
    return model.encode([model.prepare_visual((before, after), "pair")])[0].blocks


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(("input_type", "frames", "blocks"), [("image", 1, 1), ("pair", 2, 1), ("video", 8, 8)])
def test_shapes_per_input_type(model, input_type, frames, blocks):
    d = model.config.hidden_size
    pixels = model.image_processor([random_image(k, (40, 56)) for k in range(frames)])
    assert pixels.shape == (frames, 3, 384, 384)
    with torch.no_grad():
        encoded, features = model.encode_visual_inputs([VisualInput(input_type, pixels)], return_features=True)
        assert features[0].shape == (frames, 729, model.config.mm_hidden_size)
        assert encoded[0].shape == (blocks, 196, d)
        prompt = build_prompt("What is it?", model.config.num_placeholders(input_type), model.config)
        ids = tokenizer_image_token(prompt, model.tokenizer)
        # Token order (spec 3.2 / 1.3): BOS, "{system} USER: ", then one -200 per block, each followed by "\n".
        marks = [i for i, t in enumerate(ids) if t == -200]
        assert len(marks) == blocks and ids[0] == model.tokenizer.bos_token_id
        decode = model.tokenizer.decode
        assert decode(ids[1 : marks[0]]) == f"{DEFAULT_SYSTEM_PROMPT} USER: "
        assert [decode(ids[a + 1 : b]) for a, b in itertools.pairwise(marks)] == ["\n"] * (blocks - 1)
        assert decode(ids[marks[-1] + 1 :]) == "\nWhat is it? ASSISTANT:"
        embeds = model.embed_prompt(ids, encoded[0])
        assert embeds.shape == (len(ids) - blocks + 196 * blocks, d)
        # Block j replaces placeholder j: rows start at marks[j] + 195 * j; the text rows are the token embeddings.
        for j, mark in enumerate(marks):
            assert torch.equal(embeds[mark + 195 * j : mark + 195 * j + 196], encoded[0][j])
        table = model.llm.get_input_embeddings()
        assert torch.equal(embeds[: marks[0]], table(torch.tensor(ids[: marks[0]])))
        assert torch.equal(embeds[-(len(ids) - marks[-1] - 1) :], table(torch.tensor(ids[marks[-1] + 1 :])))
        logits = model(torch.tensor([ids]), [VisualInput(input_type, pixels)]).logits
        assert logits.shape == (1, embeds.shape[0], model.config.text_config.vocab_size)
        assert torch.allclose(logits[0], model.llm(inputs_embeds=embeds[None]).logits[0], atol=1e-5)


def test_placeholder_count_must_match(model):
    blocks = torch.zeros(2, 196, model.config.hidden_size)
    with pytest.raises(ValueError, match="placeholders"):
        model.embed_prompt([1, 5, -200, 6], blocks)


def test_labels_ignore_visual_and_prompt_positions(unirs_ckpt):
    model = UniRS.from_pretrained(unirs_ckpt, device="cpu")
    ids, labels = build_supervised_example([("Describe the changes.", "A new road.")], model.tokenizer, 1, model.config)
    pixels = model.image_processor([random_image(0), random_image(1)])
    batch_ids = torch.tensor([ids, [*ids, 0, 0]][:1])
    prepared = model.prepare_inputs_for_llm(
        batch_ids, model.encode_visual_inputs([VisualInput("pair", pixels)]), labels=torch.tensor([labels])
    )
    out_labels = prepared["labels"][0]
    k = ids.index(-200)
    assert (out_labels[k : k + 196] == -100).all()  # visual rows
    assert (out_labels[:k] == -100).all()  # system prompt and "USER:"
    supervised = out_labels[out_labels != -100].tolist()
    assert supervised == [x for x, lab in zip(ids, labels, strict=False) if lab != -100]
    assert model.tokenizer.decode(supervised).startswith("A new road.")

    model.train()
    out = model(torch.tensor([ids]), [VisualInput("pair", pixels)], labels=torch.tensor([labels]))
    # Next-token cross-entropy on the supervised positions only (shifted by one).
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], out_labels[1:], ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.loss.item() > 1.0  # a random LLM over a 512-token vocabulary: far from zero
    out.loss.backward()
    assert model.llm.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.mm_projector.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_training_batch_is_right_padded(model):
    ids_a = tokenizer_image_token(build_prompt("short", 1, model.config), model.tokenizer)
    ids_b = tokenizer_image_token(
        build_prompt("a much longer question about the scene", 1, model.config), model.tokenizer
    )
    width = max(len(ids_a), len(ids_b))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate((ids_a, ids_b)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    pixels = model.image_processor([random_image(0)])
    visual = [VisualInput("image", pixels), VisualInput("image", pixels)]
    with torch.no_grad():
        batched = model(ids, visual, attention_mask=mask).logits
        alone = model(torch.tensor([ids_a]), visual[:1]).logits
    n = alone.shape[1]
    assert torch.allclose(batched[0, :n], alone[0], atol=1e-4)


# ---------------------------------------------------------------------------- generation
def test_analyse_pair_equals_one_by_one_generation(model, images):
    before, after = images[0], images[1]
    result = model.analyse_pair(before, after, QUESTIONS, max_new_tokens=12)
    assert result.questions == QUESTIONS and len(result.answers) == 3 and result.clue is None
    blocks = pair_blocks(model, before, after)
    cfg = model.config
    assert result.caption == reference_greedy(model, build_prompt(cfg.caption_prompt, 1, cfg), blocks, 12)
    assert result.answers[2] == reference_greedy(model, build_prompt(QUESTIONS[2], 1, cfg), blocks, 12)
    assert result.caption == model.caption_change(before, after, max_new_tokens=12)
    for question, answer in zip(QUESTIONS, result.answers, strict=False):
        assert answer == model.answer((before, after), question, max_new_tokens=12)


def test_prefix_shared_decoding_matches_hf_generate_token_for_token(model, images):
    encoded = model.encode([model.prepare_visual((images[0], images[1]), "pair")])[0]
    prompts = [build_prompt(q, 1, model.config) for q in [model.config.caption_prompt, *QUESTIONS]]
    embeds = [model.embed_prompt(tokenizer_image_token(p, model.tokenizer), encoded.blocks) for p in prompts]
    limits = [5, 9, 7, 11]  # rows leave the batch at different steps
    shared = generate_from_embeddings(model.llm, embeds, limits, eos_token_id=2)
    with torch.no_grad():
        for e, limit, got in zip(embeds, limits, shared, strict=False):
            hf = model.llm.generate(
                inputs_embeds=e[None], max_new_tokens=limit, do_sample=False, eos_token_id=2, pad_token_id=0
            )
            assert got == hf[0].tolist()


def test_rows_stopping_at_eos_do_not_disturb_the_others(model, images):
    encoded = model.encode([model.prepare_visual((images[0], images[1]), "pair")])[0]
    embeds = [
        model.embed_prompt(tokenizer_image_token(build_prompt(q, 1, model.config), model.tokenizer), encoded.blocks)
        for q in QUESTIONS
    ]
    alone = [generate_from_embeddings(model.llm, [e], 8, eos_token_id=None)[0] for e in embeds]
    # Pretend the third token of row 0 is EOS: row 0 stops early, the others must be unaffected.
    eos = alone[0][2]
    expected = [seq[: seq.index(eos)] if eos in seq else seq for seq in alone]
    assert generate_from_embeddings(model.llm, embeds, 8, eos_token_id=eos) == expected


def test_packed_prefill_without_prefix_sharing_gives_the_same_tokens(model, images):
    encoded = model.encode([model.prepare_visual((images[0], images[1]), "pair")])[0]
    embeds = [
        model.embed_prompt(tokenizer_image_token(build_prompt(q, 1, model.config), model.tokenizer), encoded.blocks)
        for q in QUESTIONS
    ]
    shared = generate_from_embeddings(model.llm, embeds, 6, eos_token_id=2)
    assert generate_from_embeddings(model.llm, embeds, 6, eos_token_id=2, share_prefix=False) == shared


def test_preallocated_cache_grows_and_matches_dynamic_cache(model):
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    from model.generation import PreallocatedKVLayer

    decoder = model.llm.get_decoder()
    layers = model.llm.config.num_hidden_layers
    small = Cache(layers=[PreallocatedKVLayer(capacity=3) for _ in range(layers)])  # forces two regrowths
    dynamic = DynamicCache(config=model.llm.config)
    steps = torch.randn(4, 1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for x in steps:
            a = decoder(inputs_embeds=x, past_key_values=small, use_cache=True).last_hidden_state
            b = decoder(inputs_embeds=x, past_key_values=dynamic, use_cache=True).last_hidden_state
            assert torch.allclose(a, b, atol=1e-5)
    assert small.get_seq_length() == 20


def test_analyse_pair_without_questions(model, images):
    result = model.analyse_pair(images[0], images[1], [], max_new_tokens=4)
    assert result.answers == [] and result.caption == model.caption_change(images[0], images[1], max_new_tokens=4)


def test_sampling_is_seeded(model, images):
    from model import SamplingConfig

    pair = (images[0], images[1])
    hot = SamplingConfig(do_sample=True, temperature=5.0, top_p=0.9, seed=1)
    first = model.answer(pair, "What changed?", max_new_tokens=8, sampling=hot)
    assert first == model.answer(pair, "What changed?", max_new_tokens=8, sampling=hot)
    assert first != model.answer(pair, "What changed?", max_new_tokens=8)  # greedy differs at T=5


def test_generation_is_deterministic(unirs_ckpt, images):
    first = UniRS.from_pretrained(unirs_ckpt, device="cpu")
    second = UniRS.from_pretrained(unirs_ckpt, device="cpu")
    a = first.analyse_pair(images[2], images[3], QUESTIONS[:2], max_new_tokens=8)
    b = second.analyse_pair(images[2], images[3], QUESTIONS[:2], max_new_tokens=8)
    assert a == b
    assert first.analyse_pair(images[2], images[3], QUESTIONS[:2], max_new_tokens=8) == a


def test_a_seeded_checkpoint_is_reproducible_and_the_seed_matters(model, images, tmp_path):
    """`write_random_checkpoint(seed=0)` written again gives bit-identical weights and outputs; seed 1 does not."""
    again = UniRS.from_pretrained(write_random_checkpoint(tmp_path / "again", layout="unirs", seed=0), device="cpu")
    other = UniRS.from_pretrained(write_random_checkpoint(tmp_path / "other", layout="unirs", seed=1), device="cpu")
    ours = model.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.items())
    assert not torch.equal(ours["llm.lm_head.weight"], other.state_dict()["llm.lm_head.weight"])
    pair = (images[0], images[1])
    assert again.caption_change(*pair, max_new_tokens=8) == model.caption_change(*pair, max_new_tokens=8)
    ids = torch.tensor([tokenizer_image_token(build_prompt("What changed?", 1, model.config), model.tokenizer)])
    with torch.no_grad():
        a = model(ids, [model.prepare_visual(pair, "pair")]).logits
        b = other(ids, [other.prepare_visual(pair, "pair")]).logits
    assert (a - b).abs().max() > 1e-2


def test_caption_changes_batch_matches_single_calls(model, images):
    pairs = [(images[0], images[1]), (images[2], images[3])]
    batched = model.caption_changes(pairs, max_new_tokens=6)
    assert batched == [model.caption_change(b, a, max_new_tokens=6) for b, a in pairs]


def test_answer_accepts_paths_and_single_images(model, images, tmp_path):
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    from_path = model.answer(str(tmp_path / "a.png"), "What is in the image?", max_new_tokens=5)
    from_array = model.answer(images[0], "What is in the image?", max_new_tokens=5)
    blocks = model.encode([model.prepare_visual(images[0], "image")])[0].blocks
    reference = reference_greedy(model, build_prompt("What is in the image?", 1, model.config), blocks, 5)
    assert from_path == from_array == reference
    with pytest.raises(ValueError, match="input_type='video'"):
        model.answer([images[0]] * 3, "?")


def test_classify_sequence(model):
    frames = [random_image(k, (32, 32)) for k in range(30)]
    classes = ["flood", "fire", "police chase", "traffic congestion"]
    result = model.classify_sequence(frames, classes, max_new_tokens=6)
    label, raw = result
    assert (label, raw) == (result.label, result.raw_text)
    # VILA-1.5 sampling of 30 frames: linspace(0, 28, 8) = [0, 4, 8, ..., 28].
    pixels = model.prepare_visual(frames, InputType.VIDEO).pixel_values
    assert torch.equal(pixels, model.image_processor([frames[i] for i in range(0, 29, 4)]))
    blocks = model.encode([VisualInput("video", pixels)])[0].blocks
    assert blocks.shape == (8, 196, model.config.hidden_size)
    assert raw == reference_greedy(model, build_prompt(model.config.video_question, 8, model.config), blocks, 6)
    assert (result.label, result.method, result.score) == tuple(vars(match_class(raw, classes)).values())


# ---------------------------------------------------------------------------- prompt augmentation
@pytest.fixture(scope="module")
def augmented(unirs_ckpt, vila_ckpt):
    model = UniRS.from_pretrained(unirs_ckpt, base_path=vila_ckpt, device="cpu")
    model.config.clue_max_new_tokens = 6
    return model


def test_prompt_augmentation_reuses_vision_features_and_merges_the_clue(augmented, images, monkeypatch):
    assert augmented.prompt_augmentation_enabled and augmented.base_projector is None
    calls = {"vision": 0}
    handle = augmented.vision_tower.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    seen = []
    real = inference_module.generate_from_embeddings

    def spy(llm, embeddings, max_new_tokens, **kwargs):
        out = real(llm, embeddings, max_new_tokens, **kwargs)
        seen.append((llm, max_new_tokens, out))
        return out

    monkeypatch.setattr(inference_module, "generate_from_embeddings", spy)
    prompts = []
    real_run = augmented._run

    def run_spy(llm, requests, *args, **kwargs):
        prompts.append([prompt for prompt, _ in requests])
        return real_run(llm, requests, *args, **kwargs)

    monkeypatch.setattr(augmented, "_run", run_spy)
    try:
        result = augmented.analyse_pair(images[0], images[1], QUESTIONS[:2], max_new_tokens=6)
    finally:
        handle.remove()
    assert calls["vision"] == 1  # both passes share one vision-tower call
    (clue_llm, clue_limit, clue_ids), (answer_llm, _, _) = seen
    assert clue_llm is augmented.base_llm and answer_llm is augmented.llm
    assert clue_limit == 6 and len(clue_ids[0]) <= 6  # clue length capped
    clue_prompt, answer_prompts = prompts
    assert clue_prompt[0].count("<image>") == 2  # base VLM sees the pair as two images
    assert "Describe the two remote sensing images" in clue_prompt[0]
    clue_text = augmented.tokenizer.decode(clue_ids[0], skip_special_tokens=True)
    assert result.clue == clean_clue(clue_text, augmented.config)
    assert f"<clue>{result.clue}</clue>\n[change] {QUESTIONS[0]}" in answer_prompts[1]
    assert all(p.count("<image>") == 1 for p in answer_prompts)


def test_augmented_batch_equals_one_by_one(augmented, images):
    result = augmented.analyse_pair(images[2], images[3], QUESTIONS, max_new_tokens=6)
    assert result.caption == augmented.caption_change(images[2], images[3], max_new_tokens=6)
    assert result.answers[1] == augmented.answer((images[2], images[3]), QUESTIONS[1], max_new_tokens=6)
    plain = augmented.analyse_pair(images[2], images[3], QUESTIONS, max_new_tokens=6, use_clues=False)
    assert plain.clue is None


def test_separate_clue_mode_describes_each_image(augmented, images):
    augmented.config.clue_pair_mode = "separate"
    try:
        result = augmented.analyse_pair(images[0], images[1], QUESTIONS[:1], max_new_tokens=4)
    finally:
        augmented.config.clue_pair_mode = "two_images"
    # Each image gets the single-image clue prompt through the base LLM, as if it were asked alone.
    encoded = [augmented.encode([augmented.prepare_visual(im, "image")]) for im in images[:2]]
    single = [augmented.generate_clues(e)[0] for e in encoded]
    assert result.clue == f"Before: {single[0]} After: {single[1]}"


def test_augmentation_for_images_and_videos(augmented, images):
    cfg = augmented.config
    encoded = augmented.encode([augmented.prepare_visual(images[0], "image")])[0]
    clue = reference_greedy(augmented, build_clue_prompt("image", 1, cfg), encoded.blocks, 6, llm=augmented.base_llm)
    assert augmented.generate_clues([encoded]) == [clean_clue(clue, cfg)]
    instruction = f"<clue>{clean_clue(clue, cfg)}</clue>\n[image] What is it?"
    expected = reference_greedy(augmented, build_prompt(instruction, 1, cfg), encoded.blocks, 4)
    assert augmented.answer(images[0], "What is it?", max_new_tokens=4) == expected
    frames = [random_image(k, (32, 32)) for k in range(8)]
    video = augmented.encode([augmented.prepare_visual(frames, "video")])[0]
    base = augmented.base_llm
    video_clue = reference_greedy(augmented, build_clue_prompt("video", 8, cfg), video.blocks, 6, llm=base)
    result = augmented.classify_sequence(frames, ["fire", "flood"], max_new_tokens=4)
    assert result.clue == clean_clue(video_clue, cfg)


def test_base_model_with_other_vision_tower_is_rejected(unirs_ckpt, tmp_path):
    other = write_random_checkpoint(tmp_path / "other", layout="vila", seed=1, vision_seed=9)
    with pytest.raises(CheckpointError, match="vision tower"):
        UniRS.from_pretrained(unirs_ckpt, base_path=other, device="cpu")


def test_clues_require_base_weights(model, images):
    with pytest.raises(RuntimeError, match="base_path"):
        model.caption_change(images[0], images[1], use_clues=True)

"""`unirs-clues` (offline prompt augmentation) and `unirs-eval` generating with a trained checkpoint."""

from __future__ import annotations

import json

from click.testing import CliRunner

from model import UniRS, VisualInput
from model.configuration_unirs import InputType
from model.evaluation.cli import eval_main
from model.training.cli import clues_main
from model.training.collate import SampleBuilder
from model.training.data import DatasetSpec, load_dataset_records

from .synthetic import IMAGES, PAIRS, QUESTION, VIDEOS, solid


def test_clues_file_matches_inference_time_clues(trained, small_vila, mixture, tmp_path):
    out = tmp_path / "levir_Plus.json"
    run = CliRunner().invoke(
        clues_main,
        [
            "--base",
            str(small_vila),
            "--data",
            str(mixture["levir"]),
            "--type",
            "pair",
            "--media-root",
            str(mixture["levir"].parent),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "8",
            "--no-progress",
        ],
    )
    assert run.exit_code == 0, run.output
    original = json.loads(mixture["levir"].read_text())
    plus = json.loads(out.read_text())
    assert [{k: v for k, v in r.items() if k != "clue"} for r in plus] == original  # all fields kept
    assert all(isinstance(r["clue"], str) for r in plus)
    assert not out.with_name(out.name + ".partial.jsonl").exists()

    # The trained UniRS model with the base model attached generates the same clue at inference.
    cfg, _ = trained
    model = UniRS.from_pretrained(cfg.output_dir, base_path=small_vila, device="cpu")
    model.config.clue_max_new_tokens = 8
    before, after, square, _ = PAIRS[1]
    pixels = model.image_processor([solid(before), solid(after, square)])
    clue = model.generate_clues(model.encode([VisualInput(InputType.PAIR, pixels)]))[0]
    assert clue == plus[1]["clue"]

    # unirs-train merges the clue into the first instruction.
    rec = load_dataset_records(DatasetSpec("levir", out, media_root=mixture["levir"].parent))[1]
    sample = SampleBuilder(model.config, model.tokenizer, model.image_processor)(rec)
    prompt = model.tokenizer.decode([t for t in sample["input_ids"].tolist() if t >= 0])
    assert f"<clue>{clue}</clue>" in prompt.replace("<clue> ", "<clue>")


def test_clues_resume_from_partial_file(small_vila, mixture, tmp_path):
    out = tmp_path / "era_Plus.json"
    partial = out.with_name(out.name + ".partial.jsonl")
    partial.write_text(json.dumps({"index": 0, "clue": "kept from an earlier run"}) + "\n")
    run = CliRunner().invoke(
        clues_main,
        [
            "--base",
            str(small_vila),
            "--data",
            str(mixture["era"]),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--no-progress",
        ],
    )
    assert run.exit_code == 0, run.output
    plus = json.loads(out.read_text())
    assert plus[0]["clue"] == "kept from an earlier run" and all("clue" in r for r in plus)


def test_eval_generates_and_scores_with_a_trained_model(trained, mixture, tmp_path):
    cfg, _ = trained
    model_dir = str(cfg.output_dir)
    data = mixture["geochat"].parent
    runner = CliRunner()

    # Change captioning from a LLaVA-style pairs file.
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({f"pair{k}": [caption] for k, (*_, caption) in enumerate(PAIRS)}))
    out = tmp_path / "caption"
    run = runner.invoke(
        eval_main,
        [
            "caption",
            "--references",
            str(refs),
            "--pairs",
            str(mixture["levir"]),
            "--model",
            model_dir,
            "--tokenizer",
            "simple",
            "--no-meteor",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert run.exit_code == 0, run.output
    result = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["pair0", "pair1", "pair2"]
    assert result["scores"]["BLEU-1"] > 0.8 and result["settings"]["temperature"] == 0.0
    # Sampling as in the released eval (temperature 0.2) and the 42-token cap are options.
    run = runner.invoke(
        eval_main,
        [
            "caption",
            "--references",
            str(refs),
            "--pairs",
            str(mixture["levir"]),
            "--model",
            model_dir,
            "--tokenizer",
            "simple",
            "--no-meteor",
            "--temperature",
            "0.2",
            "--seed",
            "3",
            "--max-new-tokens",
            "42",
            "--json",
            "--no-progress",
        ],
    )
    assert run.exit_code == 0, run.output

    # ERA from frame folders.
    gt = tmp_path / "era_gt.json"
    gt.write_text(
        json.dumps([{"id": f"v{k}", "video": f"era/clip{k}", "label": event} for k, (_, event) in enumerate(VIDEOS)])
    )
    run = runner.invoke(
        eval_main, ["era", "--gt", str(gt), "--video-root", str(data), "--model", model_dir, "--json", "--no-progress"]
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["overall_accuracy"] >= 200 / 3

    # RSVQA-style questions on single images (answers compared after normalisation).
    gt = tmp_path / "vqa_gt.json"
    gt.write_text(
        json.dumps(
            [
                {"question_id": k, "image": f"img/{k}.png", "text": QUESTION, "type": "presence", "answer": answer}
                for k, (_, answer) in enumerate(IMAGES)
            ]
        )
    )
    run = runner.invoke(
        eval_main,
        [
            "rsvqa",
            "--gt",
            str(gt),
            "--image-root",
            str(data),
            "--model",
            model_dir,
            "--json",
            "--no-progress",
            "--batch-size",
            "3",
        ],
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["per_type"]["presence"]["accuracy"] >= 75.0


def test_eval_requires_predictions_or_model(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps([{"id": "a", "label": "fire"}]))
    run = CliRunner().invoke(eval_main, ["era", "--gt", str(gt)])
    assert run.exit_code != 0 and "Give --predictions or --model" in run.output

"""`unirs-eval`: score (and optionally generate) RSVQA, LEVIR-CC change captioning and ERA predictions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..configuration_unirs import InputType
from .captioning import caption_table, load_caption_predictions, load_caption_references, score_captions
from .era import ERA_CLASSES, era_table, load_era, score_era
from .io import EvalFormatError, get_field, read_records, write_json, write_jsonl
from .metrics import DEFAULT_METRICS
from .rsvqa import QUESTION_TYPES, load_rsvqa, rsvqa_table, score_rsvqa

__all__ = ["eval_main"]


def _model_options(func):
    options = [
        click.option(
            "--model",
            "model_path",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="UniRS checkpoint: generate the predictions instead of reading --predictions.",
        ),
        click.option(
            "--base",
            "base_path",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Base VILA-1.5 checkpoint: turns prompt augmentation (clues) on.",
        ),
        click.option(
            "--temperature",
            type=float,
            default=0.0,
            show_default=True,
            help="0 = greedy. The released eval scripts sample at 0.2.",
        ),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (temperature > 0)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per generation batch."),
        click.option("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA if available)."),
        click.option(
            "--dtype",
            type=click.Choice(["bf16", "fp16", "fp32"]),
            default=None,
            help="Default: bf16 on CUDA, fp32 on CPU.",
        ),
        click.option("--limit", type=int, default=None, help="Only the first N items (smoke tests)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _common_options(func):
    options = [
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Write results.json, results.md and (if generated) predictions.jsonl here.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of the table."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _decoding(temperature: float, top_p: float, seed: int):
    from .predict import Decoding

    return Decoding(temperature=temperature, top_p=top_p, seed=seed)


def _generate(items, model_path, base_path, max_new_tokens, opts, out_dir, id_key, text_key) -> dict[str, str]:
    from .predict import load_eval_model, predict

    if opts["limit"] is not None:
        items = items[: opts["limit"]]
    model = load_eval_model(model_path, base_path, device=opts["device"], dtype=opts["dtype"])
    limit = max_new_tokens if max_new_tokens is not None else model.config.answer_max_new_tokens
    results = predict(
        model,
        items,
        limit,
        _decoding(opts["temperature"], opts["top_p"], opts["seed"]),
        batch_size=opts["batch_size"],
        progress=not opts["no_progress"],
    )
    if out_dir is not None:
        write_jsonl(
            out_dir / "predictions.jsonl",
            [
                {id_key: r["id"], text_key: r["prediction"], **({"clue": r["clue"]} if r["clue"] else {})}
                for r in results
            ],
        )
    return {r["id"]: r["prediction"] for r in results}


def _predictions(gt, *, model_path, pred_path, make_items, read_predictions, base_path, max_new_tokens, opts,
                 no_progress, out_dir, id_key, text_key):
    """(references, predictions): generated now with --model, or read from --predictions.

    With --model and --limit only the first items are generated, so the references are cut to them.
    """
    if model_path is not None:
        preds = _generate(make_items(), model_path, base_path, max_new_tokens, {**opts, "no_progress": no_progress},
                          out_dir, id_key, text_key)
        if opts["limit"] is not None:
            gt = {k: v for k, v in gt.items() if k in preds}
        return gt, preds
    if pred_path is not None:
        return gt, read_predictions(pred_path)
    raise click.UsageError("Give --predictions or --model")


def _finish(result: dict[str, Any], table: str, out_dir: Path | None, as_json: bool, settings: dict[str, Any]) -> None:
    result = {**result, "settings": settings}
    if out_dir is not None:
        write_json(out_dir / "results.json", result)
        (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
    else:
        click.echo(table)


def _settings(**kwargs) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def eval_main() -> None:
    """Score UniRS benchmark predictions the way the paper reports them (spec section 6).

    Each sub-command either reads a predictions file (--predictions) or generates the predictions
    with a checkpoint (--model, optionally --base for clues), then prints a table and, with
    --out, writes results.json (machine readable, with per-item details), results.md and
    predictions.jsonl.

    \b
    Examples:
      unirs-eval rsvqa --gt LR_test.json --predictions preds.jsonl
      unirs-eval rsvqa --gt LR_test.json --model out/unirs --image-root RSVQA_LR/Images --out res/lr
      unirs-eval caption --references LevirCCcaptions.json --predictions captions.jsonl
      unirs-eval caption --references LevirCCcaptions.json --model out/unirs --image-root LEVIR-CC/images \\
          --temperature 0.2 --max-new-tokens 42 --out res/levir      # the released eval's decoding
      unirs-eval era --gt era_test.json --model out/unirs --video-root ERA/Test --out res/era
    """


# ---------------------------------------------------------------------------------------------
@eval_main.command("rsvqa")
@click.option(
    "--gt",
    "gt_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Questions with ground truth: records with question_id/id, type/category, answer, "
    "and (for --model) image and text/question.",
)
@click.option(
    "--predictions",
    "pred_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Records with question_id/id and answer/text.",
)
@click.option(
    "--types",
    default=None,
    help=f"Comma-separated question types to report (default: all in the file; {', '.join(QUESTION_TYPES)}). "
    "GeoChat/UniRS RSVQA-LR: presence,comparison,rural_urban.",
)
@click.option(
    "--image-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder the image paths of --gt are relative to (with --model).",
)
@click.option("--max-new-tokens", type=int, default=None, help="Default: the model's answer_max_new_tokens.")
@_model_options
@_common_options
def rsvqa_cmd(
    gt_path, pred_path, types, image_root, max_new_tokens, model_path, base_path, out_dir, as_json, no_progress, **opts
):
    """RSVQA accuracy per question type, with question-weighted and per-type-mean averages."""
    try:
        gt, preds = _predictions(
            load_rsvqa(gt_path, prediction=False),
            model_path=model_path,
            pred_path=pred_path,
            make_items=lambda: _rsvqa_items(gt_path, image_root),
            read_predictions=lambda p: {k: v["answer"] for k, v in load_rsvqa(p, prediction=True).items()},
            base_path=base_path, max_new_tokens=max_new_tokens, opts=opts, no_progress=no_progress,
            out_dir=out_dir, id_key="question_id", text_key="answer",
        )
        selected = [t.strip() for t in types.split(",")] if types else None
        result = score_rsvqa(gt, preds, selected)
    except EvalFormatError as exc:
        raise click.ClickException(str(exc)) from None
    _finish(
        result,
        rsvqa_table(result),
        out_dir,
        as_json,
        _settings(gt=gt_path, predictions=pred_path, model=model_path, base=base_path, types=types, **opts),
    )


def _rsvqa_items(gt_path: Path, image_root: Path | None):
    from .predict import PredictionItem

    root = image_root or gt_path.parent
    items = []
    for i, rec in enumerate(read_records(gt_path)):
        where = f"{gt_path}: record {i}"
        qid = str(get_field(rec, ("question_id", "id"), where=where))
        image = get_field(rec, ("image",), where=where)
        question = get_field(rec, ("text", "question"), where=where)
        question = question.replace("<image>", "").strip()
        items.append(PredictionItem(qid, InputType.IMAGE, [root / image], question))
    return items


# ---------------------------------------------------------------------------------------------
@eval_main.command("caption")
@click.option(
    "--references",
    "ref_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="LevirCCcaptions.json, {id: [captions]}, or records with id + references/captions.",
)
@click.option("--split", default="test", show_default=True, help="Split of the official LEVIR-CC file.")
@click.option(
    "--reference-field",
    type=click.Choice(["raw", "tokens"]),
    default="raw",
    show_default=True,
    help="Official file: score against the raw sentences or the pre-tokenised ones.",
)
@click.option(
    "--predictions",
    "pred_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Records with id/question_id/image and caption/answer/text.",
)
@click.option(
    "--pairs",
    "pairs_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --model: records with id and image [before, after] (or 'A###B'). Default: derived from "
    "the official references file as IMAGE_ROOT/<filepath>/{A,B}/<filename>.",
)
@click.option(
    "--image-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder the image paths are relative to (with --model).",
)
@click.option("--prompt", default=None, help="Caption instruction (default: the model's caption_prompt).")
@click.option(
    "--max-new-tokens", type=int, default=42, show_default=True, help="Caption length cap; 42 as in the released eval."
)
@click.option(
    "--tokenizer",
    type=click.Choice(["ptb", "simple", "none"]),
    default="ptb",
    show_default=True,
    help="ptb: Stanford PTBTokenizer (Java), as coco-caption; simple: Java-free approximation.",
)
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (the only metric that needs Java besides PTB).")
@click.option("--allow-missing", is_flag=True, help="Score missing predictions as empty captions.")
@_model_options
@_common_options
def caption_cmd(
    ref_path,
    split,
    reference_field,
    pred_path,
    pairs_path,
    image_root,
    prompt,
    max_new_tokens,
    tokenizer,
    no_meteor,
    allow_missing,
    model_path,
    base_path,
    out_dir,
    as_json,
    no_progress,
    **opts,
):
    """Change captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (printed x100, as in the LEVIR-CC papers)."""
    try:
        refs, preds = _predictions(
            load_caption_references(ref_path, split=split, field=reference_field),
            model_path=model_path,
            pred_path=pred_path,
            make_items=lambda: _caption_items(ref_path, pairs_path, image_root, split, prompt),
            read_predictions=load_caption_predictions,
            base_path=base_path, max_new_tokens=max_new_tokens, opts=opts, no_progress=no_progress,
            out_dir=out_dir, id_key="id", text_key="caption",
        )
        metrics = [m for m in DEFAULT_METRICS if not (no_meteor and m == "METEOR")]
        result = score_captions(refs, preds, tokenizer=tokenizer, metrics=metrics, allow_missing=allow_missing)
    except EvalFormatError as exc:
        raise click.ClickException(str(exc)) from None
    _finish(
        result,
        caption_table(result),
        out_dir,
        as_json,
        _settings(
            references=ref_path,
            split=split,
            predictions=pred_path,
            model=model_path,
            base=base_path,
            max_new_tokens=max_new_tokens,
            **opts,
        ),
    )


def _caption_items(ref_path: Path, pairs_path: Path | None, image_root: Path | None, split: str, prompt: str | None):
    from .predict import PredictionItem

    instruction = prompt
    items = []
    if pairs_path is not None:
        root = image_root or pairs_path.parent
        for i, rec in enumerate(read_records(pairs_path)):
            where = f"{pairs_path}: record {i}"
            rid = get_field(rec, ("question_id", "id"), where=where, required=False)
            image = get_field(rec, ("image",), where=where)
            pair = image.split("###") if isinstance(image, str) else image
            if not isinstance(pair, list) or len(pair) != 2:
                raise EvalFormatError(f"{where}: 'image' must be [before, after] or 'before###after'")
            text = rec.get("text") or rec.get("question")
            rid = str(rid) if rid is not None else "###".join(pair)
            items.append(
                PredictionItem(
                    rid,
                    InputType.PAIR,
                    [root / pair[0], root / pair[1]],
                    (instruction or text or "").replace("<image>", "").strip(),
                )
            )
    else:
        data = json.loads(ref_path.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
            raise EvalFormatError(f"{ref_path}: not the official LEVIR-CC file; pass --pairs")
        root = image_root or ref_path.parent
        for img in data["images"]:
            if split and img.get("split") != split:
                continue
            folder = root / img.get("filepath", split)
            items.append(
                PredictionItem(
                    Path(img["filename"]).stem,
                    InputType.PAIR,
                    [folder / "A" / img["filename"], folder / "B" / img["filename"]],
                    instruction or "",
                )
            )
    return items  # an empty instruction means the model's caption_prompt


# ---------------------------------------------------------------------------------------------
@eval_main.command("era")
@click.option(
    "--gt",
    "gt_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Records with id (or video) and label/class/answer; for --model also video (folder or file).",
)
@click.option(
    "--predictions",
    "pred_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Records with id/video and answer/text (free text).",
)
@click.option(
    "--classes",
    "classes_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of class names (default: the 25 ERA classes).",
)
@click.option(
    "--video-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder the video paths of --gt are relative to (with --model).",
)
@click.option("--question", default=None, help="Instruction (default: the model's video_question).")
@click.option("--max-new-tokens", type=int, default=None, help="Default: the model's answer_max_new_tokens.")
@_model_options
@_common_options
def era_cmd(
    gt_path,
    pred_path,
    classes_path,
    video_root,
    question,
    max_new_tokens,
    model_path,
    base_path,
    out_dir,
    as_json,
    no_progress,
    **opts,
):
    """ERA event classification: free text mapped to class names, per-class accuracy and OA."""
    try:
        classes = json.loads(classes_path.read_text()) if classes_path else list(ERA_CLASSES)
        gt, preds = _predictions(
            load_era(gt_path, prediction=False),
            model_path=model_path,
            pred_path=pred_path,
            make_items=lambda: _era_items(gt_path, video_root, question),
            read_predictions=lambda p: load_era(p, prediction=True),
            base_path=base_path, max_new_tokens=max_new_tokens, opts=opts, no_progress=no_progress,
            out_dir=out_dir, id_key="id", text_key="answer",
        )
        result = score_era(gt, preds, classes)
    except EvalFormatError as exc:
        raise click.ClickException(str(exc)) from None
    _finish(
        result,
        era_table(result),
        out_dir,
        as_json,
        _settings(gt=gt_path, predictions=pred_path, model=model_path, base=base_path, **opts),
    )


def _era_items(gt_path: Path, video_root: Path | None, question: str | None):
    from .predict import PredictionItem

    root = video_root or gt_path.parent
    default_q = question or ""  # empty: the model's video_question
    items = []
    for i, rec in enumerate(read_records(gt_path)):
        where = f"{gt_path}: record {i}"
        sid = str(get_field(rec, ("question_id", "id", "video", "video_id"), where=where))
        video = get_field(rec, ("video", "frames", "path"), where=where)
        media = [root / v for v in video] if isinstance(video, list) else [root / video]
        text = (rec.get("text") or rec.get("question") or default_q).replace("<video>", "").replace("<image>", "")
        items.append(PredictionItem(sid, InputType.VIDEO, media, text.strip()))
    return items


if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_main())

"""`unirs-train` and `unirs-clues` command lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .data import DEFAULT_REPEATS, DatasetFormatError, DatasetSpec, MixtureDataset, parse_dataset_spec

__all__ = ["clues_main", "train_main"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_DATASET_HELP = (
    "A dataset of the mixture, repeatable: "
    "NAME=PATH[,root=DIR][,type=auto|image|pair|video][,repeat=N][,clues=yes|no]. "
    "PATH is a LLaVA-style JSON list (or .jsonl); media paths are relative to root (default: the JSON's folder). "
    f"Default repeats by NAME: {', '.join(f'{k} x{v}' for k, v in DEFAULT_REPEATS.items())}, otherwise x1."
)


def _load_mixture_file(path: Path) -> list[DatasetSpec]:
    """Read {"datasets": [{"name", "path", "media_root"?, "type"?, "repeat"?, "clues"?}, ...]}.

    Relative paths are relative to the mixture file.
    """
    data = json.loads(path.read_text())
    entries = data.get("datasets") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise click.BadParameter(f"{path}: expected {{'datasets': [...]}}")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise click.BadParameter(f"{path}: datasets[{i}] needs 'name' and 'path'")
        root = entry.get("media_root") or entry.get("root")
        specs.append(
            DatasetSpec(
                name=entry["name"],
                path=(path.parent / entry["path"]),
                media_root=(path.parent / root) if root else None,
                input_type=entry.get("type", "auto"),
                repeat=entry.get("repeat"),
                use_clues=bool(entry.get("clues", True)),
            )
        )
    return specs


def _specs(datasets: tuple[str, ...], mixture: Path | None) -> list[DatasetSpec]:
    specs = _load_mixture_file(mixture) if mixture else []
    for text in datasets:
        try:
            specs.append(parse_dataset_spec(text))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--dataset") from None
    if not specs:
        raise click.UsageError("Give at least one --dataset (or --mixture)")
    return specs


@click.command(context_settings=_CONTEXT)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Starting checkpoint: VILA-1.5 (e.g. VILA1.5-3b; the change module is added) or UniRS.",
)
@click.option(
    "--output-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Final model (UniRS layout), checkpoints, loss_log.jsonl, train_summary.json.",
)
@click.option("--dataset", "datasets", multiple=True, help=_DATASET_HELP)
@click.option(
    "--mixture",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='JSON file {"datasets": [{"name", "path", "media_root", "type", "repeat", "clues"}]}.',
)
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Per-step micro-batch size.")
@click.option("--grad-accum", type=int, default=8, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", "learning_rate", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--lr-scheduler", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--max-length", type=int, default=4096, show_default=True, help="LLM positions incl. 196 per image.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--interleave",
    type=click.Choice(["dataset", "copy"]),
    default="dataset",
    show_default=True,
    help="dataset: each dataset (all its copies) spread evenly over the epoch; "
    "copy: every copy interleaved on its own, VILA's sampler order.",
)
@click.option(
    "--llm",
    "llm_mode",
    type=click.Choice(["full", "lora", "frozen"]),
    default="full",
    show_default=True,
    help="How the LLM is trained (released recipe: full).",
)
@click.option("--lora-r", type=int, default=64, show_default=True)
@click.option("--lora-alpha", type=int, default=16, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option(
    "--change-module/--no-change-module",
    default=True,
    show_default=True,
    help="Build the change module (UniRS). Without it a pair is fed as two images.",
)
@click.option(
    "--train-change-module/--freeze-change-module",
    default=False,
    show_default=True,
    help="Train the change module (released recipe: frozen at its random init; spec section 8.1).",
)
@click.option(
    "--train-projector/--freeze-projector",
    default=False,
    show_default=True,
    help="Train the VILA projector MLP ('single').",
)
@click.option("--train-vision-tower/--freeze-vision-tower", default=False, show_default=True)
@click.option(
    "--image-aspect-ratio",
    type=click.Choice(["pad", "resize", "keep"]),
    default="pad",
    show_default=True,
    help="pad as UniRS's sft.sh; keep = the checkpoint's setting.",
)
@click.option(
    "--clues/--no-clues",
    "use_clues",
    default=True,
    show_default=True,
    help="Use the records' 'clue' fields (prompt augmentation; see unirs-clues).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on CUDA, fp32 on CPU.",
)
@click.option(
    "--weights-dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="Trained weights and AdamW state: fp32 master weights (full 3B training needs ~16 bytes per "
    "parameter, an 80 GB GPU), or bf16 to halve that at some precision cost. Frozen parts are bf16 on CUDA.",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Default: on with CUDA, off on CPU."
)
@click.option("--num-workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on CPU).")
@click.option(
    "--save-steps",
    type=float,
    default=0.5,
    show_default=True,
    help="Checkpoint every N steps (>= 1) or every fraction of the run (< 1); 0 = final model only.",
)
@click.option("--save-total-limit", type=int, default=3, show_default=True)
@click.option(
    "--save-dtype",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Dtype of the final model (auto: bf16 on CUDA, fp32 on CPU).",
)
@click.option("--resume-from", default=None, help="A checkpoint-<step> directory, or 'auto' for the latest one.")
@click.option(
    "--overwrite-output-dir",
    is_flag=True,
    help="Delete the checkpoints of an earlier run in --output-dir and start over.",
)
@click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: CUDA if available).")
@click.option("--no-check-files", is_flag=True, help="Do not check that every media file exists up front.")
@click.option("--dry-run", is_flag=True, help="Validate the datasets, print the mixture and exit.")
@click.option("--no-progress", is_flag=True, help="No progress bar (the loss log is still written).")
def train_main(
    model_path, output_dir, datasets, mixture, image_aspect_ratio, no_check_files, dry_run, no_progress, **options
):
    """Joint supervised fine-tuning of UniRS from a VILA-1.5 or UniRS checkpoint (spec section 5).

    Defaults are the released recipe: LLM fully trained, vision tower, projector and change module
    frozen, AdamW 1e-4, warmup 3 % + cosine, batch 4 x accum 8, 1 epoch, max length 4096, bf16 and
    gradient checkpointing on CUDA. Datasets are repeated (geochat x1, levir x5, era x10 by
    default), each copy shuffled on its own, and interleaved evenly. The loss is on assistant tokens only.

    \b
    Example (the released mixture):
      unirs-train --model VILA1.5-3b --output-dir runs/unirs \\
        --dataset geochat=GeoChat_Instruct_Plus.json,root=GeoChat/images \\
        --dataset levir=LEVIR_CC_Train_Plus.json,root=LEVIR-CC/images,type=pair \\
        --dataset era=ERA_Train_Plus.json,root=ERA/frames,type=video
    LoRA instead of full fine-tuning, training the change module too:
      unirs-train ... --llm lora --lora-r 64 --train-change-module
    Resume after an interruption:
      unirs-train ... --resume-from auto
    """
    specs = _specs(datasets, mixture)
    if dry_run:
        try:
            mix = MixtureDataset(specs, check_files=not no_check_files)
        except DatasetFormatError as exc:
            raise click.ClickException(str(exc)) from None
        for row in mix.summary():
            click.echo(json.dumps(row))
        click.echo(f"{len(mix)} samples per epoch")
        return
    from .trainer import TrainConfig, train

    cfg = TrainConfig(
        model_path=model_path,
        output_dir=output_dir,
        datasets=specs,
        image_aspect_ratio=None if image_aspect_ratio == "keep" else image_aspect_ratio,
        check_files=not no_check_files,
        progress=not no_progress,
        change_module=options.pop("change_module"),
        **options,
    )
    try:
        result = train(cfg, log=lambda msg: click.echo(msg, err=True))
    except DatasetFormatError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "output_dir": str(result.output_dir),
                "steps": result.steps,
                "first_loss": result.first_loss,
                "last_loss": result.last_loss,
            }
        )
    )


@click.command(context_settings=_CONTEXT)
@click.option(
    "--base",
    "base_path",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The base VLM checkpoint (VILA-1.5-3B) that writes the clues.",
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="LLaVA-style JSON dataset (same format as unirs-train --dataset).",
)
@click.option(
    "--media-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder the media paths are relative to (default: the JSON's folder).",
)
@click.option(
    "--type", "input_type", type=click.Choice(["auto", "image", "pair", "video"]), default="auto", show_default=True
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output JSON (default: <data>_Plus.json next to the input).",
)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help="Clue length cap (default: the config's clue_max_new_tokens, 128); "
    "keep it equal to the UniRS model's setting at inference.",
)
@click.option(
    "--image-aspect-ratio",
    type=click.Choice(["pad", "resize", "keep"]),
    default="pad",
    show_default=True,
    help="Must match the UniRS model's setting (unirs-train default: pad).",
)
@click.option("--device", default=None)
@click.option("--limit", type=int, default=None, help="Only the first N records.")
@click.option("--overwrite", is_flag=True, help="Regenerate clues that the input already has.")
@click.option("--no-resume", is_flag=True, help="Ignore an existing <out>.partial.jsonl.")
@click.option("--no-progress", is_flag=True)
def clues_main(
    base_path,
    data_path,
    media_root,
    input_type,
    out_path,
    batch_size,
    max_new_tokens,
    image_aspect_ratio,
    device,
    limit,
    overwrite,
    no_resume,
    no_progress,
):
    """Write the clue-augmented copy of a dataset (*_Plus.json) for prompt augmentation (spec section 4).

    The base VLM describes each record's visual input with the per-input-type clue prompt of the
    model config (greedy, capped); the text is stored as the record's "clue". unirs-train merges it
    into the first instruction exactly as UniRS does at inference with a base model loaded.

    \b
    Example:
      unirs-clues --base VILA1.5-3b --data LEVIR_CC_Train.json --media-root LEVIR-CC/images --type pair \\
        --out LEVIR_CC_Train_Plus.json
    """
    from .clues import generate_clue_file

    spec = DatasetSpec(name=data_path.stem, path=data_path, media_root=media_root, input_type=input_type, repeat=1)
    out_path = out_path or data_path.with_name(data_path.stem + "_Plus.json")
    try:
        generate_clue_file(
            base_path,
            spec,
            out_path,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            device=device,
            image_aspect_ratio=None if image_aspect_ratio == "keep" else image_aspect_ratio,
            resume=not no_resume,
            limit=limit,
            progress=not no_progress,
            overwrite_existing=overwrite,
            log=lambda msg: click.echo(msg, err=True),
        )
    except DatasetFormatError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(out_path))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())

"""Joint supervised fine-tuning of UniRS: a plain PyTorch loop (spec section 5).

Recipe defaults are the released `sft.sh`: start from VILA-1.5-3B, add the change module (random
xavier init, frozen), train the LLM only, AdamW lr 1e-4, weight decay 0, warmup 3 % then cosine,
per-device batch 4 x grad-accum 8, 1 epoch, max length 4096, seed 42, bf16 + gradient
checkpointing on CUDA (fp32 on CPU).

What is trained is configurable (`TrainConfig.llm_mode` full / lora / frozen, `train_change_module`,
`train_projector`, `train_vision_tower`). Frozen modules get `requires_grad=False` *and* stay in
eval mode during training, so the change module's BatchNorm statistics never move.

Loss: next-token cross-entropy on the assistant tokens only, averaged over all supervised tokens of
the accumulated batch (so every token weighs the same regardless of how samples fall into
micro-batches). The LM head is only applied at supervised positions, which keeps the (tokens x
vocab) logits of 1568-row video prompts out of memory.

Outputs in `output_dir`:
    config.json, llm/, vision_tower/, mm_projector/   final model, UniRS layout (LoRA merged)
    adapter/                                          LoRA adapter (llm_mode="lora" only)
    checkpoint-<step>/                                resumable checkpoints (see `save_checkpoint`)
    loss_log.jsonl                                    one line per optimizer step
    train_summary.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..modeling_unirs import VisualInput
from ..unirs import UniRS
from .collate import IGNORE_INDEX, Collator, SampleBuilder
from .data import DatasetSpec, InterleavedSampler, MixtureDataset, seed_everything

__all__ = [
    "LORA_TARGETS",
    "TrainConfig",
    "TrainResult",
    "apply_training_policy",
    "batch_loss",
    "cosine_schedule",
    "load_model_for_training",
    "train",
    "trainable_parameters",
]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHANGE_KEYS = "mm_projector.layers.change.*"


@dataclass
class TrainConfig:
    model_path: Path
    output_dir: Path
    datasets: list[DatasetSpec]
    # schedule
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0
    max_length: int = 4096
    seed: int = 42
    interleave: str = "dataset"  # dataset: datasets spread evenly; copy: VILA's per-copy order
    # what is trained
    llm_mode: str = "full"  # full | lora | frozen
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    change_module: bool = True  # build/keep the change module (UniRS); False = plain VILA pairs
    train_change_module: bool = False
    train_projector: bool = False
    train_vision_tower: bool = False
    image_aspect_ratio: str | None = "pad"  # UniRS sft.sh pads; None keeps the checkpoint's setting
    use_clues: bool = True
    # runtime
    device: str | None = None
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    weights_dtype: str = "fp32"  # trainable (master) weights: fp32, or bf16 to halve memory (less exact updates)
    gradient_checkpointing: bool | None = None  # None: on CUDA only
    num_workers: int | None = None  # None: 4 on CUDA, 0 on CPU
    check_files: bool = True
    # checkpoints and logs
    save_steps: float = 0.5  # < 1: fraction of the run (HF style), >= 1: every N steps, 0: final only
    save_total_limit: int = 3
    save_dtype: str = "auto"  # final model: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    resume_from: Path | str | None = None  # a checkpoint dir, or "auto" for the latest in output_dir
    overwrite_output_dir: bool = False  # a fresh run into a dir with checkpoints must say so
    progress: bool = True

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)
        self.output_dir = Path(self.output_dir)
        if self.llm_mode not in ("full", "lora", "frozen"):
            raise ValueError(f"llm_mode must be full, lora or frozen, got {self.llm_mode!r}")
        if self.weights_dtype not in ("fp32", "bf16"):
            raise ValueError(f"weights_dtype must be fp32 or bf16, got {self.weights_dtype!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.interleave not in ("dataset", "copy"):
            raise ValueError(f"interleave must be dataset or copy, got {self.interleave!r}")
        if self.lr_scheduler not in ("cosine", "constant"):
            raise ValueError(f"lr_scheduler must be cosine or constant, got {self.lr_scheduler!r}")
        if self.train_change_module and not self.change_module:
            raise ValueError("train_change_module needs change_module=True")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if not self.datasets:
            raise ValueError("No datasets given")

    def to_json_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "datasets":
                value = [
                    {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(d).items()} for d in value
                ]
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    losses: list[float] = field(default_factory=list)
    skipped_batches: int = 0
    truncated_samples: int = 0


# ---------------------------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------------------------
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "auto":
        return device.type == "cuda"
    return cfg.precision == "bf16"


def _has_change_weights(path: Path) -> bool:
    from safetensors import safe_open

    file = path / "mm_projector" / "model.safetensors"
    if not file.is_file():
        return False
    with safe_open(str(file), framework="pt") as handle:
        return any(k.startswith("layers.change.") for k in handle.keys())


def load_model_for_training(path: Path, cfg: TrainConfig, device: torch.device) -> UniRS:
    """Load a VILA-1.5 or UniRS checkpoint on `device` in `cfg.weights_dtype` (fp32 master weights by default).

    From a VILA checkpoint the change module is added at its seeded xavier initialisation
    (`config.change_module_init_seed`), as the released training did.
    """
    overrides: dict[str, Any] = {"use_change_module": cfg.change_module}
    if cfg.image_aspect_ratio:
        overrides["image_aspect_ratio"] = cfg.image_aspect_ratio
    allow_missing = [CHANGE_KEYS] if cfg.change_module and not _has_change_weights(path) else []
    allow_unexpected = [CHANGE_KEYS] if not cfg.change_module else []
    model = UniRS.from_pretrained(
        path,
        device=device,
        dtype=torch.bfloat16 if cfg.weights_dtype == "bf16" else torch.float32,
        allow_missing_keys=allow_missing,
        allow_unexpected_keys=allow_unexpected,
        **overrides,
    )
    if allow_missing:
        model.mm_projector.change.reset_parameters(torch.Generator().manual_seed(model.config.change_module_init_seed))
    if model.tokenizer is None:
        raise RuntimeError(f"{path} has no tokenizer in llm/")
    return model


def _causal_lm(model: UniRS) -> torch.nn.Module:
    """The `LlamaForCausalLM` inside `model.llm` (unwrapping a PEFT model; LoRA layers stay injected)."""
    llm = model.llm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def apply_training_policy(model: UniRS, cfg: TrainConfig) -> None:
    """Freeze/unfreeze the components, wrap the LLM with LoRA if asked, and record the policy in the config."""
    conf = model.config
    conf.tune_language_model = cfg.llm_mode == "full"
    conf.tune_vision_tower = cfg.train_vision_tower
    conf.tune_mm_projector = cfg.train_projector
    conf.train_change_module = cfg.train_change_module
    model.requires_grad_(False)
    if cfg.llm_mode == "full":
        model.llm.requires_grad_(True)
    elif cfg.llm_mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft 0.21 still queries the deprecated transformers property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model.llm = get_peft_model(model.llm, lora)
    model.vision_tower.requires_grad_(cfg.train_vision_tower)
    model.mm_projector.single.requires_grad_(cfg.train_projector)
    if conf.use_change_module:
        model.mm_projector.change.requires_grad_(cfg.train_change_module)


def _set_checkpointing(lm: torch.nn.Module, enable: bool) -> None:
    """Gradient (activation) checkpointing of the decoder layers, non-reentrant.

    transformers 5 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`;
    the old name still works there but warns, so the new one is used when present.
    """
    if hasattr(lm, "activation_checkpointing_enable"):
        if enable:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.activation_checkpointing_disable()
    elif enable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()


def _frozen_components(model: UniRS) -> list[torch.nn.Module]:
    parts = [model.vision_tower, model.mm_projector.single]
    if model.config.use_change_module:
        parts.append(model.mm_projector.change)
    return [p for p in parts if not any(q.requires_grad for q in p.parameters())]


def set_train_mode(model: UniRS) -> None:
    """Train mode, except frozen visual components (eval: BN uses running stats, no dropout)."""
    model.train()
    for part in _frozen_components(model):
        part.eval()
    if getattr(model, "base_llm", None) is not None:
        model.base_llm.eval()


def trainable_parameters(model: UniRS) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _cast_frozen(model: UniRS, dtype: torch.dtype) -> None:
    """Store what is not trained in `dtype` (bf16 on CUDA); trainable weights stay fp32 master weights.

    Fully frozen visual components are cast as a whole (BN buffers included); inside the LLM only
    the frozen parameters are (the base weights under LoRA).
    """
    for part in _frozen_components(model):
        part.to(dtype)
    for param in model.llm.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------
def cosine_schedule(warmup_steps: int, total_steps: int, kind: str = "cosine") -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine decay to 0 (HF `get_cosine_schedule_with_warmup`)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def _param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def encode_visuals(model: UniRS, input_types: list, pixel_values: list) -> list[torch.Tensor | None]:
    """Per-sample visual blocks (n_blocks, 196, D), or None for text-only samples.

    Same computation as `UniRS.encode_visual_inputs` (one vision-tower call, pairs kept as
    consecutive [before, after] frames), split in two so that a frozen vision tower runs without
    autograd even when the projector or the change module is trained.
    """
    present = [(t, pv) for t, pv in zip(input_types, pixel_values, strict=True) if pv is not None]
    if not present:
        return [None] * len(pixel_values)
    device = model.device
    pixels = torch.cat([pv for _, pv in present], dim=0).to(device)
    tower_grad = any(p.requires_grad for p in model.vision_tower.parameters())
    projector_grad = any(p.requires_grad for p in model.mm_projector.parameters())
    with nullcontext() if tower_grad else torch.no_grad():
        features = model.encode_vision(pixels)
    with nullcontext() if projector_grad or tower_grad else torch.no_grad():
        blocks = iter(model.mm_projector(features, [VisualInput(t, pv).input_type for t, pv in present]))
    return [next(blocks) if pv is not None else None for pv in pixel_values]


def batch_loss(model: UniRS, batch: dict[str, Any], autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, int]:
    """(summed CE over the supervised tokens of the batch, number of those tokens).

    The LM head runs only at the supervised positions (labels shifted by one), in fp32 for the CE.
    """
    device = model.device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        blocks = encode_visuals(model, batch["input_types"], batch["pixel_values"])
        prepared = model.prepare_inputs_for_llm(
            batch["input_ids"].to(device), blocks, batch["attention_mask"].to(device), batch["labels"].to(device)
        )
        lm = _causal_lm(model)
        hidden = lm.model(
            inputs_embeds=prepared["inputs_embeds"],
            attention_mask=prepared["attention_mask"],
            position_ids=prepared["position_ids"],
            use_cache=False,
        ).last_hidden_state
        targets = prepared["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        n_tokens = int(mask.sum())
        if n_tokens == 0:
            return hidden.sum() * 0.0, 0
        logits = lm.lm_head(hidden[:, :-1][mask])
    loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss, n_tokens


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _extra_trainable_state(model: UniRS) -> dict[str, torch.Tensor]:
    """Trainable weights outside the LLM (and BN buffers of a trained change module)."""
    state = {}
    for name, module in (("vision_tower", model.vision_tower), ("mm_projector", model.mm_projector)):
        params = dict(module.named_parameters())
        for key, value in module.state_dict().items():
            param = params.get(key)
            trained = param is not None and param.requires_grad
            in_trained_change = key.startswith("layers.change.") and model.config.train_change_module
            if trained or in_trained_change:
                state[f"{name}.{key}"] = value.detach().contiguous().cpu()
    return state


def save_checkpoint(
    model: UniRS,
    cfg: TrainConfig,
    directory: Path,
    trainer_state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """A resumable checkpoint.

    full / frozen LLM: the whole model in the UniRS layout (weights in the training dtype);
    lora: `adapter/` (PEFT) + `trainable.safetensors` (other trained weights), the base model being
    `model_path`. Both: `trainer_state.pt` (optimizer, scheduler, step, data position, RNG) and a
    readable `trainer_state.json`.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if cfg.llm_mode == "lora":
        model.llm.save_pretrained(tmp / "adapter")
        save_file(_extra_trainable_state(model), str(tmp / "trainable.safetensors"))
    else:
        model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            **trainer_state,
        },
        tmp / "trainer_state.pt",
    )
    readable = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
    (tmp / "trainer_state.json").write_text(json.dumps({**readable, "config": cfg.to_json_dict()}, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _rotate(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def _resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from is None:
        return None
    if str(cfg.resume_from) == "auto":
        found = _checkpoints(cfg.output_dir)
        return found[-1] if found else None
    path = Path(cfg.resume_from)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.pt)")
    return path


def _load_resumed_weights(model: UniRS, checkpoint: Path) -> None:
    """LoRA resume: adapter weights and the other trained weights into the freshly wrapped model."""
    from peft import set_peft_model_state_dict

    adapter_file = checkpoint / "adapter" / "adapter_model.safetensors"
    result = set_peft_model_state_dict(model.llm, load_file(str(adapter_file)))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{adapter_file}: unexpected adapter keys {result.unexpected_keys[:5]}")
    extra = load_file(str(checkpoint / "trainable.safetensors"))
    if extra:
        own = model.state_dict()
        unknown = [k for k in extra if k not in own]
        if unknown:
            raise RuntimeError(f"{checkpoint}/trainable.safetensors: unknown keys {unknown[:5]}")
        model.load_state_dict(extra, strict=False)


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    device = _device(cfg)
    bf16 = _use_bf16(cfg, device)
    if bf16 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = torch.bfloat16 if bf16 else None
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    resume = _resolve_resume(cfg)
    if resume is None and _checkpoints(cfg.output_dir):
        if not cfg.overwrite_output_dir:
            raise FileExistsError(
                f"{cfg.output_dir} already holds checkpoints; resume with resume_from='auto' (--resume-from auto) "
                "or start over with overwrite_output_dir=True (--overwrite-output-dir)"
            )
        for old in _checkpoints(cfg.output_dir):
            shutil.rmtree(old)
    seed_everything(cfg.seed)

    # ---- model
    if resume is not None and cfg.llm_mode != "lora":
        model = load_model_for_training(resume, cfg, device)
    else:
        model = load_model_for_training(cfg.model_path, cfg, device)
    llm_limit = model.config.text_config.max_position_embeddings
    if cfg.max_length > llm_limit:
        raise ValueError(f"max_length {cfg.max_length} exceeds the LLM's {llm_limit} positions")
    model.config.model_max_length = cfg.max_length
    apply_training_policy(model, cfg)
    if resume is not None and cfg.llm_mode == "lora":
        _load_resumed_weights(model, resume)
    if bf16:
        _cast_frozen(model, torch.bfloat16)
    gradient_checkpointing = device.type == "cuda" if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    lm = _causal_lm(model)
    lm.config.use_cache = False
    if gradient_checkpointing:
        _set_checkpointing(lm, True)
    named = trainable_parameters(model)
    if not named:
        raise ValueError("Nothing to train: the LLM, projector, change module and vision tower are all frozen")
    n_trainable = sum(p.numel() for _, p in named)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100.0 * n_trainable / n_total:.2f} %)")

    # ---- data
    builder = SampleBuilder(model.config, model.tokenizer, model.image_processor, cfg.max_length)
    for spec in cfg.datasets:
        spec.use_clues = spec.use_clues and cfg.use_clues
    dataset = MixtureDataset(cfg.datasets, transform=builder, check_files=cfg.check_files)
    for row in dataset.summary():
        log(
            f"dataset {row['name']}: {row['records']} records x{row['repeat']} = {row['samples_per_epoch']} samples "
            f"{row['types']}, {row['with_clue']} with clues"
        )
    groups = dataset.member_datasets if cfg.interleave == "dataset" else None
    sampler = InterleavedSampler(dataset.member_sizes, seed=cfg.seed, member_groups=groups)
    samples_per_epoch = len(sampler)
    micro_per_epoch = math.ceil(samples_per_epoch / cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    if 0 < cfg.save_steps < 1:
        save_every = max(1, math.ceil(cfg.save_steps * total_steps))
    else:
        save_every = int(cfg.save_steps)
    num_workers = cfg.num_workers if cfg.num_workers is not None else (4 if device.type == "cuda" else 0)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    loader_kwargs: dict[str, Any] = {"num_workers": num_workers, "collate_fn": Collator(pad_id)}
    if num_workers > 0:
        loader_kwargs["persistent_workers"] = False
    log(
        f"{samples_per_epoch} samples/epoch, {steps_per_epoch} optimizer steps/epoch, {total_steps} steps in total "
        f"(batch {cfg.batch_size} x accum {cfg.grad_accum}), warmup {warmup_steps}, device {device}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, gradient checkpointing {'on' if gradient_checkpointing else 'off'}"
    )

    fingerprint = {
        "member_sizes": dataset.member_sizes,
        "member_datasets": dataset.member_datasets,
        "interleave": cfg.interleave,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "total_steps": total_steps,
    }

    # ---- optimiser
    optimizer = torch.optim.AdamW(
        _param_groups(named, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(warmup_steps, total_steps, cfg.lr_scheduler)
    )
    step, epoch, consumed = 0, 0, 0
    log_path = cfg.output_dir / "loss_log.jsonl"
    if resume is not None:
        state = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        saved_fingerprint = state.get("data_fingerprint")
        if saved_fingerprint is not None and saved_fingerprint != fingerprint:
            raise ValueError(
                f"{resume} was written with a different data/batch set-up ({saved_fingerprint}) than this run "
                f"({fingerprint}); resuming needs the same datasets, repeats, batch size, accumulation and seed"
            )
        step, epoch, consumed = state["step"], state["epoch"], state["consumed_in_epoch"]
        _set_rng_state(state["rng"])
        log(f"resumed from {resume}: step {step}, epoch {epoch}, {consumed} samples into the epoch")
        if log_path.is_file():  # drop log lines written after the checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            log_path.write_text("".join(ln + "\n" for ln in kept))
    elif log_path.exists():
        log_path.unlink()

    # ---- loop
    set_train_mode(model)
    result = TrainResult(cfg.output_dir, step, None, None)
    progress = None
    if cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="unirs-train", unit="step", dynamic_ncols=True)
    started = time.time()
    with log_path.open("a", encoding="utf-8") as log_file:
        while step < total_steps:
            sampler.set_epoch(epoch, start_index=consumed)
            # A private generator: creating the loader iterator must not draw from the global RNG,
            # or a resumed run would see different dropout masks than an uninterrupted one.
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size,
                sampler=sampler,
                generator=torch.Generator().manual_seed(cfg.seed + epoch),
                **loader_kwargs,
            )
            batches = iter(loader)
            while step < total_steps:
                micro = list(islice(batches, cfg.grad_accum))
                if not micro:
                    break  # epoch exhausted
                n_samples = sum(len(b["ids"]) for b in micro)
                consumed += n_samples
                result.truncated_samples += sum(b["truncated"] for b in micro)
                n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
                if n_tokens == 0:  # every answer was truncated away
                    result.skipped_batches += 1
                    continue
                loss_total = 0.0
                for b in micro:
                    loss_sum, _ = batch_loss(model, b, autocast_dtype)
                    (loss_sum / n_tokens).backward()
                    loss_total += float(loss_sum.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss = loss_total / n_tokens
                result.losses.append(loss)
                entry = {
                    "step": step,
                    "epoch": round(epoch + consumed / max(1, samples_per_epoch), 6),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": n_tokens,
                    "samples": n_samples,
                    "elapsed_s": round(time.time() - started, 3),
                }
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if save_every and step % save_every == 0 and step < total_steps:
                    trainer_state = {
                        "data_fingerprint": fingerprint,
                        "step": step,
                        "epoch": epoch,
                        "consumed_in_epoch": consumed,
                        "total_steps": total_steps,
                    }
                    save_checkpoint(
                        model, cfg, cfg.output_dir / f"checkpoint-{step}", trainer_state, optimizer, scheduler
                    )
                    _rotate(cfg.output_dir, cfg.save_total_limit)
            if step < total_steps:
                epoch += 1
                consumed = 0
    if progress is not None:
        progress.close()

    # ---- final model
    result.steps = step
    result.first_loss = result.losses[0] if result.losses else None
    result.last_loss = result.losses[-1] if result.losses else None
    save_final_model(model, cfg, device, gradient_checkpointing)
    summary = {
        "steps": step,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "skipped_batches": result.skipped_batches,
        "truncated_samples": result.truncated_samples,
        "trainable_parameters": n_trainable,
        "datasets": dataset.summary(),
        "config": cfg.to_json_dict(),
    }
    (cfg.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"saved the final model to {cfg.output_dir}")
    return result


def save_final_model(model: UniRS, cfg: TrainConfig, device: torch.device, gradient_checkpointing: bool) -> None:
    """UniRS layout in `output_dir`; LoRA adapters saved to `adapter/` and merged into the LLM first."""
    model.eval()
    lm = _causal_lm(model)
    if gradient_checkpointing:
        _set_checkpointing(lm, False)
    lm.config.use_cache = True
    if cfg.llm_mode == "lora":
        model.llm.save_pretrained(cfg.output_dir / "adapter")
        model.llm = model.llm.merge_and_unload()
    save_dtype = cfg.save_dtype
    if save_dtype == "auto":
        save_dtype = "bf16" if device.type == "cuda" else "fp32"
    model.to(torch.bfloat16 if save_dtype == "bf16" else torch.float32)
    model.save_pretrained(cfg.output_dir)

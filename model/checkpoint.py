"""Checkpoint layouts: VILA-1.5 and UniRS directories, key remaps, strict loading.

Both layouts are the VILA directory (spec section 7):

    config.json                   VILA LlavaConfig (llm_cfg, vision_tower_cfg, mm_projector_cfg, ...)
    llm/                          LlamaForCausalLM weights + config + tokenizer(.model)
    vision_tower/                 SiglipVisionModel weights (keys "vision_model.*") + preprocessor_config.json
    mm_projector/model.safetensors
        VILA-1.5: layers.{1,2,4}.*                  (Sequential indices; 0 = DownSample, 3 = GELU)
        UniRS:    layers.single.{1,2,4}.*, layers.change.*

Loading is strict: every missing or unexpected key of every component is listed and fails the
load unless it matches an `allow_missing_keys` / `allow_unexpected_keys` pattern (fnmatch on the
component-prefixed key, e.g. "mm_projector.layers.change.*"). The released code loads the
projector with `strict=False` and silently drops VILA's weights (spec section 7.3).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from .configuration_unirs import UniRSConfig
from .modeling_unirs import UniRSModel, UniRSMultimodalProjector
from .processing import ImageProcessor
from .tokenization import load_tokenizer

__all__ = [
    "CheckpointError",
    "attach_base_model",
    "default_device_and_dtype",
    "load_unirs",
    "projector_keys_from_vila",
    "projector_keys_to_vila",
    "save_unirs",
]

ModelT = TypeVar("ModelT", bound=UniRSModel)

_VILA_PROJECTOR_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_SELFTRANS_KEY = re.compile(r"^layers\.change\.selftrans\.(\d+)\.")


# Non-persistent buffers that older transformers versions wrote into checkpoints; they are
# recomputed at init, so finding them is harmless.
BENIGN_UNEXPECTED_KEYS = ("*.position_ids", "*.rotary_emb.inv_freq")


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model: missing/unexpected keys or a broken layout."""


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA if available else CPU; bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


# ---------------------------------------------------------------------------------------------
# Key handling
# ---------------------------------------------------------------------------------------------
def projector_keys_from_vila(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Normalise projector keys to the UniRS naming; returns (state, detected layout).

    VILA `layers.N.*` -> `layers.single.N.*`; UniRS keys are kept. Unknown keys are kept as they
    are so that the strict check reports them as unexpected.
    """
    if any(k.startswith(("layers.single.", "layers.change.")) for k in state):
        return dict(state), "unirs"
    out = {}
    for key, value in state.items():
        match = _VILA_PROJECTOR_KEY.match(key)
        out[f"layers.single.{match.group(1)}.{match.group(2)}" if match else key] = value
    return out, "vila"


def projector_keys_to_vila(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`layers.single.N.*` -> `layers.N.*` (VILA-1.5 layout); a change module cannot be written."""
    if any(k.startswith("layers.change.") for k in state):
        raise CheckpointError("The VILA layout has no place for change-module weights; save with layout='unirs'")
    return {k.replace("layers.single.", "layers.", 1): v for k, v in state.items()}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_keys(
    component: str,
    missing: Iterable[str],
    unexpected: Iterable[str],
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    source: str | Path = "",
) -> None:
    """Raise `CheckpointError` listing every non-allowed missing/unexpected key of `component`."""
    missing = sorted(k for k in (f"{component}.{m}" for m in missing) if not _matches(k, allow_missing))
    allow_unexpected = (*allow_unexpected, *BENIGN_UNEXPECTED_KEYS)
    unexpected = sorted(k for k in (f"{component}.{u}" for u in unexpected) if not _matches(k, allow_unexpected))
    if not missing and not unexpected:
        return
    lines = [f"Checkpoint {source} does not match the {component} of the model."]
    if missing:
        lines.append(
            f"Missing keys ({len(missing)}): " + ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else "")
        )
    if unexpected:
        lines.append(
            f"Unexpected keys ({len(unexpected)}): "
            + ", ".join(unexpected[:50])
            + (" ..." if len(unexpected) > 50 else "")
        )
    lines.append("Pass allow_missing_keys=[...] / allow_unexpected_keys=[...] (fnmatch patterns) to accept them.")
    raise CheckpointError("\n".join(lines))


def _check_hf_loading_info(component: str, info: dict[str, Any], source: Path, allow_missing, allow_unexpected) -> None:
    if info.get("mismatched_keys"):
        raise CheckpointError(f"{source}: shape mismatch for {sorted(info['mismatched_keys'])}")
    if info.get("error_msgs"):
        raise CheckpointError(f"{source}: " + "; ".join(map(str, info["error_msgs"])))
    check_keys(
        component,
        info.get("missing_keys", ()),
        info.get("unexpected_keys", ()),
        allow_missing,
        allow_unexpected,
        source,
    )


def _require_layout(path: Path) -> None:
    missing = [p for p in ("config.json", "llm", "vision_tower", "mm_projector") if not (path / p).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a VILA/UniRS checkpoint directory; missing {missing}")


def _load_projector_state(path: Path) -> dict[str, torch.Tensor]:
    directory = path / "mm_projector"
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(directory / shard))
        return state
    raise CheckpointError(f"No model.safetensors in {directory}")


def _load_projector_into(
    model_projector: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, allow_missing, allow_unexpected
) -> None:
    expected = set(model_projector.state_dict())
    check_keys("mm_projector", expected - set(state), set(state) - expected, allow_missing, allow_unexpected, source)
    present = {k: v for k, v in state.items() if k in expected}
    model_projector.load_state_dict(present, strict=False)


def _infer_settings_from_projector(top: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Settings the released code does not save, recovered from the weights (spec section 8.11)."""
    if "unirs" in top:
        return {}
    has_change = any(k.startswith("layers.change.") for k in state)
    inferred: dict[str, Any] = {"use_change_module": has_change}
    proj_cfg = top.get("mm_projector_cfg") or {}
    if has_change and "cc_n_layers" not in proj_cfg:
        layers = [int(m.group(1)) for k in state if (m := _SELFTRANS_KEY.match(k))]
        inferred["cc_n_layers"] = max(layers) + 1 if layers else 0
        if layers:
            to_q = state.get("layers.change.selftrans.0.0.att.to_q.weight")
            if to_q is not None:
                inferred["cc_attention_dim"] = int(to_q.shape[0])
    return inferred


# ---------------------------------------------------------------------------------------------
# Load / save
# ---------------------------------------------------------------------------------------------
def load_unirs(
    cls: type[ModelT],
    path: str | Path,
    base_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_missing_keys: Sequence[str] = (),
    allow_unexpected_keys: Sequence[str] = (),
    **config_overrides: Any,
) -> ModelT:
    """Build `cls` (a `UniRSModel` subclass, usually `model.UniRS`) from a checkpoint directory.

    See `UniRS.from_pretrained` for the arguments. Raises `CheckpointError` on a broken layout
    or on any missing/unexpected key not allowed by the patterns.
    """
    path = Path(path)
    _require_layout(path)
    device, dtype = default_device_and_dtype(device, dtype)
    top = json.loads((path / "config.json").read_text())
    projector_state, _ = projector_keys_from_vila(_load_projector_state(path))
    overrides = {**_infer_settings_from_projector(top, projector_state), **config_overrides}
    config = UniRSConfig.from_vila_dict(
        top,
        text_config=LlamaConfig.from_pretrained(path / "llm"),
        vision_config=SiglipVisionConfig.from_pretrained(path / "vision_tower"),
        **overrides,
    )

    vision_model, info = SiglipVisionModel.from_pretrained(
        path / "vision_tower", dtype=dtype, attn_implementation="sdpa", output_loading_info=True
    )
    _check_hf_loading_info("vision_tower", info, path / "vision_tower", allow_missing_keys, allow_unexpected_keys)
    llm, info = LlamaForCausalLM.from_pretrained(
        path / "llm", dtype=dtype, attn_implementation="sdpa", output_loading_info=True
    )
    _check_hf_loading_info("llm", info, path / "llm", allow_missing_keys, allow_unexpected_keys)
    config.text_config = llm.config
    config.vision_config = vision_model.config

    if (path / "vision_tower" / "preprocessor_config.json").is_file():
        processor = ImageProcessor.from_pretrained(path / "vision_tower", aspect_ratio=config.image_aspect_ratio)
    else:
        processor = ImageProcessor.from_config(config)
    model = cls(config, load_tokenizer(path / "llm"), vision_model=vision_model, llm=llm, image_processor=processor)
    _load_projector_into(
        model.mm_projector, projector_state, path / "mm_projector", allow_missing_keys, allow_unexpected_keys
    )
    model.to(device=device, dtype=dtype)
    model.eval()
    model.name_or_path = str(path)
    if base_path is not None:
        attach_base_model(model, base_path)
    return model


def _vision_tensor(directory: Path, name: str) -> torch.Tensor | None:
    """Read one vision-tower tensor lazily (either key convention), without loading the file."""
    candidates = [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        candidates = [directory / f for k, f in weight_map.items() if k in (name, f"vision_model.{name}")]
    for file in candidates:
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in (name, f"vision_model.{name}"):
                if key in handle.keys():
                    return handle.get_tensor(key)
    return None


def attach_base_model(
    model: UniRSModel,
    base_path: str | Path,
    allow_missing_keys: Sequence[str] = (),
    allow_unexpected_keys: Sequence[str] = (),
) -> None:
    """Load the base VLM for the clue pass and attach it as `model.base_llm`.

    Only the base LLM is loaded: UniRS keeps VILA's vision tower and `single` projector frozen, so
    the base model's visual features equal ours and are reused. A few vision-tower tensors are
    compared to check that; if the base projector differs, it is loaded as `model.base_projector`.
    """
    base = Path(base_path)
    _require_layout(base)
    vision_dir = base / "vision_tower"
    ours = model.vision_tower.vision_model.state_dict()
    last = model.config.vision_layers_to_run - 1
    probes = ["embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"]
    if last >= 0:
        probes.append(f"encoder.layers.{last}.self_attn.q_proj.weight")
    for name in probes:
        theirs = _vision_tensor(vision_dir, name)
        if theirs is None or theirs.shape != ours[name].shape or not torch.equal(theirs.to(ours[name]), ours[name]):
            raise CheckpointError(
                f"The vision tower of {base} differs from this model's ({name}); the clue pass cannot reuse the "
                "visual features. Prompt augmentation expects the base VLM this model was fine-tuned from."
            )
    llm, info = LlamaForCausalLM.from_pretrained(
        base / "llm", dtype=model.dtype, attn_implementation="sdpa", output_loading_info=True
    )
    _check_hf_loading_info("base_llm", info, base / "llm", allow_missing_keys, allow_unexpected_keys)
    if llm.config.hidden_size != model.config.hidden_size:
        raise CheckpointError(f"Base LLM width {llm.config.hidden_size} != {model.config.hidden_size}")
    base_tokenizer = load_tokenizer(base / "llm")
    if base_tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise CheckpointError(f"The tokenizer of {base} differs from this model's; the clue pass needs the same one")

    state, _ = projector_keys_from_vila(_load_projector_state(base))
    single = {k: v for k, v in state.items() if k.startswith("layers.single.")}
    ours_single = {k: v for k, v in model.mm_projector.state_dict().items() if k.startswith("layers.single.")}
    same = set(single) == set(ours_single) and all(
        torch.equal(single[k].to(ours_single[k]), ours_single[k]) for k in ours_single
    )
    if same:
        model.base_projector = None
    else:
        base_config = UniRSConfig.from_dict(model.config.to_dict(), use_change_module=False)
        projector = UniRSMultimodalProjector(base_config)
        _load_projector_into(projector, single, base / "mm_projector", allow_missing_keys, allow_unexpected_keys)
        model.base_projector = projector.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)
    model.base_llm = llm.to(model.device).eval().requires_grad_(False)


def save_unirs(model: UniRSModel, path: str | Path, layout: str = "unirs") -> Path:
    """Write `model` in the VILA directory layout. layout: "unirs" (change keys) or "vila" (VILA-1.5 keys)."""
    if layout not in ("unirs", "vila"):
        raise ValueError(f"layout must be 'unirs' or 'vila', got {layout!r}")
    if layout == "vila" and model.config.use_change_module:
        raise CheckpointError("The VILA layout has no change module; build the model with use_change_module=False")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    llm_dir = path / "llm"
    model.llm.save_pretrained(llm_dir)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(llm_dir)
        # VILA-1.5 ships the SentencePiece model; keep it next to tokenizer.json when we have it.
        source = getattr(model.tokenizer, "vocab_file", None)
        target = llm_dir / "tokenizer.model"
        if source and Path(source).is_file() and not target.exists():
            shutil.copyfile(source, target)

    vision_dir = path / "vision_tower"
    vision_dir.mkdir(exist_ok=True)
    vision_model = model.vision_tower.vision_model
    # VILA/transformers-4 checkpoints prefix the SigLIP keys with "vision_model."; keep that.
    state = {f"vision_model.{k}": v.detach().contiguous() for k, v in vision_model.state_dict().items()}
    save_file(state, str(vision_dir / "model.safetensors"), metadata={"format": "pt"})
    vision_config = vision_model.config.to_dict()
    vision_config["architectures"] = ["SiglipVisionModel"]
    (vision_dir / "config.json").write_text(json.dumps(vision_config, indent=2, sort_keys=True) + "\n")
    model.image_processor.save_pretrained(vision_dir)

    projector_dir = path / "mm_projector"
    projector_dir.mkdir(exist_ok=True)
    projector_state = {k: v.detach().contiguous() for k, v in model.mm_projector.state_dict().items()}
    if layout == "vila":
        projector_state = projector_keys_to_vila(projector_state)
    save_file(projector_state, str(projector_dir / "model.safetensors"), metadata={"format": "pt"})
    (projector_dir / "config.json").write_text(json.dumps(model.config.mm_projector_dict(), indent=2) + "\n")

    top = model.config.to_vila_dict()
    if layout == "vila":
        top.pop("unirs")  # a VILA-1.5 config has no UniRS section
    (path / "config.json").write_text(json.dumps(top, indent=2, sort_keys=True) + "\n")
    return path

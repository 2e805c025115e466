"""The public `UniRS` class: the network (`modeling_unirs`), its text API (`inference`) and its
checkpoint I/O (`checkpoint`) in one object.

Import order inside `model/` (enforced by tests/test_architecture.py):

    configuration_unirs -> modeling_change -> modeling_unirs -> inference | checkpoint -> unirs

Nothing below this module imports it, so each layer can be read and tested without the ones
above it; this module only wires them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import attach_base_model, load_unirs, save_unirs
from .inference import UniRSInferenceMixin
from .modeling_unirs import UniRSModel

__all__ = ["UniRS"]


class UniRS(UniRSInferenceMixin, UniRSModel):
    """UniRS: SigLIP + (change module) + mlp_downsample projector + LLaMA, with the text API.

    Build with `UniRS(config)` (random weights) or `UniRS.from_pretrained(dir)`. Inference:
    `caption_change`, `answer`, `classify_sequence`, `analyse_pair` (see `model.inference`);
    training and scoring: `forward` (see `model.modeling_unirs.UniRSModel`).
    """

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base_path: str | Path | None = None,
        device: str | torch.device | None = None,
        *,
        dtype: torch.dtype | None = None,
        allow_missing_keys: Sequence[str] = (),
        allow_unexpected_keys: Sequence[str] = (),
        **config_overrides: Any,
    ) -> UniRS:
        """Load a VILA-1.5 or UniRS checkpoint directory (`llm/`, `vision_tower/`, `mm_projector/`, `config.json`).

        base_path: a VILA-1.5-3B checkpoint; when given, prompt augmentation is on.
        device: default CUDA if available else CPU. dtype: default bf16 on CUDA, fp32 on CPU.
        allow_missing_keys / allow_unexpected_keys: fnmatch patterns over prefixed keys such as
        `mm_projector.layers.change.*`; anything else missing or unexpected fails the load
        (`CheckpointError`). config_overrides: UniRSConfig fields, e.g. `use_change_module=True`
        on a VILA checkpoint.
        """
        return load_unirs(
            cls,
            path,
            base_path=base_path,
            device=device,
            dtype=dtype,
            allow_missing_keys=allow_missing_keys,
            allow_unexpected_keys=allow_unexpected_keys,
            **config_overrides,
        )

    def save_pretrained(self, path: str | Path, layout: str = "unirs") -> Path:
        """Write the VILA directory layout. layout="vila" writes VILA projector keys (no change module)."""
        return save_unirs(self, path, layout=layout)

    def load_base_model(self, base_path: str | Path, **kwargs: Any) -> None:
        """Load the base VLM (VILA-1.5-3B) LLM for prompt augmentation."""
        attach_base_model(self, base_path, **kwargs)

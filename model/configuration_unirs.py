"""Configuration for UniRS (VILA-1.5-3B + change-extraction module + prompt augmentation).

`UniRSConfig` is a plain dataclass holding the two stock sub-configs (`SiglipVisionConfig`,
`LlamaConfig`) plus the projector, change-module, input and prompt settings. It serialises to
its own JSON (`to_dict` / `from_dict`) and to and from VILA's top-level ``config.json``
(`to_vila_dict` / `from_vila_dict`), which keeps the change-module settings that the released
code drops (spec section 7.2).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, SiglipVisionConfig

__all__ = ["PRESETS", "InputType", "UniRSConfig"]


class InputType(StrEnum):
    """How the visual input of one sample is routed through the projector.

    Routing is by this explicit flag, never by image count: the released projector routes by
    count, which is ambiguous as soon as `num_video_frames` is 1 or 2 (spec section 1.4).
    """

    IMAGE = "image"
    PAIR = "pair"
    VIDEO = "video"


# VILA-1.5 stores the SigLIP image mean/std in the processor config; 0.5/0.5 for so400m.
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Spec section 4 [I]: the authors' clue prompts are unknown; these are parameterised stand-ins.
DEFAULT_CLUE_PROMPTS = {
    InputType.IMAGE.value: "Describe this remote sensing image in detail.",
    InputType.PAIR.value: "Describe the two remote sensing images and any differences between them.",
    InputType.VIDEO.value: "Describe what is happening in this aerial video.",
}
DEFAULT_TASK_TAGS = {
    InputType.IMAGE.value: "[vqa]",
    InputType.PAIR.value: "[change]",
    InputType.VIDEO.value: "[video]",
}


@dataclass
class UniRSConfig:
    """All settings needed to build a `UniRS` model.

    Shapes for the released 3B model (spec section 1): SigLIP so400m at 384 px gives
    (N, 729, 1152) features from `hidden_states[-2]`; the `mlp_downsample` projector maps them to
    (N, 196, 2560); the LLaMA LLM has hidden size 2560.
    """

    vision_config: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    text_config: LlamaConfig = field(default_factory=LlamaConfig)

    # Vision feature selection (VILA flags --mm_vision_select_layer -2 --mm_vision_select_feature cls_patch).
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "cls_patch"
    mm_projector_type: str = "mlp_downsample"

    # Inputs.
    image_aspect_ratio: str = "pad"  # "pad" (UniRS training) or "resize" (VILA-1.5, eval scripts).
    image_mean: tuple[float, float, float] = _SIGLIP_MEAN
    image_std: tuple[float, float, float] = _SIGLIP_STD
    num_video_frames: int = 8
    image_token: str = "<image>"
    image_token_index: int = -200
    model_max_length: int = 4096

    # Change-extraction module (Chg2Cap AttentiveEncoder). `cc_*` defaults are the released eval values.
    use_change_module: bool = True
    cc_n_layers: int = 0
    cc_head: int = 8
    cc_attention_dim: int = 512
    cc_dropout: float = 0.0
    change_module_init_seed: int = 42
    # A model without a change module (plain VILA) sees a pair as two images, two placeholders.

    # What is trained (released sft.sh: LLM only). Frozen parts are kept in eval mode, so the
    # change module's BatchNorms always use their running statistics (spec section 2.2).
    tune_language_model: bool = True
    tune_vision_tower: bool = False
    tune_mm_projector: bool = False
    train_change_module: bool = False

    # Conversation.
    conv_template: str = "vicuna_v1"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    # Default instructions (teaser figure, spec section 3.4).
    caption_prompt: str = "Please briefly describe the main changes between the above two remote sensing images."
    video_question: str = "What is the event in the video?"

    # Generation defaults. The released change-caption eval keeps the first 42 generated tokens.
    caption_max_new_tokens: int = 42
    answer_max_new_tokens: int = 128

    # Prompt augmentation (spec section 4). Active only when base-model weights are loaded.
    clue_prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CLUE_PROMPTS))
    task_tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TASK_TAGS))
    clue_open: str = "<clue>"
    clue_close: str = "</clue>"
    augmented_instruction_template: str = "{clue_open}{clue}{clue_close}\n{task_tag} {instruction}"
    clue_max_new_tokens: int = 128
    # How the base VLM sees a pair in the clue pass: "two_images" (VILA-1.5 multi-image prompt)
    # or "separate" (one clue per image, joined). Unknown in the paper (spec section 4).
    clue_pair_mode: str = "two_images"

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig.from_dict(self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = LlamaConfig.from_dict(self.text_config)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if self.mm_vision_select_feature != "cls_patch":
            # SigLIP has no CLS token: "patch" would drop a real patch and leave 728 tokens,
            # which cannot be reshaped to the 27x27 grid the DownSampleBlock expects.
            raise ValueError(
                f"mm_vision_select_feature={self.mm_vision_select_feature!r} is not supported for SigLIP; "
                "use 'cls_patch' (all tokens)."
            )
        if self.mm_projector_type != "mlp_downsample":
            raise ValueError(f"Only the 'mlp_downsample' projector is implemented, got {self.mm_projector_type!r}")
        if self.image_aspect_ratio not in ("pad", "resize"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'resize', got {self.image_aspect_ratio!r}")
        if self.clue_pair_mode not in ("two_images", "separate"):
            raise ValueError(f"clue_pair_mode must be 'two_images' or 'separate', got {self.clue_pair_mode!r}")
        if self.num_video_frames < 1:
            raise ValueError("num_video_frames must be >= 1")
        if self.mm_hidden_size % 2:
            raise ValueError("The change module splits the vision width in two halves; it must be even.")
        n_layers = self.vision_config.num_hidden_layers
        if not -n_layers - 1 <= self.mm_vision_select_layer <= n_layers:
            raise ValueError(f"mm_vision_select_layer {self.mm_vision_select_layer} out of range for {n_layers} layers")

    # ------------------------------------------------------------------ derived sizes
    @property
    def mm_hidden_size(self) -> int:
        """Width C of the vision features (1152 for SigLIP so400m)."""
        return self.vision_config.hidden_size

    @property
    def hidden_size(self) -> int:
        """Width D of the LLM (2560 for VILA-1.5-3B)."""
        return self.text_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def grid_size(self) -> int:
        """Side of the vision token grid: 384 // 14 = 27."""
        return self.image_size // self.patch_size

    @property
    def num_vision_tokens(self) -> int:
        """Tokens per image out of the vision tower: 27 * 27 = 729."""
        return self.grid_size**2

    @property
    def tokens_per_image(self) -> int:
        """LLM positions per image after the 2x2 DownSampleBlock: ceil(27 / 2)^2 = 196."""
        return math.ceil(self.grid_size / 2) ** 2

    @property
    def vision_layers_to_run(self) -> int:
        """Encoder layers needed for `hidden_states[select_layer]` (hidden_states[0] is the embeddings)."""
        n = self.vision_config.num_hidden_layers
        return self.mm_vision_select_layer if self.mm_vision_select_layer >= 0 else n + 1 + self.mm_vision_select_layer

    def num_placeholders(self, input_type: InputType | str) -> int:
        """`<image>` placeholders in the prompt for one input of `input_type`."""
        input_type = InputType(input_type)
        if input_type is InputType.IMAGE:
            return 1
        if input_type is InputType.PAIR:
            return 1 if self.use_change_module else 2
        return self.num_video_frames

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("vision_config", "text_config"):
                value = value.to_dict()
                value.pop("_name_or_path", None)  # where it was loaded from, not a setting
            elif isinstance(value, tuple):
                value = list(value)
            else:
                value = copy.deepcopy(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> UniRSConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown UniRSConfig fields: {sorted(unknown)}")
        kwargs = {k: copy.deepcopy(v) for k, v in data.items()}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | Path) -> UniRSConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # VILA top-level config.json --------------------------------------------------
    _VILA_KEYS = (
        "mm_vision_select_layer",
        "mm_vision_select_feature",
        "image_aspect_ratio",
        "num_video_frames",
        "model_max_length",
    )

    def mm_projector_dict(self) -> dict[str, Any]:
        """`mm_projector/config.json`, with the `cc_*` keys the released code loses on save."""
        out: dict[str, Any] = {
            "architectures": ["MultimodalProjector"],
            "model_type": "v2l_projector",
            "mm_projector_type": self.mm_projector_type,
        }
        if self.use_change_module:
            out.update(
                cc_n_layers=self.cc_n_layers,
                cc_head=self.cc_head,
                cc_attention_dim=self.cc_attention_dim,
                cc_dropout=self.cc_dropout,
            )
        return out

    def to_vila_dict(self) -> dict[str, Any]:
        """VILA-1.5 style top-level config; UniRS-only settings go under the `"unirs"` key."""
        unirs = self.to_dict()
        vision, text = unirs.pop("vision_config"), unirs.pop("text_config")
        out: dict[str, Any] = {
            "architectures": ["LlavaLlamaModel"],
            "model_type": "llava_llama",
            "llm_cfg": text,
            "vision_tower_cfg": vision,
            "mm_projector_cfg": self.mm_projector_dict(),
            "hidden_size": self.hidden_size,
            "mm_hidden_size": self.mm_hidden_size,
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "vision_resolution": self.image_size,
            "interpolate_mode": "linear",
            "drop_path_rate": 0.0,
            "s2": False,
            "model_dtype": "torch.bfloat16",
            "tune_language_model": self.tune_language_model,
            "tune_vision_tower": self.tune_vision_tower,
            "tune_mm_projector": self.tune_mm_projector,
            "unirs": unirs,
        }
        for key in self._VILA_KEYS:
            out[key] = unirs[key]
        return out

    @classmethod
    def from_vila_dict(
        cls,
        data: dict[str, Any],
        text_config: LlamaConfig | None = None,
        vision_config: SiglipVisionConfig | None = None,
        **overrides: Any,
    ) -> UniRSConfig:
        """Build from a VILA/UniRS top-level `config.json`.

        `text_config` / `vision_config` (read from `llm/` and `vision_tower/`) win over the copies
        embedded in the top-level file, because they describe the weights actually on disk.
        VILA-1.5 itself uses `image_aspect_ratio="resize"`; that value is kept as found.
        """
        kwargs: dict[str, Any] = {}
        unirs = data.get("unirs")
        if unirs is not None:
            kwargs.update({k: v for k, v in unirs.items() if k not in ("vision_config", "text_config")})
        else:
            for key in cls._VILA_KEYS:
                if key in data:
                    kwargs[key] = data[key]
            proj = data.get("mm_projector_cfg") or {}
            for key in ("cc_n_layers", "cc_head", "cc_attention_dim", "cc_dropout"):
                if key in proj:
                    kwargs[key] = proj[key]
            for key in ("tune_language_model", "tune_vision_tower", "tune_mm_projector"):
                if key in data:
                    kwargs[key] = bool(data[key])
        if text_config is None:
            text_config = LlamaConfig.from_dict(data["llm_cfg"])
        if vision_config is None:
            vision_config = SiglipVisionConfig.from_dict(data["vision_tower_cfg"])
        kwargs["text_config"] = text_config
        kwargs["vision_config"] = vision_config
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, vocab_size: int | None = None, **overrides: Any) -> UniRSConfig:
        """Named sizes: `"unirs-3b"` (the released model), `"mid"` (benchmark, ~170 M), `"tiny"` (tests)."""
        if name not in PRESETS:
            raise KeyError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        preset = copy.deepcopy(PRESETS[name])
        text = preset.pop("text_config")
        vision = preset.pop("vision_config")
        if vocab_size is not None:
            text["vocab_size"] = vocab_size
        preset.update(overrides)
        return cls(vision_config=SiglipVisionConfig(**vision), text_config=LlamaConfig(**text), **preset)


_LLAMA_COMMON = dict(
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_SIGLIP_COMMON = dict(image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    # Spec section 1: SigLIP so400m-patch14-384 + Sheared-LLaMA-2.7B sizes.
    "unirs-3b": dict(
        vision_config=dict(
            _SIGLIP_COMMON, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16
        ),
        text_config=dict(
            _LLAMA_COMMON,
            vocab_size=32000,
            hidden_size=2560,
            intermediate_size=6912,
            num_hidden_layers=32,
            num_attention_heads=20,
            num_key_value_heads=20,
        ),
    ),
    # Benchmark size: ~170 M parameters, same token geometry (729 -> 196 per image).
    "mid": dict(
        vision_config=dict(
            _SIGLIP_COMMON, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6
        ),
        text_config=dict(
            _LLAMA_COMMON,
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
        cc_head=8,
        cc_attention_dim=128,
    ),
    # Tests: a few million parameters, still 384 px / 729 vision tokens / 196 LLM rows per image.
    "tiny": dict(
        vision_config=dict(
            _SIGLIP_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2
        ),
        text_config=dict(
            _LLAMA_COMMON,
            vocab_size=32000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            initializer_range=0.1,
        ),
        cc_head=2,
        cc_attention_dim=32,
    ),
}

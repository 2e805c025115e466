"""Test support: a tiny real SentencePiece/LLaMA tokenizer and random checkpoints in the real layouts.

`write_random_checkpoint(path, layout="unirs", preset="tiny")` writes a complete VILA-style
directory (`llm/` with `tokenizer.model`, `vision_tower/`, `mm_projector/`, `config.json`) with
seeded random weights, so tests exercise the real loading code on CPU in about a second.

The tokenizer is a byte-fallback BPE SentencePiece model with LLaMA's special ids
(<unk> 0, <s> 1, </s> 2), trained on the small built-in corpus below. Training takes a few
milliseconds and is deterministic, so nothing is cached on disk.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .configuration_unirs import UniRSConfig

__all__ = ["TOKENIZER_CORPUS", "build_random_model", "random_image", "train_tiny_tokenizer", "write_random_checkpoint"]

TOKENIZER_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: Please briefly describe the main changes between the above two remote sensing images.
ASSISTANT: Some new buildings have been constructed.
USER: What is the event in the video? ASSISTANT: This is a video about police chase.
USER: How many tennis courts in the image? ASSISTANT: There are two tennis courts in the image.
Describe this remote sensing image in detail.
Describe the two remote sensing images and any differences between them.
Describe what is happening in this aerial video.
A new road has been built across the bare land near the river.
The trees on the left side are removed and several houses appear in the top right corner.
There is no change between the two images.
Many villas are built along the road and a parking lot appears at the bottom.
The farmland has been replaced by a residential area with small houses.
Is there a building in the image? Yes. Is the number of roads larger than the number of water areas? No.
Is it a rural or an urban area? It is an urban area with dense buildings.
post-earthquake, flood, fire, landslide, mudslide, traffic collision, traffic congestion, harvesting,
ploughing, constructing, police chase, conflict, baseball, basketball, boating, cycling, running,
soccer, swimming, car racing, party, concert, parade, protest, religious activity, non-event.
Has any new building been constructed? Have any trees been removed? Has the water area changed?
The satellite image shows a harbour with ships, a stadium, an airport runway and an industrial area.
The scene was captured on 12 March 2021 at 10:30 with a resolution of 0.5 metres per pixel.
"""


def train_tiny_tokenizer(vocab_size: int = 512) -> bytes:
    """Train the tiny LLaMA-style SentencePiece BPE model; returns the serialised `tokenizer.model`.

    Settings follow LLaMA's tokenizer: BPE, byte fallback, split digits, dummy prefix, identity
    normalisation, unk/bos/eos = 0/1/2 and no pad piece. Single-threaded, hence deterministic.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS.splitlines()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _write_tokenizer(llm_dir: Path, model_bytes: bytes) -> None:
    llm_dir.mkdir(parents=True, exist_ok=True)
    (llm_dir / "tokenizer.model").write_bytes(model_bytes)
    # The fields VILA-1.5's llm/tokenizer_config.json carries.
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
        "padding_side": "right",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False,
    }
    (llm_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (llm_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_random_model(config: UniRSConfig, seed: int = 0, vision_seed: int | None = None):
    """A `UniRS` with seeded random weights (no tokenizer). The global RNG is left untouched.

    vision_seed seeds the vision tower and the `single` projector (default: `seed`), so a VILA
    and a UniRS checkpoint can share them, as the real base and fine-tuned models do; `seed`
    seeds the LLM and the change module.
    """
    from transformers import LlamaForCausalLM, SiglipVisionModel

    from .modeling_unirs import UniRSMultimodalProjector
    from .unirs import UniRS

    vision_seed = seed if vision_seed is None else vision_seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(vision_seed)
        vision_model = SiglipVisionModel(config.vision_config)
        single = UniRSMultimodalProjector(UniRSConfig.from_dict(config.to_dict(), use_change_module=False))
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(config.text_config)
        model = UniRS(config, vision_model=vision_model, llm=llm)
    model.mm_projector.load_state_dict(single.state_dict(), strict=False)
    if config.use_change_module:
        model.mm_projector.change.reset_parameters(torch.Generator().manual_seed(seed + 1))
    return model.eval()


def write_random_checkpoint(
    path: str | Path,
    layout: str = "unirs",
    preset: str = "tiny",
    seed: int = 0,
    *,
    vision_seed: int | None = None,
    **config_overrides,
) -> Path:
    """Write a random checkpoint in the real `layout` ("vila" = VILA-1.5 base, "unirs" = with change module).

    Returns `path`. `config_overrides` are UniRSConfig fields (e.g. `cc_n_layers=1`).
    """
    from .tokenization import tokenizer_from_sentencepiece

    if layout not in ("vila", "unirs"):
        raise ValueError(f"layout must be 'vila' or 'unirs', got {layout!r}")
    path = Path(path)
    llm_dir = path / "llm"
    _write_tokenizer(llm_dir, train_tiny_tokenizer())
    tokenizer = tokenizer_from_sentencepiece(llm_dir / "tokenizer.model", pad_token="<unk>")
    config_overrides.setdefault("use_change_module", layout == "unirs")
    if layout == "vila":
        config_overrides.setdefault("image_aspect_ratio", "resize")  # VILA-1.5's own setting
    config = UniRSConfig.from_preset(preset, vocab_size=len(tokenizer), **config_overrides)
    model = build_random_model(config, seed=seed, vision_seed=vision_seed)
    model.tokenizer = None  # the SentencePiece files above are the VILA tokenizer layout
    model.save_pretrained(path, layout=layout)
    return path


def random_image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A deterministic random RGB uint8 image (H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def temporary_checkpoint(layout: str = "unirs", **kwargs) -> Path:
    """`write_random_checkpoint` into a fresh temporary directory (caller cleans up)."""
    return write_random_checkpoint(Path(tempfile.mkdtemp(prefix=f"unirs-{layout}-")), layout, **kwargs)

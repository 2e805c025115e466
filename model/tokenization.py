"""Loading the LLaMA tokenizer of a VILA/UniRS checkpoint (`llm/tokenizer.model`).

transformers 5 only has the tokenizers-backed `LlamaTokenizer`. Converting a SentencePiece
`tokenizer.model` goes through `SentencePieceExtractor`, which needs `protobuf`. VILA-1.5's
`llm/` folder ships only `tokenizer.model`, so when `tokenizer.json` is absent and protobuf is
not installed, the same conversion (vocab + merges for the byte-fallback BPE) is done here with
the `sentencepiece` library itself. The result encodes like the SentencePiece model (tested),
except for text that *starts* with a space, where the fast tokenizer does not add a second "▁".
UniRS prompts never start a chunk with a space (instructions are stripped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase
from transformers.utils import is_protobuf_available

__all__ = ["load_tokenizer", "tokenizer_from_sentencepiece"]

_INIT_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "add_bos_token",
    "add_eos_token",
    "model_max_length",
    "padding_side",
    "legacy",
    "clean_up_tokenization_spaces",
)


def _token_content(value: Any) -> Any:
    # Old tokenizer_config.json files store special tokens as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_from_sentencepiece(model_file: str | Path, **kwargs: Any) -> LlamaTokenizer:
    """Build a `LlamaTokenizer` from a SentencePiece BPE model without protobuf."""
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    merges = generate_merges(vocab)
    specials = {
        "unk_token": processor.id_to_piece(processor.unk_id()) if processor.unk_id() >= 0 else "<unk>",
        "bos_token": processor.id_to_piece(processor.bos_id()) if processor.bos_id() >= 0 else "<s>",
        "eos_token": processor.id_to_piece(processor.eos_id()) if processor.eos_id() >= 0 else "</s>",
    }
    for key, value in specials.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("legacy", False)
    return LlamaTokenizer(vocab=vocab, merges=merges, vocab_file=str(model_file), **kwargs)


def load_tokenizer(llm_dir: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer of `llm_dir`, with VILA's settings: `pad_token = unk_token`, no EOS appended.

    Prefers `tokenizer.json` (transformers' own loader); falls back to converting `tokenizer.model`.
    """
    llm_dir = Path(llm_dir)
    has_json = (llm_dir / "tokenizer.json").is_file()
    has_spm = (llm_dir / "tokenizer.model").is_file()
    if has_json or (has_spm and is_protobuf_available()):
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, legacy=False)
    elif has_spm:
        config_file = llm_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        kwargs = {k: _token_content(config[k]) for k in _INIT_KEYS if k in config and config[k] is not None}
        tokenizer = tokenizer_from_sentencepiece(llm_dir / "tokenizer.model", **kwargs)
    else:
        raise FileNotFoundError(f"No tokenizer.json or tokenizer.model in {llm_dir}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer

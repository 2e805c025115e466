"""UniRS vision-language model library (VILA-1.5-3B + change extraction + prompt augmentation).

Stable API used by the monitoring service::

    from model import UniRS

    model = UniRS.from_pretrained(path, base_path=None, device=None)
    model.caption_change(before, after) -> str
    model.answer(image_or_pair, question) -> str            # pair = (before, after) tuple
    model.classify_sequence(frames, classes) -> SequenceClassification
        # .label, .raw_text, .score, .clue, .method; unpacks as (label, raw_text)
    match_class(text, classes) -> ClassMatch(label, method, score)   # the one text -> class mapper
    model.analyse_pair(before, after, questions: list[str], max_new_tokens=None) -> PairAnalysis
        # .caption: str, .answers: list[str] (one per question), .questions, .clue (None without base_path)

Images are PIL images, numpy uint8 arrays (H, W, 3) or file paths; frames are a list of those,
a (T, H, W, 3) array or a directory of image files. Decoding is greedy (deterministic).
`from_pretrained` reads the VILA-1.5 and UniRS checkpoint layouts strictly (see
`model.checkpoint`); `base_path` (VILA-1.5-3B) turns prompt augmentation on. Defaults: CUDA and
bf16 if available, else CPU and fp32.

Test helpers live in `model.testing` (`write_random_checkpoint(path, layout="vila"|"unirs",
preset="tiny", seed=0)`).
"""

from .checkpoint import CheckpointError
from .class_mapping import ClassMatch, match_class
from .configuration_unirs import InputType, UniRSConfig
from .generation import SamplingConfig
from .inference import PairAnalysis, SequenceClassification
from .modeling_unirs import UniRSModel, VisualInput
from .unirs import UniRS

__all__ = [
    "CheckpointError",
    "ClassMatch",
    "InputType",
    "PairAnalysis",
    "SamplingConfig",
    "SequenceClassification",
    "UniRS",
    "UniRSConfig",
    "UniRSModel",
    "VisualInput",
    "match_class",
]

"""UniRS evaluation: the paper's scorers (RSVQA accuracy by type, change-captioning metrics with
CIDEr-D, ERA per-class accuracy) and the `unirs-eval` command line (spec section 6).

Scoring needs only numpy (and pycocoevalcap + Java for PTB tokenisation, BLEU/METEOR/ROUGE-L);
generating predictions needs the model library.
"""

from .captioning import score_captions
from .era import ERA_CLASSES, map_to_class, score_era
from .metrics import CiderD, caption_metrics, simple_tokenize
from .rsvqa import normalise_answer, score_rsvqa

__all__ = [
    "ERA_CLASSES",
    "CiderD",
    "caption_metrics",
    "map_to_class",
    "normalise_answer",
    "score_captions",
    "score_era",
    "score_rsvqa",
    "simple_tokenize",
]

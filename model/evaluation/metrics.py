"""Captioning metrics as reported for LEVIR-CC: BLEU-1..4, METEOR, ROUGE-L (pycocoevalcap) and CIDEr-D.

All scorers take the coco-caption data shape:

    gts = {item_id: [reference, ...]}     res = {item_id: [candidate]}

with captions already tokenised and joined by single spaces (see `tokenize_captions`).

CIDEr-D (`CiderD`) is implemented here, following Vedantam et al. 2015 (section 6.1 of the paper,
"CIDEr-D") and the reference code (coco-caption `cider_scorer.py` / pyciderevalcap
`ciderD_scorer.py`) operation for operation:

* n-grams of order 1..4; each item's term-frequency vector is weighted by
  idf(g) = log(N) - log(max(1, df(g))), where N is the number of evaluated items and df(g) the
  number of items whose *reference set* contains g (document frequencies from the references
  of the evaluated set, pyciderevalcap `df="corpus"`);
* per order n, a clipped cosine: sum_g min(v_c(g), v_r(g)) * v_r(g) / (|v_c| |v_r|) (0 if either
  norm is 0), times a Gaussian length penalty exp(-delta^2 / (2 sigma^2)) with sigma = 6;
* averaged over the orders (mean, not sum), over the references, and multiplied by 10.

One quirk of the reference code is kept on purpose: the "length" in the penalty is the number of
*bigrams* (the code counts term frequencies where `n == 1` with a 0-based order index), i.e.
words - 1 for a non-empty sentence. For any two non-empty sentences the length difference is the
same as with word counts.

Note: the scorer shipped by pycocoevalcap 1.2 as `Cider` already contains the CIDEr-D changes
(clipping, Gaussian penalty, x10) and, with document frequencies from the evaluated references,
gives the same numbers as this implementation (checked in the tests). The implementation is kept
independent so the metric does not silently change with a dependency.

Papers on LEVIR-CC (and the UniRS project page, "CIDEr-D 139.12") print these values x100.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "PTB_PUNCTUATION",
    "CiderD",
    "bleu",
    "caption_metrics",
    "cider_d",
    "java_available",
    "meteor",
    "rouge_l",
    "simple_tokenize",
    "tokenize_captions",
]

# Tokens dropped by pycocoevalcap's PTBTokenizer after tokenisation.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_SIMPLE_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def simple_tokenize(text: str) -> str:
    """Java-free approximation of the coco-caption pipeline: lower-case, split off punctuation, drop it.

    "A road is built." -> "a road is built". Hyphenated words are split ("post-earthquake" ->
    "post earthquake") where PTB would keep them; use `tokenize_captions(..., "ptb")` for
    numbers comparable with published ones.
    """
    tokens = _SIMPLE_TOKEN.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and re.search(r"[a-z0-9]", t))


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize_captions(captions: Mapping[Any, Sequence[str]], method: str = "ptb") -> dict[Any, list[str]]:
    """Tokenise {id: [caption, ...]}.

    method: "ptb" (Stanford PTBTokenizer through pycocoevalcap, needs Java; what coco-caption and
    the LEVIR-CC papers use), "simple" (`simple_tokenize`) or "none" (whitespace-normalise only,
    for already tokenised text).
    """
    if method == "none":
        return {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}
    if method == "simple":
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    if method != "ptb":
        raise ValueError(f"Unknown tokenizer {method!r}; use 'ptb', 'simple' or 'none'")
    if not java_available():
        raise RuntimeError(
            "The PTB tokenizer needs Java (java not found on PATH); install a JRE or use --tokenizer simple"
        )
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer keys its output by id and relies on one caption per line.
    keys = list(captions)
    index = {str(i): k for i, k in enumerate(keys)}
    payload = {str(i): [{"caption": c.replace("\n", " ")} for c in captions[k]] for i, k in enumerate(keys)}
    out = PTBTokenizer().tokenize(payload)
    return {index[i]: out.get(i, []) for i in payload}


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------
def _ngram_counts(sentence: str, n: int) -> Counter:
    words = sentence.split()
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies from the references of the evaluated set.

    `compute_score(gts, res)` returns (corpus score, per-item scores), like the coco-caption
    scorers. Scores are on the coco scale (a perfect match of a 5-reference set is about 10 for
    long captions); multiply by 100 for the tables in the LEVIR-CC literature.
    """

    def __init__(self, n: int = 4, sigma: float = 6.0):
        self.n = n
        self.sigma = sigma

    def method(self) -> str:
        return "CIDEr-D"

    def _vector(self, counts: Counter, df: Mapping[tuple, float], log_n_items: float):
        vec: list[dict[tuple, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_n_items - math.log(max(1.0, df.get(gram, 0.0))))
            vec[order][gram] = weight
            norm[order] += weight * weight
            if order == 1:  # reference-code quirk: "length" counts bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, cand, ref) -> list[float]:
        vec_c, norm_c, len_c = cand
        vec_r, norm_r, len_r = ref
        delta = float(len_c - len_r)
        penalty = math.exp(-(delta**2) / (2 * self.sigma**2))
        out = []
        for order in range(self.n):
            val = 0.0
            for gram, weight in vec_c[order].items():
                ref_weight = vec_r[order].get(gram, 0.0)
                val += min(weight, ref_weight) * ref_weight  # clipping
            if norm_c[order] != 0 and norm_r[order] != 0:
                val /= norm_c[order] * norm_r[order]
            out.append(val * penalty)
        return out

    def compute_score(self, gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str] | str]):
        if set(gts) != set(res):
            raise ValueError("gts and res must have the same ids")
        if not gts:
            raise ValueError("Nothing to score")
        ids = list(gts)
        ref_counts = []
        for key in ids:
            refs = gts[key]
            if isinstance(refs, str) or not refs:
                raise ValueError(f"Item {key!r}: references must be a non-empty list of strings")
            ref_counts.append([_ngram_counts(r, self.n) for r in refs])
        cand_counts = []
        for key in ids:
            cand = res[key]
            if not isinstance(cand, str):
                if len(cand) != 1:
                    raise ValueError(f"Item {key!r}: exactly one candidate caption is needed, got {len(cand)}")
                cand = cand[0]
            cand_counts.append(_ngram_counts(cand, self.n))
        df: Counter = Counter()
        for refs in ref_counts:
            df.update({g for counts in refs for g in counts})
        log_n_items = math.log(float(len(ids)))
        scores = []
        for cand, refs in zip(cand_counts, ref_counts, strict=True):
            cvec = self._vector(cand, df, log_n_items)
            total = [0.0] * self.n
            for ref in refs:
                sim = self._similarity(cvec, self._vector(ref, df, log_n_items))
                total = [a + b for a, b in zip(total, sim, strict=True)]
            scores.append(10.0 * (sum(total) / self.n) / len(refs))
        return sum(scores) / len(scores), scores


def cider_d(gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str] | str], sigma: float = 6.0) -> float:
    return CiderD(sigma=sigma).compute_score(gts, res)[0]


# ---------------------------------------------------------------------------------------------
# pycocoevalcap wrappers
# ---------------------------------------------------------------------------------------------
def _as_lists(res: Mapping[Any, Sequence[str] | str]) -> dict[Any, list[str]]:
    return {k: [v] if isinstance(v, str) else list(v) for k, v in res.items()}


def bleu(gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str] | str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (coco-caption: "closest" reference length, tiny smoothing of zero counts)."""
    from pycocoevalcap.bleu.bleu import Bleu

    score, _ = Bleu(n).compute_score(dict(gts), _as_lists(res), verbose=0)
    return [float(s) for s in score]


def rouge_l(gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str] | str]) -> float:
    """Mean sentence ROUGE-L F-measure (beta = 1.2, best LCS precision/recall over references)."""
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(dict(gts), _as_lists(res))
    return float(score)


def meteor(gts: Mapping[Any, Sequence[str]], res: Mapping[Any, Sequence[str] | str]) -> float:
    """METEOR 1.5 (`-l en -norm`) through pycocoevalcap; runs a Java subprocess."""
    if not java_available():
        raise RuntimeError("METEOR needs Java (java not found on PATH); install a JRE or skip METEOR")
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(dict(gts), _as_lists(res))
    finally:
        del scorer
    return float(score)


DEFAULT_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def caption_metrics(
    references: Mapping[Any, Sequence[str]],
    candidates: Mapping[Any, str],
    tokenizer: str = "ptb",
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> dict[str, Any]:
    """Tokenise and score. Returns {"BLEU-1": ..., ..., "CIDEr-D": ..., "per_item": {...}} (coco scale).

    `metrics` may omit METEOR (the only metric that needs Java besides PTB tokenisation).
    """
    metrics = list(metrics)
    unknown = set(metrics) - set(DEFAULT_METRICS)
    if unknown:
        raise ValueError(f"Unknown metrics {sorted(unknown)}; choose from {DEFAULT_METRICS}")
    missing = set(references) ^ set(candidates)
    if missing:
        raise ValueError(
            f"References and candidates differ in {len(missing)} ids, e.g. {sorted(map(str, missing))[:5]}"
        )
    gts = tokenize_captions(references, tokenizer)
    res = tokenize_captions({k: [candidates[k]] for k in references}, tokenizer)
    out: dict[str, Any] = {}
    if any(m.startswith("BLEU") for m in metrics):
        for i, value in enumerate(bleu(gts, res), start=1):
            if f"BLEU-{i}" in metrics:
                out[f"BLEU-{i}"] = value
    if "METEOR" in metrics:
        out["METEOR"] = meteor(gts, res)
    if "ROUGE-L" in metrics:
        out["ROUGE-L"] = rouge_l(gts, res)
    per_item: dict[str, dict[str, float]] = {}
    if "CIDEr-D" in metrics:
        score, scores = CiderD().compute_score(gts, res)
        out["CIDEr-D"] = score
        per_item = {str(k): {"CIDEr-D": s} for k, s in zip(gts, scores, strict=True)}
    out["per_item"] = per_item
    return out

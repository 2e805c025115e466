"""One text -> class mapper (`model.class_mapping.match_class`) for `UniRS.classify_sequence` and the ERA scorer.

The released UniRS code has no mapping step (its ERA eval writes free text; spec section 6.1), so
there is no reference output to match; what matters is that inference and evaluation agree. The
answers below are ones on which the two former mappers (`inference.match_class_name` and
`evaluation.era.map_to_class`) disagreed; the comment gives the old inference result.
"""

from __future__ import annotations

import pytest

from model import ClassMatch, match_class
from model.class_mapping import ERA_CLASSES
from model.evaluation.era import map_to_class, score_era
from model.testing import random_image

USED_TO_DISAGREE = [
    ("A traffic jam on the highway.", "traffic congestion", "substring"),  # inference said "traffic collision"
    ("A car crash on the road.", "traffic collision", "substring"),  # inference said "car racing"
    ("An aerial view of a parade.", "parade/protest", "substring"),  # inference said "baseball"
    ("A land slide on the hill.", "landslide", "substring"),  # inference said "mudslide"
    ("Nothing happens.", "non-event", "exact"),  # inference said "boating"
    ("Kids playing football.", "soccer", "substring"),  # inference "ploughing", ERA scorer "basketball"
    ("A burning forest.", "fire", "substring"),  # inference "running", ERA scorer "parade/protest"
]


@pytest.mark.parametrize(("text", "label", "method"), USED_TO_DISAGREE)
def test_inference_and_era_scorer_map_the_same_answer_to_the_same_class(text, label, method):
    assert match_class(text, ERA_CLASSES) == ClassMatch(label, method, 1.0)
    assert map_to_class(text) == (label, method)
    result = score_era({"s": label}, {"s": text})
    assert result["details"][0]["mapped"] == label and result["overall_accuracy"] == 100.0


@pytest.mark.parametrize(
    ("text", "label", "score"),
    [
        ("It shows flooding in a town", "flood", 0.769231),  # "flood" vs the word "flooding": 2*5/13
        ("Farmers plough the fields.", "ploughing", 0.8),  # "ploughing" vs "plough": 2*6/15
        ("zzz", "post-earthquake", 0.0),  # nothing shared: the first class, score 0
    ],
)
def test_fuzzy_matches_report_the_window_similarity(text, label, score):
    assert match_class(text, ERA_CLASSES) == ClassMatch(label, "fuzzy", score)


def test_a_subset_of_classes_keeps_the_aliases_and_the_longest_match_wins():
    classes = ["fire", "post-earthquake", "traffic congestion"]  # a subset, as the worker passes
    assert match_class("fire after an earthquake", classes) == ClassMatch("post-earthquake", "substring", 1.0)
    assert match_class("Traffic_Congestion", classes) == ClassMatch("traffic congestion", "exact", 1.0)
    with pytest.raises(ValueError, match="No classes"):
        match_class("anything", [])


def test_classify_sequence_labels_its_raw_text_as_the_era_scorer_does(model):
    frames = [random_image(k, (32, 32)) for k in range(30)]
    classes = list(ERA_CLASSES)
    result = model.classify_sequence(frames, classes, max_new_tokens=6)
    scored = score_era({"v": result.label}, {"v": result.raw_text}, classes)["details"][0]
    assert (scored["mapped"], scored["method"]) == (result.label, result.method)
    assert ClassMatch(result.label, result.method, result.score) == match_class(result.raw_text, classes)

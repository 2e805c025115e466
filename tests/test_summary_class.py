"""The summary finding's class follows the area's alert rules (workers/pipeline.headline_class): the demo's
2019-08-20 analysis (0.10 ha vegetation loss, 0.40 ha vegetation gain) was filed as 'vegetation_gain'
under the caption "Vegetation loss of 0.10 ha ..." of an area that alerts on loss."""

from __future__ import annotations

from eo.change_classes import DEFAULT_ALERT_CLASSES
from workers.pipeline import headline_class

DEMO_2019_08_20 = {"vegetation_loss": {"hectares": 0.10, "where": "in the west of the area"},
                   "vegetation_gain": {"hectares": 0.40, "where": "spread across the area"},
                   "water_change": {"hectares": 0.0, "where": ""}}


def test_an_area_alerting_on_loss_is_headed_by_loss_even_when_more_land_greened():
    assert headline_class(DEMO_2019_08_20, DEFAULT_ALERT_CLASSES) == "vegetation_loss"


def test_the_largest_alerting_class_wins_and_other_rules_are_followed():
    both_losses = {**DEMO_2019_08_20, "new_built_up_or_bare": {"hectares": 0.25, "where": ""}}
    assert headline_class(both_losses, DEFAULT_ALERT_CLASSES) == "new_built_up_or_bare"
    assert headline_class(DEMO_2019_08_20, ["vegetation_gain"]) == "vegetation_gain"


def test_without_alerting_change_the_largest_change_and_without_change_none():
    assert headline_class(DEMO_2019_08_20, ["water_change"]) == "vegetation_gain"
    assert headline_class({"vegetation_loss": {"hectares": 0.0}}, DEFAULT_ALERT_CLASSES) is None
    assert headline_class({}, DEFAULT_ALERT_CLASSES) is None

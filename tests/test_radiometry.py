"""The reflectance rule per collection profile (eo/radiometry.py, eo/profiles.py), and the pixel check.

The figures are the ESA and provider conventions restated: ESA DNs carry +1000 from baseline 04.00;
Earth Search v1/v0 remove it and flag it; C1 and Planetary Computer keep it; Landsat C2 L2 is
DN × 2.75e-5 − 0.2.
"""

from __future__ import annotations

import numpy as np
import pytest

from eo import radiometry
from eo.profiles import BY_NAME, GENERIC, detect_profile, generic_asset_keys
from eo.radiometry import RadiometryMismatch, check_pixels, decide

ES_V1 = BY_NAME["earth-search-v1/sentinel-2-l2a"]
ES_C1 = BY_NAME["earth-search/sentinel-2-c1-l2a"]
ES_V0 = BY_NAME["earth-search-v0/sentinel-s2-l2a-cogs"]
PC_S2 = BY_NAME["planetary-computer/sentinel-2-l2a"]
PC_LS = BY_NAME["planetary-computer/landsat-c2-l2"]
ES_RASTER = {"raster:bands": [{"scale": 0.0001, "offset": -0.1, "nodata": 0}]}  # what ES v1 lists even when removed


@pytest.mark.parametrize(("profile", "props", "baseline", "dn", "reflectance", "rule", "in_pixels"), [
    # The case: ES v1, baseline 05.10, flag true -> offset already gone, DN 400 is 0.04.
    (ES_V1, {"earthsearch:boa_offset_applied": True}, "05.10", 400, 0.04, "flag-offset-removed", False),
    (ES_V1, {"earthsearch:boa_offset_applied": False}, "05.10", 1400, 0.04, "esa-baseline", True),
    (ES_V1, {"earthsearch:boa_offset_applied": False}, "03.01", 400, 0.04, "esa-baseline", False),
    (ES_V1, {}, "04.00", 1000, 0.0, "esa-baseline", True),
    (ES_V0, {"sentinel:boa_offset_applied": True}, "04.00", 400, 0.04, "flag-offset-removed", False),
    (ES_V0, {"sentinel:boa_offset_applied": False}, "05.09", 1400, 0.04, "esa-baseline", True),
    # C1 and PC keep ESA DNs whatever a stray flag says.
    (ES_C1, {"earthsearch:boa_offset_applied": True}, "05.11", 1400, 0.04, "esa-baseline", True),
    (PC_S2, {}, "05.10", 1400, 0.04, "esa-baseline", True),
    (PC_S2, {}, "02.12", 400, 0.04, "esa-baseline", False),
    # Unknown STAC API with a Sentinel-2 baseline: ESA rule, either known flag honoured.
    (GENERIC, {"sentinel:boa_offset_applied": True}, "05.00", 400, 0.04, "flag-offset-removed", False),
    (GENERIC, {}, "05.00", 1400, 0.04, "esa-baseline", True),
])
def test_sentinel2_rule_per_profile(profile, props, baseline, dn, reflectance, rule, in_pixels):
    decided = decide(profile, props, ES_RASTER, baseline)
    assert dn * decided.scale + decided.offset == pytest.approx(reflectance)
    assert (decided.rule, decided.offset_in_pixels, decided.profile) == (rule, in_pixels, profile.name)


def test_landsat_and_unknown_collections_use_raster_bands_then_declared_scaling():
    landsat = {"raster:bands": [{"scale": 2.75e-5, "offset": -0.2}]}
    rule = decide(PC_LS, {}, landsat, None)
    assert 20000 * rule.scale + rule.offset == pytest.approx(0.35) and rule.rule == "raster-bands"
    declared = decide(PC_LS, {}, {}, None)  # no raster:bands: the profile's declared C2 L2 scaling
    assert (declared.scale, declared.offset, declared.rule) == (2.75e-5, -0.2, "profile")
    unknown = decide(GENERIC, {}, {}, None)
    assert (unknown.scale, unknown.offset, unknown.rule) == (1.0, 0.0, "unscaled")


def test_rule_round_trips_through_the_stored_asset_entry():
    rule = decide(ES_V1, {"earthsearch:boa_offset_applied": True}, ES_RASTER, "05.10")
    entry = {"href": "x", **rule.as_asset_fields()}
    assert radiometry.reflectance_rule("05.10", entry) == rule
    # Rows written before profiles: the baseline rule, as before.
    legacy = radiometry.reflectance_rule("05.10", {"href": "x", "scale": 1e-4, "offset": -0.1})
    assert (legacy.offset, legacy.offset_in_pixels) == (-0.1, True)


def test_profiles_are_detected_from_the_item():
    es = {"properties": {"earthsearch:boa_offset_applied": True}, "assets": {"red": {}}}
    pc = {"properties": {"s2:processing_baseline": "05.10"}, "assets": {"B04": {}, "SCL": {}}}
    assert detect_profile(es, "sentinel-2-l2a").name == ES_V1.name
    assert detect_profile(pc, "sentinel-2-l2a").name == PC_S2.name
    assert detect_profile(pc, "sentinel-2-c1-l2a").name == ES_C1.name
    assert detect_profile({"properties": {}, "assets": {}}, "landsat-c2-l2").name == PC_LS.name
    assert detect_profile({"properties": {"earthsearch:payload_id": "x"}, "assets": {}},
                          "landsat-c2-l2").name == "earth-search/landsat-c2-l2"
    assert detect_profile(es, "my-own-collection") is GENERIC
    assert detect_profile(es, "sentinel-2-l2a", {"sentinel-2-l2a": PC_S2.name}).name == PC_S2.name
    with pytest.raises(KeyError, match="no collection profile 'nope'"):
        detect_profile(es, "sentinel-2-l2a", {"sentinel-2-l2a": "nope"})


def test_generic_asset_keys_from_eo_bands():
    assets = {"B4": {"eo:bands": [{"common_name": "red"}]}, "B8": {"eo:bands": [{"common_name": "nir"}]},
              "QA": {}, "SCL": {}, "rgb": {"eo:bands": [{"common_name": "red"}, {"common_name": "green"}]}}
    assert generic_asset_keys(assets) == {"red": "B4", "nir": "B8", "qa_pixel": "QA", "scl": "SCL"}


def test_pixels_below_1000_dn_contradict_an_offset_in_the_pixels():
    everywhere = np.ones((10, 10), dtype=bool)
    dark = np.ma.asarray(np.full((10, 10), 400, dtype=np.uint16))
    offset_in = decide(ES_V1, {"earthsearch:boa_offset_applied": False}, ES_RASTER, "05.10")
    with pytest.raises(RadiometryMismatch, match="100% of the clear red pixels are below 1000 DN"):
        check_pixels("S2B_X", offset_in, dark, everywhere)
    assert check_pixels("S2B_X", offset_in, dark + 1000, everywhere) is None
    # A few pixels below 1000 DN (ESA clips BOA at -0.1) are tolerated: 5 %.
    mostly = dark + 1000
    mostly[0, :5] = 900
    assert check_pixels("S2B_X", offset_in, mostly, everywhere) is None
    removed = decide(ES_V1, {"earthsearch:boa_offset_applied": True}, ES_RASTER, "05.10")
    assert check_pixels("S2B_X", removed, dark, everywhere) is None
    assert "flag may be wrong" in check_pixels("S2B_X", removed, dark + 1000, everywhere)
    # Pixels outside `where` (cloud, outside the area) do not count.
    assert check_pixels("S2B_X", offset_in, dark, np.zeros((10, 10), dtype=bool)) is None

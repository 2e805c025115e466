"""The change classes of the analysers, which of them alert by default, and how hectares are written.

One place for both sides: the workers label regions with these class ids (``workers/spectral.py``), the
control plane decides from them what alerts and words the headline (``monitor/reports``).

Class ids (a region has exactly one; :mod:`workers.spectral` explains the thresholds):

- ``vegetation_loss``: vegetation whose NDVI fell (clear-cut, windthrow, fire, harvest);
- ``new_built_up_or_bare``: the surface became SWIR-bright and unvegetated — bare soil exposed, new
  roads and tracks, built-up land;
- ``vegetation_gain``: NDVI rose onto vegetated values (regrowth, but also July → August greening);
- ``water_change``: land became water or water became land.

New linear features (roads, skid trails, pipelines) are regions of the two loss classes whose shape is
long and narrow (``statistics.linear``), so alerting on the loss classes alerts on them too.

The default alert rule of a new area is the loss classes (the forest-watch question "was forest
cleared?"); gain and water change are still written as findings and reported in the email body, and
alert only for areas that ask for them (``areas update --alert-class vegetation_gain``).
"""

from __future__ import annotations

CLASS_ORDER = ("water_change", "new_built_up_or_bare", "vegetation_loss", "vegetation_gain")
CLASS_LABELS = {
    "water_change": "water change",
    "new_built_up_or_bare": "new built-up land or bare ground",
    "vegetation_loss": "vegetation loss",
    "vegetation_gain": "vegetation gain",
}
#: Classes that alert unless the area says otherwise (core/models/base.py repeats this as the column default).
LOSS_CLASSES = ("new_built_up_or_bare", "vegetation_loss")
DEFAULT_ALERT_CLASSES = LOSS_CLASSES
#: Headline groups: the loss classes add up to one "Forest loss" figure (what a forest-watch reader
#: triages on); the others are named on their own.
HEADLINE_GROUPS = {
    "vegetation_loss": "Forest loss",
    "new_built_up_or_bare": "Forest loss",
    "vegetation_gain": "Vegetation gain",
    "water_change": "Water change",
}


def label(change_class: str | None) -> str:
    """Readable name of a class id; unknown ids (older analysers) are shown as they are."""
    if change_class is None:
        return "unclassified"
    return CLASS_LABELS.get(change_class, change_class.replace("_", " "))


def format_hectares(value: float | None) -> str:
    """THE rounding rule of every hectare figure a person reads: two decimals (0.01 ha = 100 m², one
    Sentinel-2 10 m pixel), thousands separated — "0.25 ha", "1,204.50 ha"; "—" when unknown."""
    return "—" if value is None else f"{value:,.2f} ha"


def headline(totals: dict[str, float]) -> str:
    """"Forest loss 0.25 ha" (or "Forest loss 0.25 ha, water change 0.30 ha") from hectares per class id,
    groups in :data:`HEADLINE_GROUPS` order of first appearance, largest first; "" when nothing."""
    groups: dict[str, float] = {}
    for change_class, hectares in totals.items():
        if hectares and hectares > 0:
            name = HEADLINE_GROUPS.get(change_class, label(change_class).capitalize())
            groups[name] = groups.get(name, 0.0) + hectares
    parts = [f"{name} {format_hectares(ha)}" for name, ha in sorted(groups.items(), key=lambda kv: -kv[1])]
    if not parts:
        return ""
    return ", ".join([parts[0], *(p[0].lower() + p[1:] for p in parts[1:])])

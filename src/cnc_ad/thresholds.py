"""Decision thresholds on disk: ``thresholds.json``, the only module naming it (torch-free: a station reads it).

``thresholds.json`` lies beside a checkpoint (where prediction finds it), in an evaluation folder, or anywhere as a
file of its own (thresholds for tiled scoring). It keeps the values where every earlier version put them, so old files
read unchanged::

    {"image": {"__all__": t, cat: t}, "pixel": {"__all__": t, cat: t},
     "basis": {"image": {"__all__": {"rule": "f1_max_pooled", "images": n}, cat: {"rule": "f1_max", "images": n}},
               "pixel": {...}}}

A value ``t`` means: an image (pixel) is anomalous when its score (map value) ``>= t``. ``"basis"`` records how each
value was found (the rule and the number of test images behind it); files written before it existed have none.

Two kinds of rule make values: *labelled* ones from ``cnc eval`` (``f1_max``, ``f1_max_pooled``, ``median``, or ``""``
in older files) and *false-alarm* ones from good images only (``"false_alarm_rate=R"``,
:mod:`cnc_ad.deploy.calibrate`). The file holds one value per kind and category; :func:`merge_thresholds` decides
which (see there).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cnc_ad.errors import ConfigError, DataError
from cnc_ad.files import atomic_write_json

THRESHOLDS_FILE = "thresholds.json"

FALSE_ALARM_RULE = "false_alarm_rate"
"""Rules ``"false_alarm_rate=R..."`` come from good images only (:mod:`cnc_ad.deploy.calibrate`); every other rule is
labelled (F1-max from ``cnc eval``)."""
ALL = "__all__"
"""The key of the threshold for images of any (or an unknown) category."""
DIGEST_CHARS = 16
"""Hex digits of the SHA-256 digests that name a set of thresholds (and a model, :mod:`cnc_ad.deploy.detector`)."""
Kind = Literal["image", "pixel"]
KINDS: tuple[Kind, ...] = ("image", "pixel")


# ------------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Threshold:
    """One decision threshold and how it was found.

    Attributes:
        value: scores (map values) ``>= value`` are anomalous; NaN when it could not be found.
        rule: how it was found: ``"f1_max"`` (the F1-max threshold of one category), ``"f1_max_pooled"`` (over the
            test images of all categories pooled), ``"median"`` (median of the category thresholds),
            ``"false_alarm_rate=R"`` (a share R of good images above it, :mod:`cnc_ad.deploy.calibrate`), or ``""``
            (unknown: a file written before the rule was recorded).
        images: test images (good images, for a false-alarm rule) behind the value (for pixel thresholds: images
            whose pixels were scored), or None.
    """

    value: float
    rule: str = ""
    images: int | None = None

    @property
    def is_finite(self) -> bool:
        return math.isfinite(self.value)

    @property
    def is_labelled(self) -> bool:
        """Whether the value came from labelled test images (an F1-max rule), not from good images only."""
        return not self.rule.startswith(FALSE_ALARM_RULE + "=")


def false_alarm_rule(rate: float, estimated: bool = True) -> str:
    """The ``rule`` recorded with a threshold set on good images (:mod:`cnc_ad.deploy.calibrate`):
    ``"false_alarm_rate=0.01"``, with ``";max+margin"`` when the rate was below ``1 / n``; read by
    :func:`false_alarm_rate_of`.
    """
    return f"{FALSE_ALARM_RULE}={rate:g}" + ("" if estimated else ";max+margin")


def false_alarm_rate_of(rule: str | None) -> float | None:
    """The false-alarm rate R a threshold was set for, read from its rule (``"false_alarm_rate=R"``, with or without
    suffixes such as ``";max+margin"``); None for any other rule (F1-max: no target rate) or none.
    """
    if not rule or not rule.startswith(FALSE_ALARM_RULE + "="):
        return None
    text = rule[len(FALSE_ALARM_RULE) + 1 :].split(";")[0]
    try:
        rate = float(text)
    except ValueError:
        return None
    return rate if 0 < rate < 1 else None


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds per category, plus the shared one (key :data:`ALL`) for any category.

    Build one with :meth:`from_json` (either file layout) or :func:`load_thresholds`; write it with
    :func:`save_thresholds`.
    """

    image: dict[str, Threshold] = field(default_factory=dict)
    pixel: dict[str, Threshold] = field(default_factory=dict)

    def table(self, kind: Kind) -> dict[str, Threshold]:
        """The thresholds of one kind (``"image"`` or ``"pixel"``) by category."""
        if kind == "image":
            return self.image
        if kind == "pixel":
            return self.pixel
        raise ValueError(f"threshold kind {kind!r}; use 'image' or 'pixel'")

    @property
    def categories(self) -> list[str]:
        """The categories with a threshold of either kind (without :data:`ALL`), sorted."""
        return sorted((set(self.image) | set(self.pixel)) - {ALL})

    def select(self, kind: Kind, category: str | None = None) -> float | None:
        """The ``kind`` threshold for ``category`` (None: the shared one), or None when unknown or not finite.

        Raises:
            ConfigError: ``category`` has no threshold of either kind (the message lists the known ones).
        """
        if category is not None and (self.image or self.pixel) and category not in self.categories:
            known = ", ".join(self.categories) or "none"
            raise ConfigError(f"no thresholds for category {category!r}; known: {known}")
        found = self.table(kind).get(ALL if category is None else category)
        return found.value if found is not None and found.is_finite else None

    def fallback(self, kind: Kind, category: str) -> float | None:
        """The finite ``kind`` threshold of ``category``, else the shared one, else None (never raises)."""
        for key in (category, ALL):
            found = self.table(kind).get(key)
            if found is not None and found.is_finite:
                return found.value
        return None

    def values(self, kind: Kind) -> dict[str, float]:
        """``{category: value}`` of one kind."""
        return {category: t.value for category, t in self.table(kind).items()}

    def to_json(self) -> dict[str, Any]:
        """The ``thresholds.json`` layout (values where earlier versions kept them, the basis beside them)."""
        value: dict[str, Any] = {kind: self.values(kind) for kind in KINDS}
        basis = {
            kind: {cat: {"rule": t.rule, "images": t.images} for cat, t in self.table(kind).items() if t.rule}
            for kind in KINDS
        }
        if any(basis.values()):
            value["basis"] = basis
        return value

    def digest(self) -> str:
        """16 hex digits of the SHA-256 of :meth:`to_json` (keys sorted): equal values, rules and image counts give
        equal digests, so a decision names the thresholds it was made by.
        """
        text = json.dumps(self.to_json(), sort_keys=True, allow_nan=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_CHARS]

    @classmethod
    def from_json(cls, value: Any, source: str = "thresholds") -> Thresholds:
        """Read either ``thresholds.json`` layout: values only (earlier versions) or values plus ``"basis"``.

        Raises:
            DataError: not a mapping of the documented shape (``source`` names it in the message).
        """
        if not isinstance(value, Mapping):
            raise DataError(f"{source} is not a thresholds file ({{'image': {{...}}, 'pixel': {{...}}}})")
        basis = _mapping(value.get("basis"))
        tables: dict[str, dict[str, Threshold]] = {}
        try:
            for kind in KINDS:
                known = _mapping(basis.get(kind))
                table = {}
                for category, number in (value.get(kind) or {}).items():
                    how = _mapping(known.get(category))
                    images = how.get("images")
                    table[str(category)] = Threshold(
                        _as_float(number), str(how.get("rule") or ""), int(images) if images is not None else None
                    )
                tables[kind] = table
        except (AttributeError, TypeError, ValueError) as err:
            raise DataError(f"{source} is not a thresholds file ({{'image': {{...}}, 'pixel': {{...}}}})") from err
        return cls(image=tables["image"], pixel=tables["pixel"])


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (a missing or malformed optional part of the file)."""
    return value if isinstance(value, Mapping) else {}


def _as_float(value: Any) -> float:
    """A JSON number as float; None becomes NaN; anything else non-numeric raises ValueError."""
    return math.nan if value is None else float(value)


def thresholds_path(folder: str | os.PathLike) -> Path:
    """Where the thresholds of a checkpoint or evaluation folder are stored."""
    return Path(folder) / THRESHOLDS_FILE


def save_thresholds(folder: str | os.PathLike, thresholds: Thresholds, *, file: bool = False) -> Path:
    """Write ``thresholds.json`` into ``folder`` (a checkpoint or evaluation folder), atomically; return its path.

    With ``file``, ``folder`` is the file's own path instead (e.g. thresholds for tiled scoring, kept apart).
    """
    path = Path(folder) if file else thresholds_path(folder)
    atomic_write_json(path, thresholds.to_json())
    return path


def load_thresholds(path: str | os.PathLike) -> Thresholds | None:
    """The thresholds in a ``thresholds.json`` file, or in a folder's; None when a folder has none.

    Args:
        path: a thresholds file, or a folder (a checkpoint or an evaluation folder) that may hold one.

    Raises:
        DataError: a file named ``path`` is missing, or the file is unreadable or not a thresholds file.
    """
    path = Path(path)
    if path.is_dir():
        path = thresholds_path(path)
        if not path.is_file():
            return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"thresholds file {path} is unreadable ({err}); evaluate the model again to write it") from err
    return Thresholds.from_json(value, source=str(path))


def merge_thresholds(old: Thresholds | None, new: Thresholds, *, replace_labelled: bool = False) -> Thresholds:
    """``old`` with ``new``'s values added, one value per kind and category, by the precedence below.

    1. a finite value beats a missing or NaN one;
    2. a labelled value (F1-max, from ``cnc eval``) beats a false-alarm one (good images only), unless
       ``replace_labelled``, when every finite new value wins;
    3. otherwise (two values of the same kind of rule) the new one wins.

    So calibrating never hides the F1-max thresholds an evaluation stored, evaluating replaces false-alarm thresholds
    where it finds F1-max ones, and categories only one of them saw keep their values.
    """
    if old is None:
        return new
    tables: dict[str, dict[str, Threshold]] = {}
    for kind in KINDS:
        table = dict(old.table(kind))
        for category, value in new.table(kind).items():
            current = table.get(category)
            if current is None or not current.is_finite:
                table[category] = value if value.is_finite or current is None else current
            elif value.is_finite and (replace_labelled or value.is_labelled or not current.is_labelled):
                table[category] = value
        tables[kind] = table
    return Thresholds(image=tables["image"], pixel=tables["pixel"])


def update_thresholds(folder: str | os.PathLike, new: Thresholds, *, replace_labelled: bool = False) -> Thresholds:
    """Merge ``new`` into the ``thresholds.json`` of ``folder`` (:func:`merge_thresholds`), write it, return it."""
    merged = merge_thresholds(load_thresholds(folder), new, replace_labelled=replace_labelled)
    save_thresholds(folder, merged)
    return merged

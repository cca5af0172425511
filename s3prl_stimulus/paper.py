"""The paper's published numbers (its Tables II-IV), shipped as ``data/paper_results.json`` and checked on load.

The file holds the numbers as the paper prints them, each table with the sentence that names its source:
Table II (CCC between the label sets), Table III (macro-F1 of the 15 upstreams on their matched test set,
by S3PRL hub name) and Table IV (WavLM Large cross-tested: macro-F1, its 95 % CI and per-class F1).
:func:`load_paper_numbers` reads it through :mod:`s3prl_stimulus.resources` (SHA-256 checked) and
refuses, in one line, numbers that contradict each other: an interval that does not hold its value, a
macro-F1 that is not the mean of its per-class F1 (to the paper's rounding), a Table III WavLM row that
is not Table IV's diagonal, a table with a missing or repeated cell. The report compares them with the
user's runs (:mod:`s3prl_stimulus.study.reports.reproduction`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass
from typing import Optional

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError

PAPER_FILE = "paper_results.json"


@dataclass(frozen=True)
class PaperCell:
    """One train -> test cell of Table IV."""

    macro_f1: float
    ci_low: float
    ci_high: float
    per_class_f1: tuple  # CLASSES order


@dataclass(frozen=True)
class PaperNumbers:
    citation: str
    agreement: dict  # frozenset({a, b}) -> CCC (Table II)
    agreement_decimals: int
    matched_stimuli: tuple  # Table III's columns
    matched: dict  # S3PRL hub name -> {stimulus: macro-F1} (Table III)
    matched_names: dict  # S3PRL hub name -> the paper's name for that row
    cross_upstream: str  # Table IV's upstream (hub name)
    cross: dict  # (train, test) -> PaperCell (Table IV)
    f1_decimals: int
    sources: dict  # "table2" | "table3" | "table4" -> the file's source sentence

    def ccc(self, a: str, b: str) -> Optional[float]:
        return self.agreement.get(frozenset((a, b)))

    @property
    def rounding(self) -> float:
        """Half a unit of the last printed F1 digit: how far a printed F1 may be from the value it rounds."""
        return 0.5 * 10 ** -self.f1_decimals


def _refuse(what: str, where: str) -> StimulusError:
    return StimulusError(f"{where}: {what}; the packaged paper numbers are inconsistent: reinstall s3prl-stimulus, "
                         "or fix the edited file and its SHA-256 in s3prl_stimulus/resources.py")


def _number(value, low: float, high: float, what: str, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise _refuse(f"{what} is {value!r}, not a number in [{low}, {high}]", where)
    return float(value)


def _stimulus(value, what: str, where: str) -> str:
    if value not in STIMULI:
        raise _refuse(f"{what} {value!r} is not one of {', '.join(STIMULI)}", where)
    return value


def _table2(obj: dict, where: str) -> dict:
    pairs = {}
    for item in obj["pairs"]:
        a, b = (_stimulus(item[k], "Table II stimulus", where) for k in ("a", "b"))
        key = frozenset((a, b))
        if len(key) != 2 or key in pairs:
            raise _refuse(f"Table II pair {a}-{b} is repeated or not a pair", where)
        pairs[key] = _number(item["ccc"], -1, 1, f"Table II {a}-{b}", where)
    expected = {frozenset(p) for p in itertools.combinations(STIMULI, 2)}
    if set(pairs) != expected:
        raise _refuse(f"Table II holds {len(pairs)} of the {len(expected)} pairs of {', '.join(STIMULI)}", where)
    return pairs


def _table3(obj: dict, where: str) -> tuple:
    stimuli = tuple(_stimulus(s, "Table III column", where) for s in obj["stimuli"])
    matched, names = {}, {}
    for row in obj["rows"]:
        name = row["upstream"]
        if not isinstance(name, str) or name in matched:
            raise _refuse(f"Table III row {name!r} is repeated or not a hub name", where)
        matched[name] = {s: _number(row.get(s), 0, 1, f"Table III {name} / {s}", where) for s in stimuli}
        names[name] = str(row["paper_name"])
    return stimuli, matched, names


def _table4(obj: dict, where: str, rounding: float) -> dict:
    cells = {}
    for item in obj["cells"]:
        train, test = (_stimulus(item[k], f"Table IV {k}", where) for k in ("train", "test"))
        what = f"Table IV {train} -> {test}"
        if (train, test) in cells:
            raise _refuse(f"{what} is repeated", where)
        value = _number(item["macro_f1"], 0, 1, what, where)
        low, high = (_number(v, 0, 1, f"{what} CI", where) for v in item["ci95"])
        if not low <= value <= high:
            raise _refuse(f"{what}: macro-F1 {value} lies outside its CI [{low}, {high}]", where)
        per_class = item["per_class_f1"]
        if list(per_class) != list(CLASSES):
            raise _refuse(f"{what}: per-class F1 keys {list(per_class)}, expected {', '.join(CLASSES)}", where)
        per_class = tuple(_number(per_class[c], 0, 1, f"{what} {c}", where) for c in CLASSES)
        # the printed macro-F1 and the six printed per-class F1 are each rounded by up to `rounding`
        if abs(sum(per_class) / len(CLASSES) - value) > 2 * rounding + 1e-12:
            raise _refuse(f"{what}: macro-F1 {value} is not the mean of its per-class F1 "
                          f"({sum(per_class) / len(CLASSES):.5f})", where)
        cells[(train, test)] = PaperCell(value, low, high, per_class)
    trains, tests = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    if len(cells) != len(trains) * len(tests):
        raise _refuse(f"Table IV holds {len(cells)} cells, not every train x test pair", where)
    return cells


def _check_diagonal(matched: dict, stimuli: tuple, upstream: str, cross: dict, where: str) -> None:
    """Table III's row of Table IV's upstream is Table IV's diagonal: the same pooled scores, printed twice."""
    if upstream not in matched:
        raise _refuse(f"Table IV's upstream {upstream!r} has no Table III row", where)
    for s in stimuli:
        cell = cross.get((s, s))
        if cell is None or not math.isclose(cell.macro_f1, matched[upstream][s], abs_tol=1e-12):
            raise _refuse(f"Table III {upstream} / {s} ({matched[upstream][s]}) differs from Table IV's {s} -> {s} "
                          f"({cell.macro_f1 if cell else 'absent'})", where)


def parse_paper_numbers(obj: dict, where: str = PAPER_FILE) -> PaperNumbers:
    """The paper's numbers from the file's JSON object, checked (one-line :class:`StimulusError` otherwise)."""
    try:
        decimals = int(obj["table3"]["decimals"])
        rounding = 0.5 * 10 ** -decimals
        agreement = _table2(obj["table2"], where)
        stimuli, matched, names = _table3(obj["table3"], where)
        upstream = str(obj["table4"]["upstream"])
        cross = _table4(obj["table4"], where, rounding)
        if int(obj["table4"]["decimals"]) != decimals:
            raise _refuse("Tables III and IV state different decimals", where)
        sources = {k: str(obj[k]["source"]) for k in ("table2", "table3", "table4")}
        citation = str(obj["paper"])
        agreement_decimals = int(obj["table2"]["decimals"])
    except (KeyError, TypeError, ValueError) as err:
        raise _refuse(f"unexpected layout ({type(err).__name__}: {err})", where) from None
    _check_diagonal(matched, stimuli, upstream, cross, where)
    return PaperNumbers(citation, agreement, agreement_decimals, stimuli, matched, names, upstream, cross, decimals,
                        sources)


@functools.lru_cache(maxsize=None)
def load_paper_numbers() -> PaperNumbers:
    """The packaged paper numbers (file verified by SHA-256, then checked for consistency)."""
    from s3prl_stimulus.resources import packaged_file

    path = packaged_file(PAPER_FILE)
    return parse_paper_numbers(json.loads(path.read_text(encoding="utf-8")), str(path))

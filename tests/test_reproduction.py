"""The paper's published numbers (packaged, checked) and the report's comparison with them.

Results trees are fabricated as in tests/test_reports.py (one run = results JSON + predictions CSV, metadata
in the JSON), with predictions chosen so that the comparison is known: perfect predictions give macro-F1 1
with a [1, 1] interval, so every difference is 1 minus the paper's number; noisy ones are compared with
paper numbers placed inside, above and below the report's own intervals.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from s3prl_stimulus import CLASSES, STIMULI, cli
from s3prl_stimulus.agreement import agreement_matrix
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS
from s3prl_stimulus.labels import binary_frame, load_votes
from s3prl_stimulus.metrics import binarize, macro_f1
from s3prl_stimulus.paper import PAPER_FILE, PaperCell, load_paper_numbers, parse_paper_numbers
from s3prl_stimulus.partition import FOLDS, speakers_of, split_clips
from s3prl_stimulus.resources import packaged_file
from s3prl_stimulus.study.reports import ScoreSettings, build_report, compare_with_paper
from s3prl_stimulus.study.reports.tables import to_markdown
from s3prl_stimulus.study.reports.reproduction import paper_upstream_of

CLIPS_PER_FOLD = 40
BOOTSTRAPS = 50


@pytest.fixture(scope="module")
def votes():
    return load_votes("paper")


def write_run(root: Path, votes, upstream: str, train: str, fold: int, *, label: str | None = None, seed: int = 0,
              perfect: bool = False, whole_split: bool = False, strength: float = 2.0, votes_name: str = "paper") -> Path:
    """One run's results JSON and predictions CSV. ``perfect``: the train label set's binary targets exactly
    (softmax 1/k on the k positive classes, uniform when none), so the matched macro-F1 is 1; else noisy
    predictions correlated with them. Not ``whole_split``: CLIPS_PER_FOLD of the fold's test clips, said so."""
    clips = split_clips(fold, "test")
    clips = clips if whole_split else clips[:: len(clips) // CLIPS_PER_FOLD][:CLIPS_PER_FOLD]
    truth = binary_frame(votes, train).loc[clips].to_numpy()
    if perfect:
        k = truth.sum(axis=1, keepdims=True)
        probs = np.where(k > 0, truth / np.maximum(k, 1), 1 / len(CLASSES))
    else:
        rng = np.random.default_rng([fold, seed, STIMULI.index(train), len(upstream)])
        logits = strength * truth + rng.normal(0, 1, truth.shape)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(probs, columns=list(CLASSES))
    frame.insert(0, "speaker", speakers_of(clips))
    frame.insert(0, "clip", clips)
    for test in STIMULI:
        frame[[f"{test}_{c}" for c in CLASSES]] = binary_frame(votes, test).loc[clips].to_numpy()
    run_dir = root / (label or upstream).replace(" ", "_") / train / f"fold{fold}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    frame.to_csv(run_dir / "predictions-test-dev-best.csv", index=False)
    scores = {t: {"macro_f1": macro_f1(frame[[f"{t}_{c}" for c in CLASSES]].to_numpy(), binarize(probs))}
              for t in STIMULI}
    n_split = len(split_clips(fold, "test"))
    results = {"schema": 1, "path": "cache", "upstream": upstream, "upstream_label": label or upstream, "fold": fold,
               "train_stimulus": train, "votes": votes_name, "seed": seed, "step": 100, "checkpoint": "dev-best.ckpt",
               "split": "test", "n_clips": len(clips), "partition_clips": n_split, "complete": len(clips) == n_split,
               "test_stimuli": scores}
    (run_dir / "results-test-dev-best.json").write_text(json.dumps(results))
    return run_dir


# --- the packaged numbers ---------------------------------------------------------------------------


def test_packaged_numbers_are_consistent_with_each_other_and_with_the_package():
    paper = load_paper_numbers()
    # Table III's rows are the paper's 15 upstreams, by S3PRL hub name, in the paper's order (FBANK is fbank)
    assert list(paper.matched) == [u.name for u in PAPER_UPSTREAMS]
    assert paper.matched_names["fbank"] == "FBANK" and paper.matched_names["wavlm_large"] == "WavLM Large"
    assert paper.matched_stimuli == ("voice", "face", "av")
    # Table III's WavLM row is Table IV's diagonal; Table IV covers every train x (voice, face, av)
    assert paper.cross_upstream == "wavlm_large"
    assert set(paper.cross) == {(a, b) for a in STIMULI for b in ("voice", "face", "av")}
    for s in paper.matched_stimuli:
        assert paper.cross[(s, s)].macro_f1 == paper.matched["wavlm_large"][s]
    assert paper.matched["wavlm_large"] == {"voice": 0.7117, "face": 0.6366, "av": 0.7076}
    # every interval holds its value; every macro-F1 is the mean of its six printed per-class F1 (rounding: 1e-4)
    for cell in paper.cross.values():
        assert cell.ci_low < cell.macro_f1 < cell.ci_high
        assert abs(np.mean(cell.per_class_f1) - cell.macro_f1) <= 1e-4
    # each upstream is best on voice or av, never on face, as the paper reports; FBANK last
    assert all(max(row, key=row.get) != "face" for name, row in paper.matched.items() if name != "fbank")
    assert min(paper.matched, key=lambda u: paper.matched[u]["voice"]) == "fbank"
    # Table II is the CCC this package computes from the paper's votes, to the paper's 3 decimals
    ours = agreement_matrix(load_votes("paper"))
    for i, a in enumerate(STIMULI):
        for b in STIMULI[:i]:
            assert round(float(ours.loc[a, b]), 3) == paper.ccc(a, b), (a, b)
    assert packaged_file(PAPER_FILE).name == PAPER_FILE  # SHA-256 checked


def packaged_json() -> dict:
    return json.loads(packaged_file(PAPER_FILE).read_text(encoding="utf-8"))


@pytest.mark.parametrize("change,message", [
    (lambda o: o["table4"]["cells"][0].update(ci95=[0.72, 0.73]), "voice -> voice: macro-F1 0.7117 lies outside"),
    (lambda o: o["table4"]["cells"][0]["per_class_f1"].update(angry=0.7838), "is not the mean of its per-class F1"),
    (lambda o: o["table3"]["rows"][0].update(face=0.6367), "Table III wavlm_large / face (0.6367) differs from Table IV"),
    (lambda o: o["table2"]["pairs"].pop(), "Table II holds 5 of the 6 pairs"),
    (lambda o: o["table4"]["cells"].pop(), "Table IV holds 11 cells"),
    (lambda o: o["table3"]["rows"][3].update(av="0.6555"), "Table III wav2vec2_large_ll60k / av is '0.6555', not a number"),
    (lambda o: o.pop("table2"), "unexpected layout"),
])
def test_inconsistent_paper_numbers_are_refused_in_one_line(change, message):
    obj = copy.deepcopy(packaged_json())
    parse_paper_numbers(obj)  # the packaged object passes
    change(obj)
    with pytest.raises(StimulusError, match=re.escape(message)) as error:
        parse_paper_numbers(obj)
    assert "\n" not in str(error.value)


# --- the comparison, on paper numbers placed around the report's own intervals -----------------------


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, votes):
    """Two WavLM Large systems (ours on part of the corpus, one fold of face missing; the 'authors'), FBANK with
    two seeds, and a local-entry system whose upstream is not one of the paper's."""
    root = tmp_path_factory.mktemp("noisy")
    for train in STIMULI:
        for fold in FOLDS:
            if (train, fold) != ("face", 2):
                write_run(root, votes, "wavlm_large", train, fold)
            write_run(root, votes, "wavlm_large", train, fold, label="WavLM Large (authors)", strength=3.0)
            write_run(root, votes, "wavlm_local", train, fold)
            for seed in (0, 1):
                write_run(root, votes, "fbank", train, fold, seed=seed, strength=0.5)
    return build_report(root, settings=ScoreSettings(num_bootstraps=BOOTSTRAPS))


def placed_paper(report):
    """Paper numbers around ``wavlm_large``'s own cells: inside its CI (the midpoint), except voice -> face
    0.03 above its upper bound; per-class F1 its own, except av -> av's fear 0.05 lower; FBANK 0.1 above ours."""
    real = load_paper_numbers()
    cross = {}
    for train, test in real.cross:
        cell = report.cell("wavlm_large", train, test)
        value = (cell.low + cell.high) / 2 if not cell.missing else 0.6
        value = cell.high + 0.03 if (train, test) == ("voice", "face") else value
        per_class = list(cell.per_class) if cell.per_class else [0.6] * 6
        if (train, test) == ("av", "av"):
            per_class[CLASSES.index("fear")] -= 0.05
        cross[(train, test)] = PaperCell(value, value - 0.01, value + 0.01, tuple(per_class))
    matched = dict(real.matched)
    matched["wavlm_large"] = {s: cross[(s, s)].macro_f1 for s in real.matched_stimuli}
    matched["fbank"] = {s: report.cell("fbank", s, s).value + 0.1 for s in real.matched_stimuli}
    return replace(real, cross=cross, matched=matched)


def by_cell(table, *keys):
    return {tuple(r[k] for k in keys): r for r in table.numbers.to_dict("records")}


def test_differences_within_ci_flags_and_missing_cells_against_hand_placed_numbers(noisy):
    paper = placed_paper(noisy)
    result = compare_with_paper(noisy, decimals=3, paper=paper)
    tables = {t.stem: t for t in result.tables}
    assert set(tables) == {"reproduction_table2", "reproduction_table3", "reproduction_table4",
                           "reproduction_table4_per_class"}
    cross = by_cell(tables["reproduction_table4"], "system", "train_stimulus", "test_stimulus")
    # both systems of upstream wavlm_large are compared, 12 cells each; never the local entry, never test 'all'
    assert {k[0] for k in cross} == {"wavlm_large", "WavLM Large (authors)"} and len(cross) == 24
    assert not any(k[2] == "all" for k in cross)
    for (system, train, test), row in cross.items():
        cell = noisy.cell(system, train, test)
        expected = paper.cross[(train, test)].macro_f1
        assert row["paper_macro_f1"] == expected
        if system == "wavlm_large" and train == "face":  # fold 2 never written: shown as missing, not zero
            assert cell.missing and row["status"] == "missing" and math.isnan(row["macro_f1"])
            assert row["paper_within_ci"] == ""
            continue
        assert row["difference"] == pytest.approx(cell.value - expected, abs=1e-12)
        assert row["paper_within_ci"] == (cell.low <= expected <= cell.high)
        if system == "wavlm_large":
            assert row["paper_within_ci"] == ((train, test) != ("voice", "face"))
    outside = cross[("wavlm_large", "voice", "face")]
    assert outside["difference"] == pytest.approx(noisy.cell("wavlm_large", "voice", "face").value
                                                  - noisy.cell("wavlm_large", "voice", "face").high - 0.03)
    # one summary line per compared system: 8 of the 9 present cells inside; 3 missing; all built from 40-clip folds
    ours = next(line for line in result.summary if line.startswith("Table IV, wavlm_large:"))
    worst = max(abs(r["difference"]) for k, r in cross.items() if k[0] == "wavlm_large" and k[1] != "face")
    assert ours.startswith(f"Table IV, wavlm_large: 8/9 overall cells within CI; 3 missing; "
                           f"max |ours - paper| {worst:.4f}; † built from incomplete runs; "
                           "per-class max |ours - paper| 0.0500")
    authors = [r for k, r in cross.items() if k[0] == "WavLM Large (authors)"]
    inside = sum(r["paper_within_ci"] for r in authors)
    assert any(line.startswith(f"Table IV, WavLM Large (authors): {inside}/12 overall cells within CI; max")
               for line in result.summary)
    # per-class: differences only (no CI); the fear cell placed 0.05 below ours
    per_class = by_cell(tables["reproduction_table4_per_class"], "system", "train_stimulus", "test_stimulus", "class")
    assert per_class[("wavlm_large", "av", "av", "fear")]["difference"] == pytest.approx(0.05)
    assert per_class[("wavlm_large", "av", "av", "angry")]["difference"] == pytest.approx(0.0, abs=1e-12)
    assert per_class[("wavlm_large", "face", "av", "angry")]["status"] == "missing"
    assert "paper_within_ci" not in tables["reproduction_table4_per_class"].numbers.columns


def test_table3_matches_systems_by_upstream_and_says_what_it_left_out(noisy):
    paper = placed_paper(noisy)
    result = compare_with_paper(noisy, paper=paper)
    table = next(t for t in result.tables if t.stem == "reproduction_table3")
    rows = by_cell(table, "system", "train_stimulus")
    assert {k[0] for k in rows} == {"wavlm_large", "WavLM Large (authors)", "fbank"}  # not wavlm_local
    assert {k[1] for k in rows} == {"voice", "face", "av"}  # our all -> all cells: omitted
    assert rows[("WavLM Large (authors)", "voice")]["paper_name"] == "WavLM Large"
    assert rows[("wavlm_large", "face")]["status"] == "missing"
    for s in ("voice", "face", "av"):  # FBANK: two seeds, so no CI; difference only (ours − (ours + 0.1))
        assert rows[("fbank", s)]["status"] == "no CI (several seeds)"
        assert rows[("fbank", s)]["difference"] == pytest.approx(-0.1)
    line = next(line for line in result.summary if line.startswith("Table III:"))
    within = sum(r["paper_within_ci"] is True for r in rows.values())
    authors = sum(rows[("WavLM Large (authors)", s)]["paper_within_ci"] for s in ("voice", "face", "av"))
    assert line.startswith(f"Table III: {within}/5 matched cells within CI (WavLM Large (authors) {authors}/3, "
                           "wavlm_large 2/2, fbank 0/0); 1 missing; 3 without a CI (several seeds); max |ours - paper| ")
    assert line.endswith("; † built from incomplete runs; 1 system(s) not compared (upstream not the paper's)")
    notes = " ".join(table.notes)
    assert ("Not compared (upstream not one of the paper's): wavlm_local (upstream wavlm_local: a local entry, e.g. "
            "wavlm_large from a file; the model it read is not known by name, so label it after the model to compare "
            "(recipe: wavlm_large:FILE)).") in notes
    assert "no all (train = test) column" in notes
    markdown = to_markdown(table)
    fbank = next(line for line in markdown.splitlines() if line.startswith("| fbank ") and "| voice |" in line)
    assert "n/a (no CI: mean of 2 seeds)" in fbank and "-0.1000" in fbank
    missing = next(line for line in markdown.splitlines() if line.startswith("| wavlm_large ") and "| face |" in line)
    assert "missing" in missing and "n/a (missing)" in missing and "0.0" not in missing.split("|")[4]
    assert "(† built from incomplete runs)" in table.title


def test_table4_of_another_upstream_is_not_compared_and_table2_follows_the_votes_source(tmp_path, votes):
    for train in ("voice", "face"):
        for fold in FOLDS:
            write_run(tmp_path, votes, "hubert_large_ll60k", train, fold, votes_name="crema-d")
    report = build_report(tmp_path, settings=ScoreSettings(num_bootstraps=10))
    result = compare_with_paper(report)
    table2 = by_cell(result.tables[0], "a", "b")
    crema_d = agreement_matrix(load_votes("crema-d"))
    assert table2[("all", "voice")]["difference"] == pytest.approx(float(crema_d.loc["all", "voice"]) - 0.745)
    assert table2[("all", "voice")]["difference"] < -0.005  # CREMA-D's own votes: not the paper's labels
    assert result.summary[0].startswith("Table II (CCC, votes 'crema-d'): 6 pairs compared; max |ours - paper| 0.0")
    assert any("The paper's labels are those of votes 'paper'" in n for n in result.tables[0].notes)
    assert [t.stem for t in result.tables] == ["reproduction_table2", "reproduction_table3"]
    assert "Table IV: not compared (the paper's Table IV is WavLM Large; no system here has upstream wavlm_large)" \
        in result.summary
    assert any("the paper has no Table IV for that upstream" in n for n in result.notes)
    table3 = by_cell(result.tables[1], "system", "train_stimulus")
    assert table3[("hubert_large_ll60k", "av")]["status"] == "missing"  # the paper has it; we never trained av
    assert table3[("hubert_large_ll60k", "voice")]["paper_macro_f1"] == 0.6746


# --- the command, with the packaged numbers ---------------------------------------------------------


@pytest.fixture(scope="module")
def perfect(tmp_path_factory, votes):
    """WavLM Large runs on every test clip whose predictions are their train label set: matched macro-F1 1."""
    root = tmp_path_factory.mktemp("perfect")
    for train in STIMULI:
        for fold in FOLDS:
            write_run(root, votes, "wavlm_large", train, fold, perfect=True, whole_split=True)
    out = tmp_path_factory.mktemp("report")
    return root, out


def test_report_command_compares_with_the_packaged_numbers(perfect, capsys):
    root, out = perfect
    assert cli.main(["report", str(root), "--out", str(out), "--bootstraps", "20"]) == 0
    printed = capsys.readouterr().out
    paper = load_paper_numbers()
    table3 = pd.read_csv(out / "reproduction_table3.csv").set_index("train_stimulus")
    for s, expected in (("voice", 0.2883), ("face", 0.3634), ("av", 0.2924)):  # 1 − Table III's WavLM row
        assert (table3.loc[s, "macro_f1"], table3.loc[s, "ci_low"], table3.loc[s, "ci_high"]) == (1.0, 1.0, 1.0)
        assert table3.loc[s, "difference"] == pytest.approx(expected, abs=1e-6)
        assert not table3.loc[s, "paper_within_ci"] and table3.loc[s, "complete"]
    assert "paper: Table III: 0/3 matched cells within CI (wavlm_large 0/3); max |ours - paper| 0.3634\n" in printed
    cross = pd.read_csv(out / "reproduction_table4.csv").set_index(["train_stimulus", "test_stimulus"])
    assert len(cross) == 12 and cross.loc[("all", "voice"), "paper_macro_f1"] == 0.6873
    assert cross.loc[("all", "voice"), "paper_ci_low"] == 0.6803
    per_class = pd.read_csv(out / "reproduction_table4_per_class.csv").set_index(
        ["train_stimulus", "test_stimulus", "class"])
    assert per_class.loc[("voice", "voice", "angry"), "difference"] == pytest.approx(1 - 0.7738)
    assert per_class.loc[("face", "face", "neutral"), "difference"] == pytest.approx(1 - 0.7414)
    table2 = pd.read_csv(out / "reproduction_table2.csv")
    ours = agreement_matrix(load_votes("paper"))
    for row in table2.itertuples():
        assert row.difference == pytest.approx(float(ours.loc[row.a, row.b]) - paper.ccc(row.a, row.b), abs=1e-6)  # CSV: 6 decimals
    worst = max(abs(table2.difference))
    assert f"paper: Table II (CCC, votes 'paper'): 6 pairs compared; max |ours - paper| {worst:.4f}" in printed
    assert worst < 5e-4  # the paper's votes reproduce its Table II to its rounding
    lines = [line for line in printed.splitlines() if line.startswith("paper: ")]
    # the matched cells (1 with a [1, 1] interval) are outside; the cross-tested ones are judged by their intervals
    assert not cross.loc[[(s, s) for s in ("voice", "face", "av")], "paper_within_ci"].any()
    within = (cross["ci_low"] <= cross["paper_macro_f1"]) & (cross["paper_macro_f1"] <= cross["ci_high"])
    assert list(cross["paper_within_ci"]) == list(within)
    assert len(lines) == 3 and lines[2].startswith(f"paper: Table IV, wavlm_large: {within.sum()}/12 overall cells "
                                                   "within CI; max |ours - paper| 0.3634; per-class max")
    index = (out / "index.md").read_text()
    assert "## Reproduction: the paper's numbers" in index
    for line in lines:
        assert f"- {line.removeprefix('paper: ')}" in index
    for stem in ("reproduction_table2", "reproduction_table3", "reproduction_table4", "reproduction_table4_per_class"):
        assert f"[{stem}.md]({stem}.md)" in index and f"[{stem}.tex]({stem}.tex)" in index
    for path in sorted(out.glob("reproduction_*.tex")):  # booktabs tables as the report's others (test_reports)
        text = path.read_text()
        assert "_" not in re.sub(r"\\_|\\label\{[^}]*\}", "", text.split("\n", 1)[1])
        lines = text.splitlines()
        top, mid, bottom = (lines.index(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
        spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", text).group(1)
        rows = lines[top + 1:mid] + lines[mid + 1:bottom]
        assert rows and all(len(re.split(r"(?<!\\)&", r)) == len(spec) for r in rows), path
    latex = (out / "reproduction_table4.tex").read_text()
    assert r"voice $\rightarrow$ voice" in latex and r"\textbf{no}" in latex and "†" not in latex
    markdown = (out / "reproduction_table4.md").read_text()
    row = next(line for line in markdown.splitlines() if "| voice → voice |" in line)
    assert "| 1.0000 [1.0000, 1.0000] | 0.7117 [0.7043, 0.7185] | +0.2883 | **no** |" in row


@pytest.mark.parametrize("upstream, label, layers, expected", [
    ("wavlm_large", "anything", None, "wavlm_large"),  # a hub name is its own row, whatever its label
    ("wavlm_local", "wavlm_large", None, "wavlm_large"),  # the recipe's wavlm_large:FILE
    ("wavlm_local", "WavLM Large (authors)", 25, "wavlm_large"),  # the title, then a separator
    ("wavlm_local", "wavlm_large", 13, None),  # 13 hidden states: a Base model, whatever its label says
    ("wavlm_local", "wavlm_large_ft", None, None),  # another name, not the paper's followed by a separator
    ("wavlm_local", "mine", None, None),
    ("hubert_local", "wavlm_large", None, None),  # the label names a model this entry cannot load
    ("wav2vec2_local", "wav2vec 2.0 Robust (mine)", 25, "wav2vec2_large_lv60_cv_swbd_fsh"),
    ("wav2vec2_local", "wav2vec 2.0 Large", 25, "wav2vec2_large_ll60k"),
    ("wav2vec2_local", "XLS-R 1B", 49, "xls_r_1b"),
    ("my_upstream", "wavlm_large", None, None),  # not a local entry of a paper upstream
])
def test_local_entries_are_matched_by_a_label_naming_the_model(upstream, label, layers, expected):
    assert paper_upstream_of(upstream, label, layers) == expected


def test_a_local_entry_labelled_after_the_model_is_compared_and_said_so(tmp_path, votes):
    for train in ("voice", "face", "av"):
        for fold in FOLDS:
            write_run(tmp_path, votes, "wavlm_local", train, fold, label="wavlm_large")
    report = build_report(tmp_path, settings=ScoreSettings(num_bootstraps=BOOTSTRAPS))
    result = compare_with_paper(report)
    table3 = next(t for t in result.tables if t.stem == "reproduction_table3")
    assert set(table3.numbers["system"]) == {"wavlm_large"}
    assert set(table3.numbers["paper_macro_f1"]) == {0.7117, 0.6366, 0.7076}
    note = ("Matched by label (a local entry names no model; its weights are not verified as the paper's): "
            "wavlm_large (wavlm_local -k FILE).")
    assert note in table3.notes
    table4 = next(t for t in result.tables if t.stem == "reproduction_table4")
    assert len(table4.numbers) == 12 and note in table4.notes

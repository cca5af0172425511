"""report: numbers recomputed from the predictions CSVs with the core metrics; tables, figures, missing runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from s3prl_stimulus import CLASSES, STIMULI, cli
from s3prl_stimulus.agreement import agreement_matrix
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.labels import binary_frame, load_votes
from s3prl_stimulus.metrics import binarize, bootstrap_ci, macro_f1, paired_bootstrap, per_class_f1
from s3prl_stimulus.partition import FOLDS, speakers_of, split_clips
from s3prl_stimulus.study.reports import FIGURE_PIXELS, build_report, ScoreSettings

CLIPS_PER_FOLD = 40
BOOTSTRAPS = 200
UPSTREAMS = {"fbank": ("s3prl", 1.2, 1), "wavlm_local": ("cache", 2.5, 5)}  # path, signal strength, layers
MISSING_FOLD = ("fbank", "face", 3)  # this run is never written
NO_AV_TARGETS = ("wavlm_local", "voice", 2)  # this run's predictions lack the av targets


@pytest.fixture(scope="module")
def votes():
    return load_votes("paper")


def fold_clips(fold: int) -> list:
    clips = split_clips(fold, "test")
    return clips[:: len(clips) // CLIPS_PER_FOLD][:CLIPS_PER_FOLD]


def write_run(root: Path, votes, upstream: str, train: str, fold: int, seed: int = 0, drop_tests=(),
              votes_name: str = "paper", drop_clips: int = 0, extra: dict | None = None, path: str | None = None,
              whole_split: bool = False, coverage: bool = True) -> Path:
    """One run's three files. By default it predicts CLIPS_PER_FOLD of the fold's test clips, as a run on part
    of the corpus does, and says so (``"complete": false``); ``coverage=False`` writes results as they were
    before that field existed."""
    default_path, strength, layers = UPSTREAMS[upstream]
    path = path or default_path
    rng = np.random.default_rng([fold, seed, STIMULI.index(train), layers])
    clips = (split_clips(fold, "test") if whole_split else fold_clips(fold))[drop_clips:]
    truth = binary_frame(votes, train).loc[clips].to_numpy()
    logits = strength * truth + rng.normal(0, 1, truth.shape)  # predictions correlated with the train labels
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(probs, columns=list(CLASSES))
    frame.insert(0, "speaker", speakers_of(clips))
    frame.insert(0, "clip", clips)
    tests = [s for s in STIMULI if s not in drop_tests]
    for test in tests:
        frame[[f"{test}_{c}" for c in CLASSES]] = binary_frame(votes, test).loc[clips].to_numpy()
    run_dir = root / path / upstream / train / f"fold{fold}" / f"seed{seed}" / Path((extra or {}).get("upstream_ckpt", "ckpt")).stem
    run_dir.mkdir(parents=True)
    frame.to_csv(run_dir / "predictions-test-dev-best.csv", index=False)
    scores = {t: {"macro_f1": macro_f1(frame[[f"{t}_{c}" for c in CLASSES]].to_numpy(), binarize(probs)),
                  "ci95": [0, 1], "per_class_f1": {}, "loss": 0.0, "n_clips": len(clips)} for t in tests}
    n_split = len(split_clips(fold, "test"))
    covered = {"partition_clips": n_split, "complete": len(clips) == n_split} if coverage else {}
    results = {"schema": 1, "path": path, "upstream": upstream, "fold": fold, "train_stimulus": train,
               "votes": votes_name, "seed": seed, "step": 100, "checkpoint": "dev-best.ckpt", "split": "test",
               "n_clips": len(clips), "test_stimuli": scores, **covered, **(extra or {})}
    (run_dir / "results-test-dev-best.json").write_text(json.dumps(results))
    weights = rng.dirichlet(np.ones(layers) * 2).tolist() if layers > 1 else [1.0]
    (run_dir / "layer_weights.json").write_text(json.dumps(
        {"upstream": upstream, "fold": fold, "train_stimulus": train, "weights": weights}))
    return run_dir


@pytest.fixture(scope="module")
def tree(tmp_path_factory, votes):
    root = tmp_path_factory.mktemp("results")
    for upstream in UPSTREAMS:
        for train in STIMULI:
            for fold in FOLDS:
                if (upstream, train, fold) == MISSING_FOLD:
                    continue
                drop = ("av",) if (upstream, train, fold) == NO_AV_TARGETS else ()
                write_run(root, votes, upstream, train, fold, drop_tests=drop)
    return root


@pytest.fixture(scope="module")
def report_dir(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    code = cli.main(["report", str(tree), "--out", str(out), "--bootstraps", str(BOOTSTRAPS)])
    assert code == 0
    return out


def pooled_from_csvs(root: Path, upstream: str, train: str, test: str, seed: int = 0):
    """Independent recomputation: read the CSVs (metadata from the JSONs), pool the folds, score."""
    frames = []
    for results in sorted(root.rglob("results-test-dev-best.json")):
        meta = json.loads(results.read_text())
        if (meta["upstream"], meta["train_stimulus"], meta["seed"]) == (upstream, train, seed):
            frames.append((meta["fold"], pd.read_csv(results.with_name("predictions-test-dev-best.csv"))))
    assert sorted(f for f, _ in frames) == list(FOLDS)
    frames = [f for _, f in sorted(frames, key=lambda x: x[0])]
    pooled = pd.concat(frames).sort_values("clip")
    y_true = pooled[[f"{test}_{c}" for c in CLASSES]].to_numpy()
    y_pred = binarize(pooled[list(CLASSES)].to_numpy())
    per_fold = [macro_f1(f[[f"{test}_{c}" for c in CLASSES]].to_numpy(), binarize(f[list(CLASSES)].to_numpy()))
                for f in frames]
    return y_true, y_pred, per_fold, pooled["speaker"].to_numpy()


def test_table3_equals_recomputation_from_predictions(tree, report_dir):
    table = pd.read_csv(report_dir / "table3_matched.csv").set_index("upstream")
    checked = 0
    for upstream in UPSTREAMS:
        for train in STIMULI:
            if (upstream, train) == MISSING_FOLD[:2]:
                continue
            y_true, y_pred, per_fold, speakers = pooled_from_csvs(tree, upstream, train, train)
            value, (low, high) = bootstrap_ci(macro_f1, y_true, y_pred, conditions=None, num_bootstraps=BOOTSTRAPS)
            row = table.loc[upstream]
            assert row[f"{train}_macro_f1"] == pytest.approx(value, abs=1e-6)
            assert (row[f"{train}_ci_low"], row[f"{train}_ci_high"]) == pytest.approx((low, high), abs=1e-6)
            assert row[f"{train}_fold_mean"] == pytest.approx(np.mean(per_fold), abs=1e-6)
            assert row[f"{train}_fold_std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-6)
            assert len(y_true) == 5 * CLIPS_PER_FOLD
            checked += 1
    assert checked == 7
    # best per row and row order (best macro-F1 descending)
    values = table[[f"{s}_macro_f1" for s in STIMULI]]
    assert list(table["best_train_stimulus"]) == [c.removesuffix("_macro_f1") for c in values.idxmax(axis=1)]
    assert list(values.max(axis=1)) == sorted(values.max(axis=1), reverse=True)
    assert list(table.index) == ["wavlm_local", "fbank"]  # the stronger synthetic upstream first


def test_missing_run_is_shown_as_missing_and_listed(report_dir):
    table = pd.read_csv(report_dir / "table3_matched.csv").set_index("upstream")
    assert np.isnan(table.loc["fbank", "face_macro_f1"])  # not zero
    markdown = (report_dir / "table3_matched.md").read_text()
    fbank_row = next(line for line in markdown.splitlines() if line.startswith("| fbank "))
    assert "missing" in fbank_row and "(4 folds)" in fbank_row
    missing = pd.read_csv(report_dir / "missing_runs.csv", keep_default_na=False)
    rows = {(r.system, r.train_stimulus, r.fold, r.test_stimulus) for r in missing.itertuples()}
    assert rows == {("fbank", "face", 3, ""), ("wavlm_local", "voice", 2, "av")}
    index = (report_dir / "index.md").read_text()
    assert "## Missing runs" in index and "not cross-tested" in index
    cross = pd.read_csv(report_dir / "table4_cross_wavlm_local.csv").set_index("train_stimulus")
    assert np.isnan(cross.loc["voice", "av_macro_f1"]) and not np.isnan(cross.loc["voice", "face_macro_f1"])


def test_table4_cross_matrix_and_per_class(tree, report_dir):
    cross = pd.read_csv(report_dir / "table4_cross_wavlm_local.csv").set_index("train_stimulus")
    per_class = pd.read_csv(report_dir / "table4_per_class_wavlm_local.csv")
    for train, test in [("face", "voice"), ("all", "av"), ("av", "all")]:
        y_true, y_pred, _, speakers = pooled_from_csvs(tree, "wavlm_local", train, test)
        value, (low, high) = bootstrap_ci(macro_f1, y_true, y_pred, conditions=None, num_bootstraps=BOOTSTRAPS)
        assert cross.loc[train, f"{test}_macro_f1"] == pytest.approx(value, abs=1e-6)
        assert cross.loc[train, f"{test}_ci_low"] == pytest.approx(low, abs=1e-6)
        row = per_class[(per_class.train_stimulus == train) & (per_class.test_stimulus == test)].iloc[0]
        expected = per_class_f1(y_true, y_pred)
        assert [row[c] for c in CLASSES] == pytest.approx([expected[c] for c in CLASSES], abs=1e-6)
    markdown = (report_dir / "table4_cross_wavlm_local.md").read_text()
    assert markdown.count("**") == 2 * 4  # one best training set per test column


def test_paired_tests_and_agreement(tree, report_dir):
    paired = pd.read_csv(report_dir / "paired_tests.csv")
    # wavlm: 4 train sets on 4 tests, but voice lacks av targets in one fold; fbank: face missing
    assert len(paired) == 6 * 3 + 3 + 3 * 4
    row = paired[(paired.system == "wavlm_local") & (paired.test_stimulus == "face")
                 & (paired.train_a == "voice") & (paired.train_b == "all")].iloc[0]
    y_true, pred_a, _, speakers = pooled_from_csvs(tree, "wavlm_local", "voice", "face")
    y_true_b, pred_b, _, _ = pooled_from_csvs(tree, "wavlm_local", "all", "face")
    assert np.array_equal(y_true, y_true_b)
    expected = paired_bootstrap(macro_f1, y_true, pred_a, pred_b, conditions=None, num_bootstraps=BOOTSTRAPS)
    assert row.difference == pytest.approx(expected.difference, abs=1e-6)
    assert (row.ci_low, row.ci_high) == pytest.approx(expected.ci, abs=1e-6)
    assert row.p_value == pytest.approx(expected.p_value, abs=1e-6)
    family = paired[(paired.system == "wavlm_local") & (paired.test_stimulus == "face")]
    assert (family.p_holm >= family.p_value - 1e-12).all() and (family.p_holm <= 1).all()
    agreement = pd.read_csv(report_dir / "table2_agreement.csv").set_index("stimulus")
    expected = agreement_matrix(load_votes("paper"))
    assert np.allclose(agreement.loc[list(STIMULI), list(STIMULI)].to_numpy(), expected.to_numpy(), atol=1e-6)


def test_figures_are_images_of_the_expected_size(report_dir):
    import matplotlib.image

    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert pngs == ["cross_test_heatmap_wavlm_local.png", "fig2_layer_weights_wavlm_local.png",
                    "per_class_f1_wavlm_local.png"]  # fbank has a single layer: no Fig. 2
    for name in pngs:
        image = matplotlib.image.imread(report_dir / name)
        assert image.shape[:2] == (FIGURE_PIXELS[1], FIGURE_PIXELS[0])
        assert image[..., :3].std() > 0.01  # not a blank canvas
        assert (report_dir / name).with_suffix(".pdf").read_bytes().startswith(b"%PDF")


def latex_engine():
    return next((e for e in ("pdflatex", "lualatex", "xelatex") if shutil.which(e)), None)


def test_latex_tables_are_booktabs(report_dir, tmp_path):
    tex_files = sorted(report_dir.glob("*.tex"))
    assert {p.stem for p in tex_files} == {"table2_agreement", "table3_matched", "table4_cross_wavlm_local",
                                           "table4_per_class_wavlm_local", "paired_tests",
                                           "reproduction_table2", "reproduction_table3"}  # fbank is a paper upstream
    for path in tex_files:
        text = path.read_text()
        assert "_" not in re.sub(r"\\_|\\label\{[^}]*\}", "", text.split("\n", 1)[1])  # underscores escaped
        lines = text.splitlines()
        top, mid, bottom = (lines.index(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
        assert top < mid < bottom
        spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", text).group(1)
        rows = lines[top + 1:mid] + lines[mid + 1:bottom]
        assert rows and all(r.endswith(r"\\") for r in rows)
        assert all(len(re.split(r"(?<!\\)&", r)) == len(spec) for r in rows)
    engine = latex_engine()
    if engine is None:
        return  # parsed above; compiled where a TeX engine is installed
    body = "\n".join(p.read_text() for p in tex_files)
    document = tmp_path / "tables.tex"
    document.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                        f"\\begin{{document}}\n{body}\n\\end{{document}}\n")
    done = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", document.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


def test_index_links_every_output(report_dir):
    index = (report_dir / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert links and all((report_dir / link).is_file() for link in links)
    produced = {p.name for p in report_dir.iterdir() if p.name != "index.md"}
    assert produced <= {Path(link).name for link in links}


def test_several_seeds_are_scored_per_seed(tmp_path, votes):
    for seed in (0, 1):
        for fold in FOLDS:
            write_run(tmp_path / "runs", votes, "wavlm_local", "voice", fold, seed=seed)
    report = build_report(tmp_path / "runs", settings=ScoreSettings(num_bootstraps=50))
    per_seed = [macro_f1(*pooled_from_csvs(tmp_path / "runs", "wavlm_local", "voice", "voice", seed)[:2])
                for seed in (0, 1)]
    cell = report.cell("wavlm_local", "voice", "voice")
    assert cell.n_seeds == 2 and per_seed[0] != per_seed[1]
    assert cell.value == pytest.approx(np.mean(per_seed)) and cell.seed_std == pytest.approx(np.std(per_seed, ddof=1))
    assert np.isnan(cell.low)  # one CI per seed lives in scores.csv, not in the table cell
    assert len(report.pooled.query("train_stimulus == 'voice' and test_stimulus == 'voice'")) == 2


def test_paired_test_on_runs_that_scored_different_clips(tmp_path, votes):
    for train in ("voice", "face"):
        for fold in FOLDS:
            write_run(tmp_path, votes, "wavlm_local", train, fold, drop_clips=3 if (train, fold) == ("face", 4) else 0)
    report = build_report(tmp_path, settings=ScoreSettings(num_bootstraps=100, by_speaker=False))
    row = report.paired.query("test_stimulus == 'av'").iloc[0]
    assert (row.train_a, row.train_b, row.n_clips) == ("voice", "face", 5 * CLIPS_PER_FOLD - 3)
    y_true, pred_a, *_ = pooled_from_csvs(tmp_path, "wavlm_local", "voice", "av")
    _, pred_b, *_ = pooled_from_csvs(tmp_path, "wavlm_local", "face", "av")
    dropped = set(fold_clips(4)[:3])
    keep = np.array([c not in dropped for c in sorted(sum((fold_clips(f) for f in FOLDS), []))])
    expected = paired_bootstrap(macro_f1, y_true[keep], pred_a[keep], pred_b, num_bootstraps=100)
    assert (row.difference, row.ci_low, row.ci_high, row.p_value) == pytest.approx(
        (expected.difference, *expected.ci, expected.p_value), abs=1e-9)


def test_systems_are_named_by_upstream_checkpoint_and_path(tmp_path, votes):
    write_run(tmp_path, votes, "wavlm_local", "voice", 1, extra={"upstream_ckpt": "/ckpt/tiny_a.pt"})
    write_run(tmp_path, votes, "wavlm_local", "voice", 1, extra={"upstream_ckpt": "/ckpt/tiny_b.pt"})
    write_run(tmp_path, votes, "fbank", "voice", 1, path="cache")
    write_run(tmp_path, votes, "fbank", "voice", 1, path="s3prl")
    report = build_report(tmp_path, settings=ScoreSettings(num_bootstraps=10))
    assert sorted(report.study.systems) == ["fbank (cache)", "fbank (s3prl)", "wavlm_local[tiny_a]", "wavlm_local[tiny_b]"]
    assert build_report(tmp_path, path="s3prl", settings=ScoreSettings(num_bootstraps=10)).study.systems == ["fbank"]


def test_bad_trees_are_one_line_errors(tmp_path, votes):
    write_run(tmp_path / "a", votes, "fbank", "voice", 1)
    copy = tmp_path / "a" / "copy"
    shutil.copytree(tmp_path / "a" / "s3prl", copy)
    with pytest.raises(StimulusError, match="two results for fbank / train voice / fold 1 / seed 0"):
        build_report(tmp_path / "a")
    write_run(tmp_path / "b", votes, "fbank", "voice", 1)
    write_run(tmp_path / "b" / "other", votes, "fbank", "face", 1, votes_name="crema-d")
    with pytest.raises(StimulusError, match="several vote sources"):
        build_report(tmp_path / "b")
    run_dir = write_run(tmp_path / "c", votes, "fbank", "voice", 1)
    meta = json.loads((run_dir / "results-test-dev-best.json").read_text())
    (run_dir / "results-test-dev-best.json").write_text(json.dumps({**meta, "fold": 2}))
    with pytest.raises(StimulusError, match="not in fold 2's test split"):
        build_report(tmp_path / "c")
    out = tmp_path / "out"
    assert cli.main(["report", str(tmp_path / "c"), "--out", str(out)]) == 2
    assert not out.exists()  # validated before anything is written


def test_numbers_from_runs_on_part_of_the_corpus_are_marked_everywhere(tmp_path, votes):
    for fold in FOLDS:
        # results written before partition_clips/complete existed: judged by their predictions' clips
        write_run(tmp_path, votes, "wavlm_local", "voice", fold, whole_split=True, coverage=False)
        # every test clip scored, but the JSON says the run trained on part of the corpus
        write_run(tmp_path, votes, "wavlm_local", "face", fold, whole_split=True,
                  extra={"partition_clips": len(split_clips(fold, "test")), "complete": fold != 3})
        write_run(tmp_path, votes, "fbank", "voice", fold)  # 40 of each fold's test clips
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path), "--out", str(out), "--bootstraps", "20"]) == 0
    numbers = pd.read_csv(out / "table3_matched.csv").set_index("upstream")
    assert numbers.loc["wavlm_local", "voice_complete"] and not numbers.loc["wavlm_local", "face_complete"]
    assert numbers.loc["wavlm_local", "voice_n_clips"] == numbers.loc["wavlm_local", "voice_partition_clips"] == 7442
    assert (numbers.loc["fbank", "voice_n_clips"], numbers.loc["fbank", "voice_partition_clips"]) == (200, 7442)
    assert not numbers.loc["fbank", "voice_complete"]
    markdown = (out / "table3_matched.md").read_text()
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in markdown.splitlines()
             if line.startswith("| wavlm_local") or line.startswith("| fbank")}
    assert "†" not in cells["wavlm_local"][0] + cells["wavlm_local"][1]  # voice, voice (folds): complete
    assert all(text.rstrip(" |*").endswith("†") for text in cells["wavlm_local"][2:] + cells["fbank"][:2])
    assert markdown.startswith("## Table III") and "(† built from incomplete runs)" in markdown.splitlines()[0]
    assert "†: built from runs on part of the corpus (200 of 7,442; 7,442 of 7,442 test clips" in markdown
    assert r"$^\dagger$" in (out / "table3_matched.tex").read_text()
    cross = (out / "table4_cross_wavlm_local.md").read_text()
    voice_row = next(line for line in cross.splitlines() if line.startswith("| voice "))
    face_row = next(line for line in cross.splitlines() if line.startswith("| face "))
    assert "†" not in voice_row and face_row.count("†") == 4
    index = (out / "index.md").read_text()
    assert "**† incomplete runs: 6 of 15**" in index
    assert "### Cross-testing macro-F1, wavlm_local († built from incomplete runs)" in index
    assert "Table III: macro-F1 on the matched test set (train S, test S), union of the five folds († built" in index
    incomplete = pd.read_csv(out / "incomplete_runs.csv")
    assert sorted(zip(incomplete.system, incomplete.fold)) == [("fbank", k) for k in FOLDS] + [("wavlm_local", 3)]
    assert list(incomplete.query("system == 'fbank'").n_clips) == [CLIPS_PER_FOLD] * 5
    run_dir = write_run(tmp_path / "bad", votes, "fbank", "voice", 1, extra={"complete": "yes"})
    with pytest.raises(StimulusError, match=f"{run_dir}.*complete 'yes' is not true or false"):
        build_report(tmp_path / "bad")


# --- issue 9: every number the report writes comes from verified inputs ----------------------------


def report_error(root: Path, tmp_path: Path) -> str:
    """The report's one-line error for ``root``; nothing is written."""
    out = tmp_path / "out"
    with pytest.raises(StimulusError) as error:
        build_report(root, settings=ScoreSettings(num_bootstraps=10))
    assert cli.main(["report", str(root), "--out", str(out), "--bootstraps", "10"]) == 2 and not out.exists()
    assert "\n" not in str(error.value)
    return str(error.value)


def rewrite_results(run_dir: Path, **changes) -> None:
    path = run_dir / "results-test-dev-best.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del meta[key]
    path.write_text(json.dumps(meta))


def test_predictions_must_hold_exactly_the_clips_the_results_json_names(tmp_path, votes):
    predictions = "predictions-test-dev-best.csv"
    truncated = write_run(tmp_path / "truncated", votes, "fbank", "voice", 1)
    csv = truncated / predictions
    csv.write_text("\n".join(csv.read_text().splitlines()[:6]) + "\n")  # header + 5 rows
    assert f"{csv}: holds 5 clip(s) but its results JSON says n_clips {CLIPS_PER_FOLD}" in report_error(
        tmp_path / "truncated", tmp_path)

    n_split = len(split_clips(1, "test"))
    old = write_run(tmp_path / "old", votes, "fbank", "voice", 1, coverage=False)  # no "complete": whole split
    message = report_error(tmp_path / "old", tmp_path)
    assert f"{old / predictions}: holds {CLIPS_PER_FOLD} of fold 1's {n_split} test clips" in message
    assert "does not say the run used part of the corpus" in message

    said = write_run(tmp_path / "said", votes, "fbank", "voice", 1, extra={"complete": True})
    assert f"{said / predictions}: holds {CLIPS_PER_FOLD} of fold 1's {n_split} test clips" in report_error(
        tmp_path / "said", tmp_path)

    other = write_run(tmp_path / "other", votes, "fbank", "voice", 1, extra={"partition_clips": n_split + 1})
    assert f"{other / 'results-test-dev-best.json'}: partition_clips {n_split + 1}, but fold 1's test split has " \
           f"{n_split} clips" in report_error(tmp_path / "other", tmp_path)

    whole = write_run(tmp_path / "whole", votes, "fbank", "voice", 1, whole_split=True, coverage=False)
    partial = write_run(tmp_path / "whole", votes, "fbank", "voice", 2)
    report = build_report(tmp_path / "whole", settings=ScoreSettings(num_bootstraps=10))
    assert {r.fold: len(r.probs) for r in report.study.runs} == {1: n_split, 2: CLIPS_PER_FOLD}
    assert any("1 run(s) used part of the corpus" in n and str(partial) in n for n in report.notes)
    assert not any(str(whole) in n for n in report.notes)


def test_a_stored_macro_f1_that_differs_from_the_predictions_is_an_error(tmp_path, votes):
    run_dir = write_run(tmp_path / "a", votes, "fbank", "voice", 1)
    stored = json.loads((run_dir / "results-test-dev-best.json").read_text())["test_stimuli"]
    rewrite_results(run_dir, test_stimuli={**stored, "face": {**stored["face"],
                                                              "macro_f1": stored["face"]["macro_f1"] + 1e-5}})
    message = report_error(tmp_path / "a", tmp_path)
    assert message.startswith(f"{run_dir / 'results-test-dev-best.json'}: stored face macro-F1")
    assert "recomputed from predictions-test-dev-best.csv" in message
    rewrite_results(run_dir, test_stimuli={**stored, "face": {**stored["face"],
                                                              "macro_f1": stored["face"]["macro_f1"] + 1e-9}})
    assert build_report(tmp_path / "a", settings=ScoreSettings(num_bootstraps=10)).study.runs  # rounding passes


def test_the_report_refuses_predictions_that_are_not_distributions(tmp_path, votes):
    run_dir = write_run(tmp_path / "a", votes, "fbank", "voice", 1)
    frame = pd.read_csv(run_dir / "predictions-test-dev-best.csv")
    frame[list(CLASSES)] = np.minimum(3 * frame[list(CLASSES)], 1.0)  # in [0, 1], but no longer shares
    frame.to_csv(run_dir / "predictions-test-dev-best.csv", index=False)
    message = report_error(tmp_path / "a", tmp_path)
    assert message.startswith(f"{run_dir / 'predictions-test-dev-best.csv'}, line 2 (clip {fold_clips(1)[0]}): "
                              "the probabilities sum to")


def test_systems_are_named_by_their_label(tmp_path, votes):
    same = {"upstream_ckpt": "/ckpt/tiny.pt"}
    write_run(tmp_path / "a", votes, "wavlm_local", "voice", 1, extra={**same, "upstream_label": "small"})
    write_run(tmp_path / "b", votes, "wavlm_local", "voice", 1, extra={**same, "upstream_label": "also_small"})
    write_run(tmp_path / "c", votes, "wavlm_local", "voice", 1, extra={"upstream_ckpt": "/ckpt/tiny_c.pt",
                                                                        "upstream_label": "mine"})
    write_run(tmp_path / "d", votes, "fbank", "voice", 1)  # no label (older results): named by its upstream
    report = build_report(tmp_path, settings=ScoreSettings(num_bootstraps=10))
    assert sorted(report.study.systems) == ["also_small", "fbank", "mine", "small"]
    pooled = {(r.system, r.fold): r.results_file for r in report.study.runs}
    assert pooled[("small", 1)].is_relative_to(tmp_path / "a") and pooled[("mine", 1)].is_relative_to(tmp_path / "c")

    write_run(tmp_path / "e", votes, "fbank", "voice", 2, extra={"upstream_label": "mine"})
    assert "label 'mine' names runs of upstream wavlm_local" in report_error(tmp_path, tmp_path)


def test_wrong_speakers_are_refused_and_unverified_upstreams_are_noted(tmp_path, votes):
    run_dir = write_run(tmp_path / "a", votes, "fbank", "voice", 1)
    frame = pd.read_csv(run_dir / "predictions-test-dev-best.csv")
    frame.loc[0, "speaker"] = 1091  # the by-speaker bootstrap would resample the wrong actor
    frame.to_csv(run_dir / "predictions-test-dev-best.csv", index=False)
    message = report_error(tmp_path / "a", tmp_path)
    assert message.startswith(f"{run_dir / 'predictions-test-dev-best.csv'}: clip {fold_clips(1)[0]} has speaker 1091")
    unverified = {"upstream_identity": {"upstream": "fbank", "upstream_ckpt": None, "weights_sha256": None,
                                        "verified": False, "reason": "upstream unverified: no identity in x.ckpt"}}
    run_dir = write_run(tmp_path / "b", votes, "fbank", "voice", 1, extra=unverified)
    report = build_report(tmp_path / "b", settings=ScoreSettings(num_bootstraps=10))
    assert any(str(run_dir) in n and "no identity in x.ckpt" in n for n in report.notes)


# --- issue 10, item 8: figures that say what they show and fit their canvas -----------------------


def drawn_figures(report, tmp_path, monkeypatch) -> dict:
    """Every figure of the report as drawn (caption -> matplotlib figure), saved under ``tmp_path``."""
    from s3prl_stimulus.study.reports import figures, write_report

    drawn, save = {}, figures.save_figure

    def keep(fig, stem):
        fig.canvas.draw()  # layout done: the boxes below are the saved PNG's
        drawn[stem.name] = (fig, [a for a in fig.axes], fig.canvas.get_renderer())
        return save(fig, stem)

    monkeypatch.setattr(figures, "save_figure", keep)
    write_report(report, tmp_path)
    return drawn


def shown_texts(fig, axes) -> list:
    """The texts a reader sees: titles, axis labels, tick labels inside the view, texts and legends."""
    texts = []
    for ax in axes:
        texts += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()] + list(ax.texts)
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for tick in axis.get_major_ticks():
                if min(limits) - 1e-9 <= tick.get_loc() <= max(limits) + 1e-9:
                    texts += [label for label in (tick.label1, tick.label2) if label.get_visible() and label.get_text()]
    return texts + list(fig.legends)


EDGE = 2  # px: a text's box includes its line spacing; a rotated y label's box pokes ~1.3 px past the edge


def assert_readable(name, fig, axes, renderer):
    width, height = FIGURE_PIXELS
    for text in shown_texts(fig, axes):
        box = text.get_window_extent(renderer)
        shown = getattr(text, "get_text", lambda: "legend")()
        assert box.x0 >= -EDGE and box.y0 >= -EDGE and box.x1 <= width + EDGE and box.y1 <= height + EDGE, \
            f"{name}: {shown!r} leaves the {width}x{height} canvas: {box}"
    for ax in axes:
        for legend in fig.legends:
            assert not ax.title.get_window_extent(renderer).overlaps(legend.get_window_extent(renderer)), \
                f"{name}: the legend covers the title {ax.title.get_text()!r}"


LONG_LABEL = "wavlm_large_finetuned_on_something_long"


def test_every_text_of_every_figure_is_inside_the_canvas_and_clear_of_legends(tmp_path, votes, monkeypatch):
    # a long system label and runs on part of the corpus (the † note) make the longest titles
    for train in STIMULI:
        for fold in FOLDS:
            write_run(tmp_path / "long", votes, "wavlm_local", train, fold, extra={"upstream_label": LONG_LABEL})
    # four folds only: nothing pools, every cell of the heatmap and every bar is missing
    for fold in (1, 2, 3, 4):
        write_run(tmp_path / "empty", votes, "wavlm_local", "voice", fold)
    for tree_name in ("long", "empty"):
        report = build_report(tmp_path / tree_name, settings=ScoreSettings(num_bootstraps=10))
        drawn = drawn_figures(report, tmp_path / f"out_{tree_name}", monkeypatch)
        assert len(drawn) == 3
        for name, (fig, axes, renderer) in drawn.items():
            assert_readable(f"{tree_name}/{name}", fig, axes, renderer)
        bars, axes, renderer = next(v for k, v in drawn.items() if k.startswith("per_class_f1"))
        frame = axes[0].get_window_extent(renderer)
        for label in axes[0].get_xticklabels():  # each class name under the plot, none hanging off its edge
            box = label.get_window_extent(renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1, f"{tree_name}: {label.get_text()!r} hangs off the axes"


def test_figures_with_no_data_say_so_instead_of_a_colour_bar(tmp_path, votes, monkeypatch):
    for fold in (1, 2, 3, 4):
        write_run(tmp_path / "runs", votes, "wavlm_local", "voice", fold)
    report = build_report(tmp_path / "runs", settings=ScoreSettings(num_bootstraps=10))
    drawn = drawn_figures(report, tmp_path / "out", monkeypatch)
    heatmap, _, _ = drawn["cross_test_heatmap_wavlm_local"]
    assert len(heatmap.axes) == 1  # no colour bar of no values
    says = [t.get_text().replace("\n", " ") for t in heatmap.axes[0].texts]
    assert says.count("missing") == 4 and any(t.startswith("no data: every cell is missing") for t in says)
    bars, _, _ = drawn["per_class_f1_wavlm_local"]
    assert any(t.get_text().startswith("no data") for t in bars.axes[0].texts)


def test_a_heatmap_of_one_value_has_a_zero_to_one_scale(tmp_path, votes, monkeypatch):
    for fold in FOLDS:
        write_run(tmp_path / "runs", votes, "wavlm_local", "voice", fold, drop_tests=("face", "av", "all"))
    report = build_report(tmp_path / "runs", settings=ScoreSettings(num_bootstraps=10))
    heatmap, _, _ = drawn_figures(report, tmp_path / "out", monkeypatch)["cross_test_heatmap_wavlm_local"]
    assert heatmap.axes[0].images[0].get_clim() == (0.0, 1.0)


def test_figures_of_several_seeds_say_they_show_the_mean(tmp_path, votes, monkeypatch):
    for seed in (0, 1, 2):
        for train in ("voice", "face"):
            for fold in FOLDS:
                if (seed, train) != (2, "face"):  # face has two seeds, voice three
                    write_run(tmp_path / "runs", votes, "wavlm_local", train, fold, seed=seed)
    report = build_report(tmp_path / "runs", settings=ScoreSettings(num_bootstraps=10))
    drawn = drawn_figures(report, tmp_path / "out", monkeypatch)
    titles = {name: fig.axes[0].get_title().replace("\n", " ") for name, (fig, _, _) in drawn.items()}
    assert "(mean over 2-3 seeds per cell)" in titles["cross_test_heatmap_wavlm_local"]
    assert "(mean over 2-3 seeds per cell)" in titles["per_class_f1_wavlm_local"]
    assert titles["cross_test_heatmap_wavlm_local"].endswith("(† built from incomplete runs)")
    index = (tmp_path / "out" / "index.md").read_text()
    assert "### Cross-testing macro-F1, wavlm_local (mean over 2-3 seeds per cell) († built from incomplete runs)" in index
    assert "### Per-class F1 on the matched test set, wavlm_local (mean over 2-3 seeds per cell) (†" in index
    fig2, _, _ = drawn["fig2_layer_weights_wavlm_local"]
    assert [t.get_text() for t in fig2.legends[0].get_texts()] == ["voice (15 runs)", "face (10 runs)"]
    for seed in (1, 2):
        for fold in FOLDS:
            write_run(tmp_path / "two_seeds", votes, "wavlm_local", "voice", fold, seed=seed)
    two = build_report(tmp_path / "two_seeds", settings=ScoreSettings(num_bootstraps=10))
    drawn = drawn_figures(two, tmp_path / "out_two", monkeypatch)
    assert "(mean over 2 seeds)" in drawn["cross_test_heatmap_wavlm_local"][0].axes[0].get_title().replace("\n", " ")

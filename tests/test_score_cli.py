"""`s3prl-stimulus score` end to end, and its one-line errors for bad predictions files."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from s3prl_stimulus import CLASSES
from s3prl_stimulus.cli import main
from s3prl_stimulus.labels import binary_labels, distribution, load_votes
from s3prl_stimulus.metrics import bootstrap_ci, class_f1, macro_f1
from s3prl_stimulus.partition import speakers_of, split_clips
from s3prl_stimulus.results import SUM_TOLERANCE


@pytest.fixture(scope="module")
def votes():
    return load_votes("paper")


@pytest.fixture(scope="module")
def fold1(votes):
    return votes.subset(split_clips(1, "test"))


def write_predictions(path, clips, probs, suffix=".wav", **extra):
    frame = pd.DataFrame(probs, columns=CLASSES)
    frame.insert(0, "clip", [f"{c}{suffix}" for c in clips])
    for name, values in extra.items():
        frame[name] = values
    frame.to_csv(path, index=False)
    return path


def noisy_probs(counts, seed=0):
    """Vote distributions blurred with Dirichlet noise: a plausible, imperfect system."""
    noise = np.random.default_rng(seed).dirichlet(np.ones(6), size=len(counts))
    return 0.5 * distribution(counts) + 0.5 * noise


def score_json(capsys, *argv):
    assert main(["score", *map(str, argv), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perfect_predictions_score_one(tmp_path, capsys, fold1):
    path = write_predictions(tmp_path / "p.csv", fold1.clips, distribution(fold1.counts("face")))
    result = score_json(capsys, path, "--test-stimulus", "face", "--bootstraps", "20")
    assert result["n_clips"] == len(fold1) and result["macro_f1"] == 1.0 and result["ci95"] == [1.0, 1.0]
    assert result["per_class_f1"] == {c: 1.0 for c in CLASSES}
    assert score_json(capsys, path, "--test-stimulus", "voice", "--bootstraps", "0")["macro_f1"] < 1.0


@pytest.mark.parametrize("by_speaker", [False, True])
def test_scores_equal_metrics_and_scikit_learn(tmp_path, capsys, fold1, by_speaker):
    probs = noisy_probs(fold1.counts("voice"))
    path = write_predictions(tmp_path / "p.csv", fold1.clips, probs, speaker=0)
    flags = ["--by-speaker"] if by_speaker else []
    result = score_json(capsys, path, "--test-stimulus", "av", "--bootstraps", "40", "--seed", "3", *flags)
    y_true, y_pred = binary_labels(fold1.counts("av")), (probs > 1 / 6).astype(int)
    assert result["macro_f1"] == f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert result["per_class_f1"]["fear"] == f1_score(y_true[:, 3], y_pred[:, 3], zero_division=0)
    speakers = speakers_of(fold1.clips) if by_speaker else None
    assert tuple(result["ci95"]) == bootstrap_ci(macro_f1, y_true, y_pred, speakers, 40, seed=3)[1]
    assert tuple(result["per_class_ci95"]["sad"]) == bootstrap_ci(class_f1("sad"), y_true, y_pred, speakers, 40, seed=3)[1]
    assert result["by_speaker"] is by_speaker and result["seed"] == 3 and result["test_stimulus"] == "av"


def test_row_order_and_wav_suffix_do_not_matter(tmp_path, capsys, fold1):
    probs = noisy_probs(fold1.counts("all"), seed=1)
    first = write_predictions(tmp_path / "a.csv", fold1.clips, probs)
    order = np.random.default_rng(0).permutation(len(fold1))
    second = write_predictions(tmp_path / "b.csv", fold1.clips[order], probs[order], suffix="")
    argv = ["--test-stimulus", "all", "--bootstraps", "30"]
    assert score_json(capsys, first, *argv)["ci95"] == score_json(capsys, second, *argv)["ci95"]


def test_fold_restricts_to_its_test_clips(tmp_path, capsys, votes):
    path = write_predictions(tmp_path / "all.csv", votes.clips, noisy_probs(votes.counts("voice")))
    assert main(["score", str(path), "--test-stimulus", "voice", "--fold", "2", "--bootstraps", "10",
                 "--format", "csv"]) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(io.StringIO(captured.out), index_col=0)
    assert list(table.index) == [*CLASSES, "macro"] and list(table.columns) == ["f1", "ci95_low", "ci95_high"]
    n_test = len(split_clips(2, "test"))
    assert f"fold 2's {n_test} Test clips; ignored {len(votes) - n_test} other rows" in captured.err
    subset = votes.subset(split_clips(2, "test"))
    expected = macro_f1(binary_labels(subset.counts("voice")), (noisy_probs(votes.counts("voice"))[
        np.searchsorted(votes.clips, subset.clips)] > 1 / 6).astype(int))
    assert table.loc["macro", "f1"] == pytest.approx(expected, rel=1e-5)


def test_table_and_markdown_output(tmp_path, capsys, fold1):
    path = write_predictions(tmp_path / "p.csv", fold1.clips, noisy_probs(fold1.counts("voice")))
    assert main(["score", str(path), "--test-stimulus", "voice", "--bootstraps", "5", "--by-speaker"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"p.csv vs voice labels (paper votes; {len(fold1)} clips; 5 bootstraps by speaker, seed 0)")
    assert "macro" in out and "ci95_low" in out
    assert main(["score", str(path), "--test-stimulus", "voice", "--bootstraps", "5", "--format", "markdown"]) == 0
    assert "| class | f1 | ci95_low | ci95_high |" in capsys.readouterr().out


def error_of(capsys, *argv):
    assert main(["score", *map(str, argv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_predictions_files(tmp_path, capsys, fold1):
    clips, probs = fold1.clips[:20], noisy_probs(fold1.counts("voice")[:20])
    run = ["--test-stimulus", "voice", "--bootstraps", "5"]

    bad = write_predictions(tmp_path / "unknown.csv", [*clips[:19], "9999_XXX_ANG_XX"], probs)
    assert "unknown.csv" in (msg := error_of(capsys, bad, *run)) and "9999_XXX_ANG_XX" in msg and "1001_DFA_ANG_XX" in msg

    bad = write_predictions(tmp_path / "dup.csv", [*clips[:19], clips[3]], probs, suffix="")
    msg = error_of(capsys, bad, *run)
    assert "dup.csv, line 21" in msg and clips[3] in msg and "line 5" in msg and "one row per clip" in msg

    frame = pd.read_csv(write_predictions(tmp_path / "ok.csv", clips, probs))
    frame.drop(columns=["fear", "happy"]).to_csv(tmp_path / "cols.csv", index=False)
    assert "lacks column(s) fear, happy" in error_of(capsys, tmp_path / "cols.csv", *run)

    for name, value in [("nan", np.nan), ("big", 1.5), ("neg", -0.1), ("text", "high")]:
        broken = frame.astype({"sad": object})
        broken.loc[6, "sad"] = value
        broken.to_csv(tmp_path / f"{name}.csv", index=False)
        msg = error_of(capsys, tmp_path / f"{name}.csv", *run)
        assert f"{name}.csv, line 8 (clip {clips[6]}): sad" in msg and "[0, 1]" in msg

    assert f"lack {len(fold1) - 20} of fold 1's" in error_of(capsys, tmp_path / "ok.csv", *run, "--fold", "1")
    assert "does not exist" in error_of(capsys, tmp_path / "missing.csv", *run)
    assert "unknown fold" in error_of(capsys, tmp_path / "ok.csv", *run, "--fold", "6")
    assert "--bootstraps -1" in error_of(capsys, tmp_path / "ok.csv", "--test-stimulus", "voice", "--bootstraps", "-1")
    (tmp_path / "empty.csv").write_text("clip," + ",".join(CLASSES) + "\n")
    assert "no rows" in error_of(capsys, tmp_path / "empty.csv", *run)


def test_rows_that_are_not_distributions_are_refused_unless_normalised(tmp_path, capsys, fold1):
    """Probabilities x3, capped at 1, stay in [0, 1] but are no longer each class's share of the prediction."""
    inflated = np.minimum(3 * noisy_probs(fold1.counts("voice"), seed=2), 1.0)
    path = write_predictions(tmp_path / "x3.csv", fold1.clips, inflated)
    run = ["--test-stimulus", "voice", "--bootstraps", "0"]
    message = error_of(capsys, path, *run)
    assert f"x3.csv, line 2 (clip {fold1.clips[0]}): the probabilities sum to {inflated[0].sum():.6g}, not 1" in message
    assert f"{len(fold1)} row(s) in all" in message and "--normalise" in message

    result = score_json(capsys, path, *run, "--normalise")
    y_true = binary_labels(fold1.counts("voice"))
    shares = inflated / inflated.sum(axis=1, keepdims=True)
    assert result["macro_f1"] == macro_f1(y_true, (shares > 1 / 6).astype(int))
    assert result["macro_f1"] != macro_f1(y_true, (inflated > 1 / 6).astype(int))  # what the raw rows would score
    assert (result["normalise"], result["rows_off_sum"], result["sum_tolerance"]) == (True, len(fold1), SUM_TOLERANCE)
    assert main(["score", str(path), *run, "--normalise"]) == 0
    assert f"rows normalised to sum 1, {len(fold1)} of them off by > {SUM_TOLERANCE:g}" in capsys.readouterr().out

    zeros = write_predictions(tmp_path / "zeros.csv", fold1.clips[:3], np.zeros((3, 6)))
    assert "zeros.csv, line 2" in (msg := error_of(capsys, zeros, *run, "--normalise")) and "cannot be normalised" in msg


def test_the_sum_tolerance_accepts_rounded_float32_softmax_and_no_more(tmp_path, capsys, fold1):
    logits = np.random.default_rng(4).normal(0, 2, (len(fold1), 6)).astype(np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True, dtype=np.float32)
    rounded = write_predictions(tmp_path / "rounded.csv", fold1.clips, np.round(softmax, 4))
    result = score_json(capsys, rounded, "--test-stimulus", "voice", "--bootstraps", "0")
    assert (result["normalise"], result["rows_off_sum"]) == (False, 0)
    assert np.abs(np.round(softmax, 4).sum(axis=1) - 1).max() > 1e-5  # rounding did move the sums

    edge = np.full((2, 6), 1 / 6)
    edge[0, 0] += 0.9 * SUM_TOLERANCE
    edge[1, 0] += 1.1 * SUM_TOLERANCE
    path = write_predictions(tmp_path / "edge.csv", fold1.clips[:2], edge)
    assert "edge.csv, line 3" in error_of(capsys, path, "--test-stimulus", "voice", "--bootstraps", "0")

"""The corpus-free commands: agreement (Table II), stats, weights."""

import json

import numpy as np
import pytest

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.cli import main
from s3prl_stimulus.labels import binary_labels, distribution, load_votes
from s3prl_stimulus.partition import split_clips


def _run_json(capsys, *argv):
    assert main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _lin_ccc(x, y):
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    return 2 * cov / (((x - mx) ** 2).mean() + ((y - my) ** 2).mean() + (mx - my) ** 2)


def test_agreement_matrix_matches_a_direct_computation(capsys):
    matrix = _run_json(capsys, "agreement")
    assert list(matrix) == list(STIMULI) and all(list(row) == list(STIMULI) for row in matrix.values())
    votes = load_votes("paper")
    p = {s: distribution(votes.counts(s)) for s in STIMULI}
    for a in STIMULI:
        assert matrix[a][a] == pytest.approx(1.0)
        for b in STIMULI:
            expected = np.mean([_lin_ccc(p[a][:, c], p[b][:, c]) for c in range(6)])
            assert matrix[a][b] == pytest.approx(expected, abs=1e-12)
            assert matrix[a][b] == pytest.approx(matrix[b][a], abs=1e-15)
    # Pooling makes `all` closer to each stimulus than the stimuli are to one another.
    assert matrix["all"]["face"] > matrix["voice"]["face"]


def test_agreement_other_formats(capsys):
    assert main(["agreement", "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| stimulus | voice | face | av | all |" and len(lines) == 6
    assert main(["agreement", "--votes", "crema-d", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "stimulus,voice,face,av,all"


def test_stats_counts(capsys):
    stats = _run_json(capsys, "stats")
    votes = load_votes("paper")
    for s in STIMULI:
        positives = binary_labels(votes.counts(s))
        assert stats[s]["clips"] == 7442
        assert stats[s]["votes"] == int(votes.counts(s).sum())
        assert [stats[s][f"positive_{c}"] for c in CLASSES] == positives.sum(axis=0).tolist()
        assert sum(stats[s][f"clips_with_{k}_positive"] for k in range(7)) == 7442
    assert stats["voice"]["positive_neutral"] == 5738


def test_weights(capsys):
    out = _run_json(capsys, "weights", "--fold", "1", "--stimulus", "av")
    train = load_votes("paper").subset(split_clips(1, "train"))
    n_c = binary_labels(train.counts("av")).sum(axis=0)
    assert [out["samples_per_class"][c] for c in CLASSES] == n_c.tolist()
    beta = (len(train) - 1) / len(train)
    w = (1 - beta) / (1 - beta ** n_c.astype(float))
    w = w / w.sum() * 6
    assert [out["weights"][c] for c in CLASSES] == pytest.approx(w.tolist(), rel=1e-12)
    assert out["weights"]["happy"] == max(out["weights"].values())  # the rarest class weighs most


def test_cli_errors_are_one_line(capsys):
    assert main(["weights", "--fold", "9", "--stimulus", "av"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown fold '9'") and err.count("\n") == 1
    assert main(["agreement", "--votes", "/no/such/file.csv"]) == 2
    assert "neither a packaged source" in capsys.readouterr().err

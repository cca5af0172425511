"""Label files built from the packaged `paper` votes equal the authors' published files."""

import numpy as np
import pandas as pd
import pytest

from s3prl_stimulus import CLASSES
from s3prl_stimulus.cli import main
from s3prl_stimulus.label_files import authors_file_number, label_file_name

AUTHORS_ORDER = ["voice"] * 5 + ["av"] * 5 + ["all"] * 5 + ["face"] * 5


@pytest.fixture(scope="module")
def authors_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    assert main(["labels", "--out", str(out), "--layout", "authors"]) == 0
    return out


def test_authors_numbering():
    for i, stimulus in enumerate(AUTHORS_ORDER, start=1):
        assert authors_file_number(stimulus, (i - 1) % 5 + 1) == i


@pytest.mark.parametrize("number", range(1, 21))
def test_paper_votes_reproduce_published_label_files(shared_dir, authors_dir, number):
    ours = pd.read_csv(authors_dir / f"labels_consensus_{number}.csv", index_col=0)
    reference = pd.read_csv(shared_dir / "reference_labels" / f"labels_consensus_{number}.csv", index_col=0)
    assert list(ours.columns) == list(reference.columns)
    assert sorted(ours.index) == sorted(reference.index)
    ours = ours.loc[reference.index]
    # The published voice files are rounded to 6 decimals; the others match to float precision.
    tolerance = 1e-6 if AUTHORS_ORDER[number - 1] == "voice" else 1e-12
    assert np.abs(ours[list(CLASSES)].to_numpy() - reference[list(CLASSES)].to_numpy()).max() <= tolerance
    for column in ("SpkrID", "Gender", "Split_Set"):
        assert (ours[column] == reference[column]).all(), column


def test_emo_superb_layout_and_smoothing(tmp_path):
    assert main(["labels", "--out", str(tmp_path), "--stimuli", "face", "--folds", "2", "--smoothing", "0"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [label_file_name("face", 2)] == ["labels_face_fold2.csv"]
    table = pd.read_csv(tmp_path / files[0], index_col=0)
    assert np.allclose(table[list(CLASSES)].sum(axis=1), 1.0)
    assert table.loc["1001_DFA_ANG_XX.wav", "angry"] == pytest.approx(0.5)  # 5 of 10 face votes, unsmoothed
    assert set(table["Split_Set"]) == {"Train", "Development", "Test"}


def test_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    votes = tmp_path / "votes.csv"
    votes.write_text("clip,voice_angry\n1001_DFA_ANG_XX,1\n")
    assert main(["labels", "--out", str(out), "--votes", str(votes)]) == 2
    assert "votes.csv lacks column" in capsys.readouterr().err
    assert main(["labels", "--out", str(out), "--folds", "7"]) == 2
    assert "unknown fold '7'" in capsys.readouterr().err
    assert main(["labels", "--out", str(out), "--smoothing", "0.2"]) == 2
    assert not out.exists()

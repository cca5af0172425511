"""Labels per stimulus: vote arithmetic, sources, validation."""

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from s3prl_stimulus import CLASSES, STIMULI, resources
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.labels import (RATED_STIMULI, binary_frame, binary_labels, distribution, label_frame,
                                   load_votes, soft_targets)


@pytest.fixture(scope="module")
def paper():
    return load_votes("paper")


def test_packaged_sources_cover_crema_d(paper):
    crema = load_votes("crema-d")
    assert len(paper) == len(crema) == 7442
    assert (paper.clips == crema.clips).all()
    assert paper.clips[0] == "1001_DFA_ANG_XX"
    # CREMA-D's tabulation drops distracted responses, so it never has more votes than the paper's counts.
    for s in RATED_STIMULI:
        assert (crema.counts(s).sum(axis=1) <= paper.counts(s).sum(axis=1)).all()
        assert crema.counts(s).sum() < paper.counts(s).sum()


def test_all_pools_counts_not_distributions(paper):
    pooled = paper.counts("voice") + paper.counts("face") + paper.counts("av")
    assert (paper.counts("all") == pooled).all()
    mean_of_distributions = np.mean([distribution(paper.counts(s)) for s in RATED_STIMULI], axis=0)
    differs = np.abs(distribution(pooled) - mean_of_distributions).max(axis=1) > 1e-9
    assert differs.sum() > 100  # vote totals differ between stimuli, so the two definitions really differ


def test_soft_targets_default_is_094p_plus_001(paper):
    counts = paper.counts("face")
    p = counts / counts.sum(axis=1, keepdims=True)
    assert np.allclose(soft_targets(counts), 0.94 * p + 0.01, atol=1e-15)
    assert np.allclose(soft_targets(counts, 0.0), p)
    assert np.allclose(soft_targets(counts, 0.03).sum(axis=1), 1.0)
    frame = label_frame(paper, "face")
    assert list(frame.columns) == list(CLASSES) and frame.index[0] == "1001_DFA_ANG_XX"


def test_uniform_distribution_is_smoothing_fixed_point():
    uniform = np.ones((1, 6), dtype=np.int64)
    assert np.allclose(soft_targets(uniform), 1 / 6)


def test_binary_labels_exact_at_one_sixth():
    # Every vote total from 6 to 60 with a class holding exactly n/6 of the votes: negative, never positive.
    for n in range(6, 61, 6):
        counts = np.array([[n // 6, n - n // 6, 0, 0, 0, 0]])
        assert binary_labels(counts).tolist() == [[0, 1, 0, 0, 0, 0]]
    # Exhaustive check against exact rational arithmetic on small vote totals.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 8, size=(5000, 6))
    counts[counts.sum(axis=1) == 0, 0] = 1
    expected = [[int(Fraction(int(c), int(row.sum())) > Fraction(1, 6)) for c in row] for row in counts]
    assert binary_labels(counts).tolist() == expected


def test_binary_frame_matches_counts(paper):
    frame = binary_frame(paper, "voice")
    assert frame.loc["1001_DFA_ANG_XX"].tolist() == [1, 0, 1, 0, 0, 0]  # votes 6,0,3,0,1,0 of 10


def test_subset_keeps_order_and_rejects_unknown(paper):
    sub = paper.subset(["1091_WSI_SAD_XX", "1001_DFA_ANG_XX"])
    assert sub.clips.tolist() == ["1091_WSI_SAD_XX", "1001_DFA_ANG_XX"]
    assert (sub.counts("av")[1] == paper.counts("av")[0]).all()
    with pytest.raises(StimulusError, match="1001_XXX_ANG_XX"):
        paper.subset(["1001_XXX_ANG_XX"])


def test_unknown_stimulus_and_source(paper):
    with pytest.raises(StimulusError, match="unknown stimulus 'audio'.*voice, face, av, all"):
        paper.counts("audio")
    with pytest.raises(StimulusError, match="neither a packaged source"):
        load_votes("papers")
    with pytest.raises(StimulusError, match="smoothing"):
        soft_targets(np.ones((1, 6)), 0.5)


def test_tabulated_votes_file_equals_packaged_crema_d(shared_dir):
    from_file = load_votes(shared_dir / "crema_d" / "tabulatedVotes.csv")
    packaged = load_votes("crema-d")
    assert (from_file.clips == packaged.clips).all()
    for s in STIMULI:
        assert (from_file.counts(s) == packaged.counts(s)).all()


def test_paper_layout_file_roundtrip(tmp_path, paper):
    frame = pd.DataFrame({"clip": [c + ".wav" for c in paper.clips[:3]]})
    for s in RATED_STIMULI:
        for i, c in enumerate(CLASSES):
            frame[f"{s}_{c}"] = paper.counts(s)[:3, i]
    path = tmp_path / "votes.csv"
    frame.to_csv(path, index=False)
    votes = load_votes(path)
    assert votes.clips.tolist() == paper.clips[:3].tolist()
    assert (votes.counts("all") == paper.counts("all")[:3]).all()


def _responses(rows):
    cols = ["localid", "pos", "ans", "ttr", "queryType", "numTries", "clipNum", "questNum", "subType",
            "clipName", "sessionNums", "respEmo", "respLevel", "dispEmo", "dispVal", "dispLevel"]
    out = []
    for i, (clip, query_type, session, quest, emo) in enumerate(rows):
        out.append(["p", i, f"{emo}_50", 900, query_type, 0, 1, quest, 4, clip, session, emo, 50, "A", "x", 50])
    return pd.DataFrame(out, columns=cols)


def test_finished_responses_tabulation_and_distracted_rule(tmp_path):
    clip = "1001_DFA_ANG_XX"
    rows = [(clip, 1, 10, 1, "A"), (clip, 1, 11, 1, "A"), (clip, 1, 12, 1, "S"),
            (clip, 2, 10, 7, "D"), (clip, 3, 10, 3, "H"), (clip, 3, 13, 3, "N")]
    responses = tmp_path / "finishedResponses.csv"
    _responses(rows).to_csv(responses)
    votes = load_votes(responses)
    assert votes.counts("voice").tolist() == [[2, 1, 0, 0, 0, 0]]
    assert votes.counts("face").tolist() == [[0, 0, 1, 0, 0, 0]]
    assert votes.counts("av").tolist() == [[0, 0, 0, 0, 1, 1]]
    # Session 11's voice answer and session 13's audio-visual answer had a first click after 10 s.
    emo = pd.DataFrame({"localid": ["p"] * 4, "sessionNums": [11, 13, 10, 12], "queryType": [1, 3, 1, 1],
                        "questNum": [1, 3, 1, 1], "pos": [0] * 4, "ttr": [10001, 25000, 10000, 300],
                        "numTries": [0] * 4, "clipNum": [1] * 4, "clipName": [clip] * 4})
    emo_path = tmp_path / "finishedEmoResponses.csv"
    emo.to_csv(emo_path)
    kept = load_votes(responses, distracted=emo_path)
    assert kept.counts("voice").tolist() == [[1, 1, 0, 0, 0, 0]]  # ttr of exactly 10 000 ms is kept
    assert kept.counts("av").tolist() == [[0, 0, 0, 0, 0, 1]]  # the neutral answer was distracted


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.drop(columns=["face_fear"]), "lacks column.*face_fear"),
    (lambda f: f.assign(voice_angry=[-1, 0]), "1002_DFA_ANG_XX.*negative, missing or non-integer"),
    (lambda f: f.assign(av_sad=[0.5, 0]), "1002_DFA_ANG_XX.*non-integer"),
    (lambda f: f.assign(clip=["1002_DFA_ANG_XX", "1002_DFA_ANG_XX.wav"]), "appears more than once"),
    (lambda f: f.assign(**{f"face_{c}": [0, 1] for c in CLASSES}), "zero face votes"),
])
def test_bad_votes_file(tmp_path, paper, mutate, message):
    frame = pd.DataFrame({"clip": ["1002_DFA_ANG_XX", "1003_DFA_ANG_XX"]})
    for s in RATED_STIMULI:
        for c in CLASSES:
            frame[f"{s}_{c}"] = [1, 2]
    path = tmp_path / "bad_votes.csv"
    mutate(frame).to_csv(path, index=False)
    with pytest.raises(StimulusError, match=message) as err:
        load_votes(path)
    assert "bad_votes.csv" in str(err.value) and "\n" not in str(err.value)


def test_unrecognised_votes_file(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(StimulusError, match="none of the known layouts"):
        load_votes(path)


def test_altered_packaged_file_is_refused(tmp_path, monkeypatch):
    for name in resources.SHA256:
        (tmp_path / name).write_bytes((resources.DATA_DIR / name).read_bytes())
    with open(tmp_path / "votes_paper.csv.gz", "ab") as fh:
        fh.write(b"\0")
    monkeypatch.setattr(resources, "DATA_DIR", tmp_path)
    resources.packaged_file.cache_clear()
    try:
        with pytest.raises(StimulusError, match="fails its checksum"):
            load_votes("paper")
        (tmp_path / "votes_paper.csv.gz").unlink()
        with pytest.raises(StimulusError, match="missing"):
            load_votes("paper")
    finally:
        resources.packaged_file.cache_clear()


def test_fold_labels_look_up_the_label_sets_of_given_clips(paper):
    from s3prl_stimulus.labels import FoldLabels

    clips = {"train": ["1001_DFA_ANG_XX", "1002_DFA_ANG_XX"], "test": ["1091_WSI_SAD_XX"]}
    lookup = FoldLabels("paper", 0.01, ["face", "all"], clips)
    soft = lookup.soft_targets("all", ["1091_WSI_SAD_XX", "1001_DFA_ANG_XX"])
    assert soft.dtype == np.float32
    expected = label_frame(paper, "all").loc[["1091_WSI_SAD_XX", "1001_DFA_ANG_XX"]].to_numpy()
    assert np.allclose(soft, expected, atol=1e-7)
    assert lookup.binary_labels("face", ["1002_DFA_ANG_XX"]).tolist() == \
        binary_frame(paper, "face").loc[["1002_DFA_ANG_XX"]].to_numpy().tolist()
    with pytest.raises(StimulusError, match="unknown stimulus"):
        FoldLabels("paper", 0.01, ["faces"], clips)

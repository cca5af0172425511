"""EMO-SUPERB folds: speaker independence, the block rule, errors."""

import pandas as pd
import pytest

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.partition import FOLDS, check_fold, fold_splits, load_partition, speakers_of, split_clips

BLOCKS = [range(1001, 1019), range(1019, 1037), range(1037, 1055), range(1055, 1073), range(1073, 1092)]


@pytest.mark.parametrize("fold", FOLDS)
def test_folds_are_speaker_independent_and_follow_the_block_rule(fold):
    splits = {s: split_clips(fold, s) for s in ("train", "dev", "test")}
    assert sum(len(c) for c in splits.values()) == 7442
    speakers = {s: set(speakers_of(c)) for s, c in splits.items()}
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    assert speakers["test"] == set(BLOCKS[fold - 1])
    assert speakers["dev"] == set(BLOCKS[fold % 5])
    assert len(speakers["train"]) == 91 - len(BLOCKS[fold - 1]) - len(BLOCKS[fold % 5])


def test_every_clip_is_tested_exactly_once_over_the_five_folds():
    tested = pd.Series([c for k in FOLDS for c in split_clips(k, "test")])
    assert len(tested) == tested.nunique() == 7442


def test_split_names_and_table():
    assert split_clips(2, "Development") == split_clips(2, "dev")
    table = load_partition()
    assert list(table.columns) == ["SpkrID", "Gender", "fold1", "fold2", "fold3", "fold4", "fold5"]
    assert fold_splits(3).loc["1001_DFA_ANG_XX"] == "Train"


@pytest.mark.parametrize("bad", [0, 6, "a", 1.5, None, True])
def test_unknown_fold(bad):
    with pytest.raises(StimulusError, match="folds 1-5"):
        check_fold(bad)


def test_unknown_split_and_clip():
    with pytest.raises(StimulusError, match="train, dev or test"):
        split_clips(1, "validation")
    with pytest.raises(StimulusError, match="not a CREMA-D clip"):
        speakers_of(["nope"])


def test_a_run_is_complete_only_with_every_clip_of_its_split_and_every_training_clip():
    from s3prl_stimulus.results import coverage

    test, train = split_clips(3, "test"), split_clips(3, "train")
    assert coverage(3, "test", test, train) == {"partition_clips": 1476, "complete": True}
    assert coverage(3, "test", test[1:], train) == {"partition_clips": 1476, "complete": False}
    assert coverage(3, "test", test, train[:-1]) == {"partition_clips": 1476, "complete": False}  # trained on less
    assert coverage(3, "dev", split_clips(3, "dev"), train)["partition_clips"] == len(split_clips(3, "dev"))

"""The upstream identity's rules on their own (end to end through both paths: test_upstream_identity.py)."""

import pytest
import torch

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.identity import (UpstreamIdentity, checkpoint_state, verify_checkpoint,
                                                 weights_sha256)

FIX = "use the right upstream"
OPTION = "--allow-it"


def checkpoint_of(identity) -> dict:
    return {"Downstream": {"head.weight": torch.zeros(2)} | ({} if identity is None else {"_extra_state": checkpoint_state(identity)})}


def verify(current, saved, allow=False):
    return verify_checkpoint(current, checkpoint_of(saved), "x.ckpt", allow, OPTION, FIX)


def test_weights_fingerprint_sees_every_value_and_name():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    before = weights_sha256(module)
    assert before == weights_sha256(module) and len(before) == 64
    with torch.no_grad():
        module.bias[0] += 1e-6  # one float's last bits
    assert weights_sha256(module) != before
    renamed = torch.nn.Sequential(module)  # same tensors, other names: another module
    assert weights_sha256(renamed) != weights_sha256(module)


def test_same_upstream_is_verified_and_other_weights_or_name_refused():
    b = UpstreamIdentity.of("wavlm_local", "b.pt", "b" * 64)
    assert verify(b, UpstreamIdentity.of("wavlm_local", "elsewhere/b.pt", "b" * 64)) == b  # the file may move
    with pytest.raises(StimulusError, match=r"trained on upstream wavlm_local -k b.pt \(weights sha256 bbbbbbbbbbbb\), "
                                            r"but the upstream here is wavlm_local -k a.pt \(weights sha256 aaaaaaaaaaaa\): "
                                            "use the right upstream"):
        verify(UpstreamIdentity.of("wavlm_local", "a.pt", "a" * 64), b, allow=True)  # the option never covers a mismatch
    empty = weights_sha256(torch.nn.Module())  # parameter-free upstreams share one fingerprint: the name tells them apart
    with pytest.raises(StimulusError, match=r"upstream fbank \(weights sha256 .*upstream here is mfcc"):
        verify(UpstreamIdentity.of("mfcc", None, empty), UpstreamIdentity.of("fbank", None, empty))


def test_what_cannot_be_compared_needs_the_option_and_stays_unverified():
    current = UpstreamIdentity.of("fbank", None, "f" * 64)
    with pytest.raises(StimulusError, match=r"records no upstream identity .*this one \(fbank\), accept it unverified with --allow-it"):
        verify(current, None)
    accepted = verify(current, None, allow=True)
    assert (accepted.verified, accepted.weights_sha256) == (False, "f" * 64)
    assert accepted.reason == "upstream unverified: checkpoint x.ckpt records no upstream identity (written by an older version or other code)"
    unseen = UpstreamIdentity.of("fbank", None, None)  # an expert built outside S3PRL's Runner
    with pytest.raises(StimulusError, match="outside S3PRL's Runner"):
        verify(unseen, current)
    # a head that once came through an unverified checkpoint stays unverified, without asking again
    inherited = verify(current, accepted)
    assert not inherited.verified and "descends from an unverified one (checkpoint x.ckpt records no" in inherited.reason


def test_a_malformed_identity_is_refused():
    checkpoint = {"Downstream": {"_extra_state": {"upstream_identity": {"sha": "edited"}}}}
    with pytest.raises(StimulusError, match="malformed upstream identity"):
        verify_checkpoint(UpstreamIdentity.of("fbank", None, "f" * 64), checkpoint, "x.ckpt", True, OPTION, FIX)

"""s3prl-stimulus: *Stimulus Modality Matters* (ICASSP 2025) as an S3PRL downstream plugin.

Each paper concept lives in one module at this package's root: :mod:`.labels` (CREMA-D votes → label sets
per stimulus), :mod:`.partition` (EMO-SUPERB folds), :mod:`.loss`, :mod:`.metrics`, :mod:`.agreement` and
:mod:`.results` (evaluation outputs). The machinery around them is in subpackages: :mod:`.integration`
(S3PRL's runner on today's stacks), :mod:`.cache` (extract once, sweep the grid) and :mod:`.study` (corpus,
recipe, reports). The S3PRL adapter is the top-level ``downstream/emotion_stimulus`` folder, installed as
:mod:`s3prl_stimulus.downstream.emotion_stimulus`. Map: docs/design.md.
"""

__version__ = "0.1.0"

CLASSES = ("angry", "sad", "disgust", "fear", "neutral", "happy")
"""Emotion classes in the paper's (and EMO-SUPERB's) column order."""

STIMULI = ("voice", "face", "av", "all")
"""Annotation stimuli: voice-only, face-only, audio-visual, and all three pooled."""

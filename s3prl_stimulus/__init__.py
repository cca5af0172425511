"""s3prl-stimulus: *Stimulus Modality Matters* (ICASSP 2025) as an S3PRL downstream plugin.

Each paper concept lives in one module: :mod:`labels` (CREMA-D votes → label sets per stimulus),
:mod:`partition` (EMO-SUPERB folds), :mod:`loss`, :mod:`metrics`, :mod:`agreement`, :mod:`cache`
and :mod:`reports`. The S3PRL adapter is :mod:`s3prl_stimulus.downstream.emotion_stimulus`.
"""

__version__ = "0.1.0"

CLASSES = ("angry", "sad", "disgust", "fear", "neutral", "happy")
"""Emotion classes in the paper's (and EMO-SUPERB's) column order."""

STIMULI = ("voice", "face", "av", "all")
"""Annotation stimuli: voice-only, face-only, audio-visual, and all three pooled."""

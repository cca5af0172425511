"""S3PRL downstream ``emotion_stimulus`` (resolved as ``s3prl.downstream.emotion_stimulus``).

``expert.py`` (S3PRL's DownstreamExpert), ``dataset.py`` (datarc, clips, labels, loaders, outputs),
``model.py`` (projector + S3PRL utterance-level head), ``config.yaml`` (the paper's setup).
Usage and options: docs/downstream.md.
"""

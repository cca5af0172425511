"""The S3PRL integration: how S3PRL 0.4.18's own runner drives this package on today's stacks.

- :mod:`.compat`: shims for the torch / torchaudio / huggingface_hub APIs S3PRL still calls;
- :mod:`.registration`: makes ``s3prl.downstream.emotion_stimulus`` resolve to ``downstream/emotion_stimulus``
  (the ``.pth`` alias finder, and ``register``/``unregister`` symlinks);
- :mod:`.hub_entries`: which hub entries drop ``-k``, and the local entry that reads each of the paper's
  upstreams from a file;
- :mod:`.launcher`: ``python -m s3prl_stimulus.run_downstream``: S3PRL's ``run_downstream`` with the shims,
  the alias and the defaults S3PRL gets wrong.

Imports nothing: the ``.pth`` hook imports :mod:`.registration` in every Python process.
"""

"""The sweep's configuration: the S3PRL path's config.yaml, checked for what stacked runs can reproduce exactly.

Everything comes from the same config.yaml the S3PRL path reads (``runner``: steps, clipping,
accumulation, evaluation schedule; ``datarc``: batch size, votes, smoothing, test stimuli;
``evalrc``: dev-best rule and bootstrap; ``modelrc``: the head; ``optimizer``), with ``-o``
overrides parsed by S3PRL itself. What the cache path cannot reproduce is refused, naming the S3PRL
path as the way out: a head that is not linear after mean pooling, mixed precision, specaug, and
optimizers that are not element-wise (only for those does updating a stacked tensor equal updating
each run's slice alone).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional

from s3prl_stimulus.errors import StimulusError

ELEMENTWISE_TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta")
ELEMENTWISE_S3PRL_OPTIMIZERS = ("Adam", "AdamW")
S3PRL_PATH = "train it through S3PRL instead: python -m s3prl_stimulus.run_downstream -m train -d emotion_stimulus ..."


def load_config(path=None, override: Optional[str] = None) -> dict:
    """The S3PRL path's config (default: the packaged config.yaml) with ``-o`` overrides applied as S3PRL does."""
    import yaml

    from s3prl_stimulus.integration.launcher import packaged_config

    path = Path(path) if path else packaged_config()
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise StimulusError(f"cannot read config {path} ({err}): pass a config.yaml of the emotion_stimulus downstream") from None
    if override:
        config = apply_override(config, override)
    return config


def apply_override(config: dict, override: str) -> dict:
    """``config.a.b=V,,config.c=W`` with S3PRL's own parser (values ``eval``-ed, else kept as strings)."""
    from s3prl.utility.helper import override as s3prl_override

    config = copy.deepcopy(config)
    args = argparse.Namespace()
    for option in override.split(",,"):
        if option.strip() and not option.strip().startswith("config."):
            raise StimulusError(f"override {option.strip()!r}: the sweep takes config.* overrides only "
                                "(seeds, folds, stimuli and device are its own options)")
        if option.strip().count("=") != 1:
            raise StimulusError(f"override {option.strip()!r} must look like config.a.b=VALUE (one '=')")
    s3prl_override(override, args, config)
    return config


def check_linear_head(modelrc: dict) -> int:
    """The projector width, after checking the head is linear after pooling (else: use the S3PRL path)."""
    select = modelrc.get("select")
    options = dict(modelrc.get(select) or {}) if select else {}
    post_net = options.get("post_net") or {"select": "FrameLevel"}
    reasons = []
    if select != "UtteranceLevel":
        reasons.append(f"modelrc.select={select}")
    if options.get("pooling", "MeanPooling") != "MeanPooling":
        reasons.append(f"pooling={options.get('pooling')}")
    if options.get("pre_net"):
        reasons.append("a pre_net")
    if post_net.get("select") != "FrameLevel" or (post_net.get("FrameLevel") or {}).get("hiddens"):
        reasons.append(f"post_net={post_net}")
    if reasons:
        raise StimulusError(f"the head ({', '.join(reasons)}) is not linear after mean pooling, so clip means do not "
                            f"determine its output and the cache path cannot train it: {S3PRL_PATH}")
    if "projector_dim" not in modelrc:
        raise StimulusError("modelrc.projector_dim is missing (paper: 256)")
    return int(modelrc["projector_dim"])


def check_runner(config: dict) -> dict:
    """The runner settings the sweep reproduces; refuses those it cannot reproduce exactly."""
    runner = dict(config.get("runner") or {})
    needed = ("total_steps", "gradient_clipping", "gradient_accumulate_steps", "eval_step", "eval_dataloaders")
    missing = [k for k in needed if k not in runner]
    if missing:
        raise StimulusError(f"config runner section lacks {', '.join(missing)}: start from the packaged config.yaml")
    if runner.get("fp16"):
        raise StimulusError(f"runner.fp16 (mixed precision) is not reproduced by the cache path: set it false, or {S3PRL_PATH}")
    if config.get("specaug"):
        raise StimulusError(f"specaug changes frames during training, which clip means cannot express: {S3PRL_PATH}")
    for key in ("total_steps", "eval_step", "gradient_accumulate_steps"):
        if not isinstance(runner[key], int) or runner[key] < 1:
            raise StimulusError(f"runner.{key}={runner[key]!r} must be a positive integer")
    if runner["eval_step"] > runner["total_steps"]:
        raise StimulusError(f"runner.eval_step={runner['eval_step']} > total_steps={runner['total_steps']}: no dev "
                            "evaluation would choose dev-best; lower eval_step")
    if "dev" not in runner["eval_dataloaders"]:
        raise StimulusError("runner.eval_dataloaders lacks dev: dev-best is chosen on dev; keep [dev, test]")
    check_optimizer(config.get("optimizer") or {})
    return runner


def check_optimizer(optimizer: dict) -> None:
    name = optimizer.get("name")
    if name == "TorchOptim":
        ok = optimizer.get("torch_optim_name") in ELEMENTWISE_TORCH_OPTIMIZERS
    else:
        ok = name in ELEMENTWISE_S3PRL_OPTIMIZERS
    if not ok:
        shown = optimizer.get("torch_optim_name", name)
        raise StimulusError(f"optimizer {shown!r} is not element-wise (or unknown), so runs stacked in one tensor would "
                            f"not update as they do alone; use AdamW/Adam/SGD/..., or {S3PRL_PATH}")

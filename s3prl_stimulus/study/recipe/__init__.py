"""The paper's study as one resumable recipe: train every (upstream, train stimulus, fold, seed), cross-test it.

``recipes/run_paper.sh`` runs this package for its stage 2 (train) and stage 3 (cross-test evaluation)::

    python -m s3prl_stimulus.study.recipe train    --path s3prl|cache --root EXP --corpus AudioWAV [options]
    python -m s3prl_stimulus.study.recipe evaluate --path s3prl|cache --root EXP --corpus AudioWAV [options]
    python -m s3prl_stimulus.study.recipe status | preflight [same options]
    python -m s3prl_stimulus.study.recipe task --plan PLAN.json --index I      (one SLURM array task)

Every run owns ``<root>/<path>/<upstream>/<train_stimulus>/fold<k>/seed<s>/`` (docs/design.md). Its state is
read from the files there, never remembered, so any stage can be rerun, interrupted and rerun again:

- **finished**: ``results-test-dev-best.json`` is valid JSON of the results schema, written for this very
  run (path, upstream, train stimulus, fold, seed), beside its predictions CSV. Every stage skips it.
- **trained** (S3PRL path): ``recipe-train.done``, written here once S3PRL exited 0 and left
  ``dev-best.ckpt``. Stage 2 skips it; stage 3 evaluates ``dev-best.ckpt`` on every label set.
- **interrupted** (S3PRL path): ``states-*.ckpt`` without the marker: stage 2 resumes it with S3PRL's ``-a``.
- **new**: trained from scratch.

The S3PRL path runs one ``run_downstream`` process per run and step; the cache path runs one job per
upstream (``extract``, which resumes by itself, then ``sweep`` over the runs not finished yet). Each job
appends to its own log file; a failing job is reported with its log and the recipe carries on, then
exits 1 with the list of failures.

One concern per module; each imports only the ones listed before it:

- :mod:`.settings`: the upstream list (``NAME``, ``NAME:CKPT``, ``LABEL=NAME:CKPT``), the grid's checked
  :class:`Settings` and the paper's defaults.
- :mod:`.plan`: the grid's runs, their directories and states, and the command lines that train, evaluate,
  extract and sweep them.
- :mod:`.local`: a job's commands run into its log, and the local launcher (one job at a time, or one per GPU).
- :mod:`.stages`: the jobs stage 2 (train) and stage 3 (evaluate) still have to run, read from the run directories.
- :mod:`.weights`: the preflight, whether each upstream's weights can be had here before any job needs them.
- :mod:`.slurm`: the SLURM launcher: plan file, array script, ``sbatch --wait``, and one array task.
- :mod:`.driver`: :func:`run_stage`, one stage end to end: preflight, launcher (or a dry run), summary, exit status.
- :mod:`.cli`: the command line (:func:`main`; ``__main__`` runs it).
"""

from s3prl_stimulus.study.recipe.settings import (
    DATARC, DEFAULT_SEEDS, PAPER_UPSTREAMS, PATHS, RECIPE_OWNED_OPTIONS, Settings, Upstream, check_override,
    check_seeds, check_stimuli, make_settings, override_value, parse_upstream, read_upstreams, split_list,
)
from s3prl_stimulus.study.recipe.plan import (
    DEV_BEST, DOWNSTREAM, FINISHED, INTERRUPTED, NEW, PREDICTIONS_FILE, RESULTS_FILE, STATES_GLOB, TRAINED,
    TRAINED_MARKER, Run, extract_command, is_finished, plan_runs, product_groups, run_dir, run_state,
    s3prl_evaluate_command, s3prl_overrides, s3prl_train_command, status_table, sweep_command, upstream_dir,
)
from s3prl_stimulus.study.recipe.local import Job, Outcome, execute, gpu_environment, last_line, parse_gpus, run_local
from s3prl_stimulus.study.recipe.stages import (
    STAGES, Work, cache_job, evaluate_work, jobs_for, s3prl_evaluate_job, s3prl_train_job, train_work,
)
from s3prl_stimulus.study.recipe.weights import (
    CONNECT_TIMEOUT_S, FEATURE_UPSTREAMS, Preflight, preflight, preflight_blocks, reachable, weights_of,
)
from s3prl_stimulus.study.recipe.slurm import (
    PLAN_SCHEMA, SlurmOptions, run_task, slurm_script, submit_slurm, write_plan,
)
from s3prl_stimulus.study.recipe.driver import print_commands, run_stage, summarise
from s3prl_stimulus.study.recipe.cli import build_parser, main

__all__ = [
    "DATARC", "DEFAULT_SEEDS", "PAPER_UPSTREAMS", "PATHS", "RECIPE_OWNED_OPTIONS", "Settings", "Upstream",
    "check_override", "check_seeds", "check_stimuli", "make_settings", "override_value", "parse_upstream",
    "read_upstreams", "split_list", "DEV_BEST", "DOWNSTREAM", "FINISHED", "INTERRUPTED", "NEW", "PREDICTIONS_FILE",
    "RESULTS_FILE", "STATES_GLOB", "TRAINED", "TRAINED_MARKER", "Run", "extract_command", "is_finished", "plan_runs",
    "product_groups", "run_dir", "run_state", "s3prl_evaluate_command", "s3prl_overrides", "s3prl_train_command",
    "status_table", "sweep_command", "upstream_dir", "Job", "Outcome", "execute", "gpu_environment", "last_line",
    "parse_gpus", "run_local", "STAGES", "Work", "cache_job", "evaluate_work", "jobs_for", "s3prl_evaluate_job",
    "s3prl_train_job", "train_work", "CONNECT_TIMEOUT_S", "FEATURE_UPSTREAMS", "Preflight", "preflight",
    "preflight_blocks", "reachable", "weights_of", "PLAN_SCHEMA", "SlurmOptions", "run_task", "slurm_script",
    "submit_slurm", "write_plan", "print_commands", "run_stage", "summarise", "build_parser", "main",
]

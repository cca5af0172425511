"""The stimulus x fold grid: S3PRL path vs feature cache (extract + sweep), wall time side by side.

Both paths run as a user runs them, each in its own process (interpreter start-up and imports
included): the S3PRL path is ``python -m s3prl_stimulus.run_downstream -m train`` once per
(train stimulus, fold); the cache path is one ``s3prl-stimulus extract`` (one cache per fold's
normalisation) and one ``s3prl-stimulus sweep`` training all 4 x 5 runs together. Corpora are
generated with CREMA-D's real clip names and lengths (``s3prl_stimulus.testing.make_corpus``).

Profiles:

- ``cpu`` (default): tiny random-weight WavLM (2 layers, dim 32), 60 clips per speaker block
  (300 clips), ``--steps`` shortened (default 300, eval every 100). Extraction is timed twice: with
  ``--per-fold`` (5 caches) and as by default (the fold-normalisation invariance test, then one cache
  for the five folds when it holds: issue 13). The S3PRL path is measured for
  ``--s3prl-runs`` of the 20 runs (default 2) and projected linearly to 20 (every run has the same
  size); ``--s3prl-runs 20`` measures the whole grid. Target: ratio >= 50x.
- ``gpu``: random-weight WavLM-Large-shaped upstream (24 layers, dim 1024, 512-channel conv:
  25 hidden states x 1024), all 7,442 clips, the paper's 15,510 steps. Extraction is timed in fp32
  and bf16 (clips/s), then the full 20-run sweep; the S3PRL path's cost is projected from three
  short runs of the same upstream (start-up, time per training step, time per dev+test evaluation):
  20 x (start-up + 15,510 steps + 110 evaluations). The five folds are also extracted in fp32 by
  default (invariance test, then one shared cache when it holds), which the sweep then uses; bf16
  changes the features by more than the test's tolerance, so bf16 falls back to one cache per fold.
  Targets (one H100): extraction >= 500 clips/s
  in bf16, extract + sweep <= 5 min, >= 200x less GPU time than the S3PRL path.
  ``--small`` shrinks it to CPU/CI size (2-layer dim-64 upstream, 100 clips, short runs).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_grid.py                 # CPU ratio
    python benchmarks/bench_grid.py --profile gpu --device cuda       # the GPU table (see gpu_grid.sh)
    python benchmarks/bench_grid.py --profile gpu --small --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID_STIMULI = ("voice", "face", "av", "all")
GRID_FOLDS = (1, 2, 3, 4, 5)
PAPER_STEPS, PAPER_EVAL_STEP = 15510, 141
DATARC = "config.downstream_expert.datarc"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--small", action="store_true", help="gpu profile at CPU/CI size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, help="training steps per run (cpu default 300; gpu: the paper's 15510)")
    parser.add_argument("--eval-step", type=int, help="evaluate every N steps (cpu default 100; gpu: 141)")
    parser.add_argument("--clips-per-block", type=int, help="clips per speaker block (cpu default 60; gpu: all)")
    parser.add_argument("--s3prl-runs", type=int, default=2, help="cpu profile: S3PRL runs measured (projected to 20)")
    parser.add_argument("--num-workers", type=int, help="S3PRL data-loader workers (cpu default 1; gpu: 6, the config's)")
    parser.add_argument("--work", help="working directory (default: a temporary one, deleted)")
    parser.add_argument("--json", help="also write the measurements here")
    return parser.parse_args()


# --- set-up -------------------------------------------------------------------------------------


def make_corpus(work: Path, clips_per_block) -> list:
    from s3prl_stimulus.partition import load_partition
    from s3prl_stimulus.testing import make_corpus as write, tiny_clip_subset

    clips = list(load_partition().index) if clips_per_block is None else tiny_clip_subset(clips_per_block, fold=None)
    started = time.perf_counter()
    write(work / "AudioWAV", clips)
    print(f"corpus: {len(clips)} clips with CREMA-D lengths in {time.perf_counter() - started:.1f} s", flush=True)
    return clips


def make_wavlm(path: Path, layers: int, dim: int, conv_channels: int, heads: int) -> Path:
    """A random-weight WavLM checkpoint for ``-u wavlm_local`` (Large: 24 layers, 1024, 512 conv channels, 16 heads)."""
    import torch

    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    prepare_s3prl_stack()
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    conv = f"[({conv_channels}, 10, 5)] + [({conv_channels}, 3, 2)] * 4 + [({conv_channels}, 2, 2)] * 2"
    cfg = {"extractor_mode": "layer_norm", "encoder_layers": layers, "encoder_embed_dim": dim,
           "encoder_ffn_embed_dim": 4 * dim, "encoder_attention_heads": heads, "conv_feature_layers": conv,
           "layer_norm_first": True, "normalize": True, "relative_position_embedding": True, "num_buckets": 320,
           "max_distance": 800, "gru_rel_pos": True}
    full = vars(WavLMConfig(cfg)).copy()
    torch.manual_seed(0)
    torch.save({"cfg": full, "model": WavLM(WavLMConfig(full)).state_dict()}, path)
    return path


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "cpu_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- the two paths, each in its own process --------------------------------------------------------


def timed(command: list, cwd: Path) -> float:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    run = subprocess.run([sys.executable, *map(str, command)], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"failed ({run.returncode}): {' '.join(map(str, command))}\n{run.stderr[-3000:]}")
    return elapsed


def s3prl_run(work: Path, ckpt: Path, device: str, stimulus: str, fold: int, steps: int, eval_step: int,
              num_workers: int, name: str) -> float:
    options = {
        f"{DATARC}.audio_dir": repr(str(work / "AudioWAV")), f"{DATARC}.clips": "'present'",
        f"{DATARC}.fold": fold, f"{DATARC}.train_stimulus": repr(stimulus), f"{DATARC}.num_workers": num_workers,
        "config.runner.total_steps": steps, "config.runner.eval_step": eval_step,
        "config.runner.save_step": steps, "config.runner.log_step": min(steps, 100),
    }
    override = ",,".join(f"{k}={v}" for k, v in options.items())
    return timed(["-m", "s3prl_stimulus.run_downstream", "-m", "train", "-u", "wavlm_local", "-k", ckpt,
                  "-d", "emotion_stimulus", "-p", work / "s3prl" / name, "--device", device, "-o", override], work)


def extract(work: Path, ckpt: Path, device: str, dtype: str, folds, out: str, *extra) -> float:
    return timed(["-m", "s3prl_stimulus", "extract", "--corpus", work / "AudioWAV", "-u", "wavlm_local", "-k", ckpt,
                  "--out", work / out, "--clips", "present", "--device", device, "--dtype", dtype, "--no-progress",
                  "--folds", *folds, *extra], work)


def encode_rate(work: Path, out: str, fold: str) -> float:
    """Clips/s of the upstream pass alone (audio reading included), as extract records it in complete.json."""
    complete = json.loads((work / out / "wavlm_local" / f"fold{fold}" / "complete.json").read_text())
    return complete["encoded_clips"] / complete["encode_seconds"]


def caches_made(work: Path, out: str) -> dict:
    """The caches an extract wrote: names, clips encoded, and the invariance test's record (issue 13)."""
    caches = sorted(p.parent for p in (work / out / "wavlm_local").glob("*/manifest.json"))
    records = [json.loads((c / "manifest.json").read_text()).get("invariance") for c in caches]
    record = next((r for r in records if r), {})
    encoded = sum(json.loads((c / "complete.json").read_text())["encoded_clips"] for c in caches)
    return {"caches": [c.name for c in caches], "clip_forwards": encoded + record.get("clip_forwards", 0),
            "deviation": record.get("max_relative_deviation"), "holds": bool(record.get("holds"))}


def describe_caches(made: dict) -> str:
    test = f"deviation {made['deviation']:.1e}" if made["deviation"] is not None else "no test"
    return f"{', '.join(made['caches'])} ({made['clip_forwards']} clip-forwards; {test})"


def sweep(work: Path, cache: str, device: str, steps: int, eval_step: int) -> float:
    override = f"config.runner.total_steps={steps},,config.runner.eval_step={eval_step}"
    return timed(["-m", "s3prl_stimulus", "sweep", "--cache", work / cache, "--out", work / "sweep", "--device", device,
                  "-o", override, "--no-progress"], work)


# --- profiles -----------------------------------------------------------------------------------


def cpu_profile(args, work: Path) -> dict:
    steps, eval_step = args.steps or 300, args.eval_step or 100
    clips = make_corpus(work, args.clips_per_block or 60)
    ckpt = make_wavlm(work / "wavlm.pt", layers=2, dim=32, conv_channels=32, heads=2)
    workers = 1 if args.num_workers is None else args.num_workers
    grid = [(s, k) for s in GRID_STIMULI for k in GRID_FOLDS]
    measured = []
    for stimulus, fold in grid[: args.s3prl_runs]:
        measured.append(s3prl_run(work, ckpt, args.device, stimulus, fold, steps, eval_step, workers, f"{stimulus}-{fold}"))
        print(f"S3PRL path {stimulus} fold {fold}: {measured[-1]:.1f} s", flush=True)
    s3prl_grid = sum(measured) / len(measured) * len(grid)
    folds = [str(k) for k in GRID_FOLDS]
    t_per_fold = extract(work, ckpt, args.device, "fp32", folds, "cache-per-fold", "--per-fold")
    t_extract = extract(work, ckpt, args.device, "fp32", folds, "cache")
    made, per_fold = caches_made(work, "cache"), caches_made(work, "cache-per-fold")
    print(f"extract (5 folds): {t_extract:.1f} s, {describe_caches(made)}; --per-fold {t_per_fold:.1f} s", flush=True)
    t_sweep = sweep(work, "cache", args.device, steps, eval_step)
    print(f"sweep (20 runs): {t_sweep:.1f} s", flush=True)
    cache_total = t_extract + t_sweep
    rows = [
        ("clips / steps per run / eval every", f"{len(clips)} / {steps} / {eval_step}"),
        (f"S3PRL path, {len(measured)} run(s) measured, mean per run", f"{sum(measured) / len(measured):.1f} s"),
        ("S3PRL path, 20-run grid" + (" (projected)" if len(measured) < len(grid) else ""), f"{s3prl_grid:.1f} s"),
        ("cache path: extract --per-fold (5 caches)", f"{t_per_fold:.1f} s, {per_fold['clip_forwards']} clip-forwards"),
        ("cache path: extract (invariance test, then shared cache if it holds)", f"{t_extract:.1f} s, {describe_caches(made)}"),
        ("cache path: sweep (20 runs together)", f"{t_sweep:.1f} s"),
        ("cache path total", f"{cache_total:.1f} s"),
        ("ratio S3PRL / cache (target >= 50x)", f"{s3prl_grid / cache_total:.1f}x"),
    ]
    return {"profile": "cpu", "rows": rows, "s3prl_runs": measured, "s3prl_grid_s": s3prl_grid,
            "extract_s": t_extract, "extract_per_fold_s": t_per_fold, "caches": made, "caches_per_fold": per_fold,
            "sweep_s": t_sweep, "ratio": s3prl_grid / cache_total}


def gpu_profile(args, work: Path) -> dict:
    small = args.small
    steps = args.steps or (200 if small else PAPER_STEPS)
    eval_step = args.eval_step or (50 if small else PAPER_EVAL_STEP)
    clips = make_corpus(work, args.clips_per_block or (20 if small else None))
    shape = dict(layers=2, dim=64, conv_channels=64, heads=4) if small else dict(layers=24, dim=1024, conv_channels=512, heads=16)
    ckpt = make_wavlm(work / "wavlm.pt", **shape)
    workers = (1 if small else 6) if args.num_workers is None else args.num_workers
    n = len(clips)
    t32 = extract(work, ckpt, args.device, "fp32", ["1"], "cache-fp32")
    t16 = extract(work, ckpt, args.device, "bf16", ["1"], "cache")
    rate32, rate16 = encode_rate(work, "cache-fp32", "1"), encode_rate(work, "cache", "1")
    print(f"extract fold 1: fp32 {t32:.1f} s ({rate32:.0f} clips/s encoding), bf16 {t16:.1f} s ({rate16:.0f} clips/s)", flush=True)
    t16_rest = extract(work, ckpt, args.device, "bf16", ["2", "3", "4", "5"], "cache")
    t_shared = extract(work, ckpt, args.device, "fp32", ["1", "2", "3", "4", "5"], "cache-shared")
    made, bf16_made = caches_made(work, "cache-shared"), caches_made(work, "cache")
    print(f"extract folds 2-5 (bf16): {t16_rest:.1f} s, {describe_caches(bf16_made)}; folds 1-5 fp32 with the "
          f"invariance shortcut: {t_shared:.1f} s, {describe_caches(made)}", flush=True)
    sweep_cache = "cache-shared" if made["holds"] else "cache"
    t_sweep = sweep(work, sweep_cache, args.device, steps, eval_step)
    print(f"sweep (20 runs, {steps} steps) on {sweep_cache}: {t_sweep:.1f} s", flush=True)
    # S3PRL path: start-up + step time + evaluation time from three short runs of the same upstream
    short = 20 if small else 100
    no_eval = s3prl_run(work, ckpt, args.device, "voice", 1, short, 10 * short, workers, "a")
    longer = s3prl_run(work, ckpt, args.device, "voice", 1, 2 * short, 10 * short, workers, "b")
    with_eval = s3prl_run(work, ckpt, args.device, "voice", 1, short, short, workers, "c")
    per_step = (longer - no_eval) / short
    startup = max(no_eval - short * per_step, 0.0)
    per_eval = max(with_eval - no_eval, 0.0)
    evaluations = steps // eval_step
    s3prl_run_s = startup + steps * per_step + evaluations * per_eval
    s3prl_grid = 20 * s3prl_run_s
    extract_total = t_shared if made["holds"] else t16 + t16_rest
    cache_total = extract_total + t_sweep
    rows = [
        ("clips / steps per run / eval every", f"{n} / {steps} / {eval_step}"),
        ("extract 1 fold fp32: encoding / end to end (start-up, stats, hashing)", f"{rate32:.0f} / {n / t32:.0f} clips/s ({t32:.1f} s)"),
        ("extract 1 fold bf16: encoding / end to end (start-up, stats, hashing)", f"{rate16:.0f} / {n / t16:.0f} clips/s ({t16:.1f} s)"),
        ("extract 5 folds bf16 (folds 2-5: invariance test, then per fold if it fails)", f"{t16 + t16_rest:.1f} s: {describe_caches(bf16_made)}"),
        ("extract 5 folds fp32, invariance shortcut", f"{t_shared:.1f} s: {describe_caches(made)}"),
        (f"sweep, 20 runs x {steps} steps ({sweep_cache})", f"{t_sweep:.1f} s"),
        ("cache path total (shared fp32 extract if the test held, else bf16 per fold; + sweep)", f"{cache_total:.1f} s"),
        ("S3PRL path: start-up / step (batch 32) / dev+test evaluation", f"{startup:.1f} s / {per_step:.3f} s / {per_eval:.1f} s"),
        (f"S3PRL path, 20 runs x ({steps} steps + {evaluations} evaluations), projected", f"{s3prl_grid / 3600:.2f} h"),
        ("ratio S3PRL / cache (target >= 200x)", f"{s3prl_grid / cache_total:.0f}x"),
    ]
    return {"profile": "gpu-small" if small else "gpu", "rows": rows, "extract_fp32_s": t32, "extract_bf16_s": t16,
            "encode_fp32_clips_per_s": rate32, "encode_bf16_clips_per_s": rate16,
            "extract_bf16_rest_s": t16_rest, "extract_shared_fp32_s": t_shared, "caches_shared": made,
            "caches_bf16": bf16_made, "sweep_s": t_sweep, "s3prl_startup_s": startup, "s3prl_step_s": per_step,
            "s3prl_eval_s": per_eval, "s3prl_grid_s": s3prl_grid, "ratio": s3prl_grid / cache_total}


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_grid_") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = cpu_profile(args, work) if args.profile == "cpu" else gpu_profile(args, work)
    result["environment"] = environment(args.device)
    width = max(len(k) for k, _ in result["rows"])
    print(f"\nbench_grid ({result['profile']}, {result['environment']})")
    for key, value in result["rows"]:
        print(f"  {key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

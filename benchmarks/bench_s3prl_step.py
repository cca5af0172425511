"""Time per S3PRL training step spent in the emotion_stimulus expert vs the whole step (`-u fbank`, CPU).

Runs S3PRL's own runner through the launcher on a generated corpus (real CREMA-D names and lengths,
batch 32 as in the paper), with timers attached to the runner's upstream, featurizer and downstream:

- a step is the time between two consecutive upstream calls (so it includes loading the next batch,
  the forward passes, backward, clipping, the optimizer step and logging);
- upstream = fbank feature extraction + S3PRL's featurizer;
- expert = step − upstream: data loading (soundfile read + normalisation + collate), the head's
  forward and backward, the loss, the optimizer step over the head, log_records.
  With ``--num-workers 0`` (default) data loading runs in the training process and is counted
  in full; the paper's config uses 6 workers, which hides most of it.

Target: expert < 10 % of the step. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_s3prl_step.py [--steps 20] [--num-workers 0] [--threads 1] [--no-pool-first]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="train batch size (paper: 32)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clips-per-split", type=int, default=64)
    parser.add_argument("--no-pool-first", action="store_true",
                        help="modelrc.pool_first=False: project every frame (S3PRL's order) to see what pooling first saves")
    return parser.parse_args()


class StepClock:
    """Timestamps of upstream calls, time inside upstream + featurizer, and inside the expert's forward.

    ``clock``: ``time.thread_time`` (CPU time of the training thread) when all the work runs in that
    one thread (``--threads 1 --num-workers 0``), which makes the ratio robust to other processes
    sharing the machine; wall time (``time.perf_counter``) otherwise.
    """

    def __init__(self, clock):
        self.now = clock
        self.step_starts, self.inside, self.head, self.loading, self._entered = [], [], [], [], {}

    def attach(self, runner):
        runner.upstream.model.register_forward_pre_hook(self._start)
        runner.featurizer.model.register_forward_hook(self._stop)
        runner.downstream.model.register_forward_pre_hook(lambda m, i: self._entered.update(head=self.now()))
        runner.downstream.model.register_forward_hook(lambda m, i, o: self.head.append(self.now() - self._entered["head"]))

    def timed_loader(self, loader):
        """Wrap a DataLoader so the time spent fetching each batch is recorded."""
        clock = self

        class Timed:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                iterator = iter(loader)
                while True:
                    start = clock.now()
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                    clock.loading.append(clock.now() - start)
                    yield batch

        return Timed()

    def _start(self, module, inputs):
        self._entered["upstream"] = self.now()
        self.step_starts.append(self._entered["upstream"])

    def _stop(self, module, inputs, output):
        self.inside.append(self.now() - self._entered["upstream"])


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from s3prl_stimulus.integration import launcher as run_downstream
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack
    from s3prl_stimulus.testing import make_corpus, tiny_clip_subset

    prepare_s3prl_stack()
    import s3prl.downstream.runner as runner_module

    single_thread = args.threads == 1 and args.num_workers == 0
    clock = StepClock(time.thread_time if single_thread else time.perf_counter)
    original_init = runner_module.Runner.__init__

    def init_with_clock(self, *a, **k):
        original_init(self, *a, **k)
        clock.attach(self)

    runner_module.Runner.__init__ = init_with_clock
    from s3prl_stimulus.downstream.emotion_stimulus.expert import DownstreamExpert

    original_loader = DownstreamExpert.get_dataloader
    DownstreamExpert.get_dataloader = lambda self, *a, **k: clock.timed_loader(original_loader(self, *a, **k))

    with tempfile.TemporaryDirectory(prefix="bench_s3prl_") as tmp:
        corpus = Path(tmp) / "AudioWAV"
        make_corpus(corpus, tiny_clip_subset(args.clips_per_split, fold=1))  # real CREMA-D lengths
        total = args.warmup + args.steps + 1  # +1: the last measured step needs the next step's start
        datarc = "config.downstream_expert.datarc"
        overrides = ",,".join([
            f"{datarc}.audio_dir={str(corpus)!r}", f"{datarc}.clips='present'",
            f"{datarc}.num_workers={args.num_workers}", f"{datarc}.train_batch_size={args.batch}",
            f"config.downstream_expert.modelrc.pool_first={not args.no_pool_first}",
            f"config.runner.total_steps={total}", f"config.runner.log_step={total}",
            # no evaluation or checkpoint inside the measured window: they are not per-step costs
            f"config.runner.eval_step={10 * total}", f"config.runner.save_step={10 * total}",
        ])
        argv = ["-m", "train", "-u", "fbank", "-d", "emotion_stimulus", "-p", str(Path(tmp) / "exp"),
                "--device", "cpu", "-o", overrides]
        run_downstream.main(argv)

    window = slice(args.warmup, args.warmup + args.steps)
    starts = clock.step_starts
    steps = [starts[i + 1] - starts[i] for i in range(window.start, window.stop)]
    upstream, head = clock.inside[window], clock.head[window]
    loading = clock.loading[window.start + 1: window.stop + 1]  # step i ends with fetching batch i + 1
    expert = [s - u for s, u in zip(steps, upstream)]
    # Means over the window: per-step medians of a difference are not the difference of medians.
    step_ms, upstream_ms, expert_ms, head_ms, loading_ms = (
        1000 * sum(x) / len(x) for x in (steps, upstream, expert, head, loading))
    share = expert_ms / step_ms
    print(f"\nfbank on CPU, batch {args.batch}, {args.threads} thread(s), num_workers {args.num_workers}, "
          f"pool_first {not args.no_pool_first}, {'CPU time of the training thread' if single_thread else 'wall time'}, "
          f"mean of {args.steps} steps (median step {1000 * statistics.median(steps):.1f} ms):")
    print(f"  whole step                 {step_ms:8.1f} ms")
    print(f"  upstream + featurizer      {upstream_ms:8.1f} ms")
    print(f"  expert, all the rest       {expert_ms:8.1f} ms")
    print(f"    data loading             {loading_ms:8.1f} ms")
    print(f"    head forward             {head_ms:8.1f} ms")
    print(f"    backward, optimizer, runner {expert_ms - loading_ms - head_ms:5.1f} ms")
    print(f"  expert / step              {100 * share:8.1f} %   (target < 10 %: {'met' if share < 0.10 else 'NOT met'})")
    if args.num_workers == 0:
        # With DataLoader workers (the paper's config: 6) loading leaves the training process.
        rest = (expert_ms - loading_ms) / (step_ms - loading_ms)
        print(f"  expert / step without data loading {100 * rest:.1f} %   (what the training process pays with workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

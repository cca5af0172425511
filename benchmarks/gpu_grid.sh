#!/usr/bin/env bash
# The GPU table of benchmarks/README.md: feature cache (extract + sweep) vs the S3PRL path, one GPU.
#
#   bash benchmarks/gpu_grid.sh           # GPU: WavLM-Large-shaped random upstream (25 x 1024), 7,442 clips
#                                         #      with CREMA-D's lengths, the paper's 15,510 steps
#
# Since issue 13 it also extracts the five folds in fp32 with the fold-invariance shortcut (one cache when
# the test holds; bf16 fails it and stays per fold) and sweeps that cache with the grouped step.
#   bash benchmarks/gpu_grid.sh --small   # CPU, CI-sized (a couple of minutes): same script, tiny sizes
#
# Run from anywhere; it works in the repository root. Nothing is downloaded: on a machine without the
# S3PRL stack, carry wheels in .whl/ (s3prl 0.4.18 built with `pip wheel --no-deps`, omegaconf,
# antlr4-python3-runtime, tensorboardX, huggingface_hub<1, transformers<5 with its tokenizers,
# soundfile, ...; see the device README) and they are installed into /tmp/site with --no-index.
# Output: the table on stdout, and gpu_grid.json + gpu_grid.log in $OUT (or /tmp/gpu_grid/).
set -euo pipefail
cd "$(dirname "$0")/.."

small=0
for arg in "$@"; do
  case "$arg" in
    --small) small=1 ;;
    *) echo "usage: bash benchmarks/gpu_grid.sh [--small]" >&2; exit 2 ;;
  esac
done

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

out_dir="${OUT:-/tmp/gpu_grid}"
mkdir -p "$out_dir"
if (( small )); then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  args=(--profile gpu --small --device cpu)
else
  args=(--profile gpu --device cuda)
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: run with --small on CPU')"
fi
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
PYTHONUNBUFFERED=1 python3 benchmarks/bench_grid.py "${args[@]}" --json "$out_dir/gpu_grid.json" 2>&1 | tee "$out_dir/gpu_grid.log"

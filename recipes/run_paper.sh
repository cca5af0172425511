#!/usr/bin/env bash
# Stimulus Modality Matters (ICASSP 2025), the whole study: from a bare machine to Tables II-IV and Fig. 2.
#
#   stage 0  download CREMA-D's AudioWAV clips and verify them
#   stage 1  label files per stimulus and fold; agreement between the label sets (Table II)
#   stage 2  train every (upstream, train stimulus, fold, seed): S3PRL path or feature-cache path
#            (--path authors: import the paper authors' released models from --authors instead)
#   stage 3  cross-test every dev-best checkpoint on every label set
#   stage 4  report: tables and figures
#
# Every stage can be rerun: finished work is skipped, interrupted training resumes, failed runs are
# logged and listed at the end (exit status 1). Usage and options: docs/recipes.md, or --help.
#
#   recipes/run_paper.sh --corpus data/CREMA-D/AudioWAV --expdir exp/stimulus --ngpu 4
#   recipes/run_paper.sh --path cache --stage 2 --upstreams "fbank,wavlm_large"
#   recipes/run_paper.sh --launcher slurm --slurm_args "--partition=gpu --time=12:00:00" --ngpu 1
set -euo pipefail

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---- options (each can be given as --name VALUE or --name=VALUE) ------------------------------
stage=0                # first stage to run
stop_stage=4           # last stage to run
path=s3prl             # s3prl: S3PRL's run_downstream per run | cache: extract + sweep per upstream | authors: the authors' models
authors=""             # --path authors: the folder their zip unpacks to (<upstream>_<corpus>_fold<N>_multimodal folders)
expdir=exp/stimulus    # expdir root: runs go to <expdir>/<path>/<upstream>/<stimulus>/fold<k>/seed<s>/
corpus=data/CREMA-D/AudioWAV   # CREMA-D AudioWAV directory (stage 0 downloads into it)
upstreams="${recipe_dir}/upstreams.txt"   # list file, or comma-separated NAME[:CKPT] entries
stimuli="voice,face,av,all"    # training label sets
folds="1,2,3,4,5"      # EMO-SUPERB folds
seeds="1337"           # S3PRL's default seed; several seeds give mean +- std over seeds
votes=paper            # paper | crema-d | FILE
clips=all              # all | present | FILE: clips to train and test on (datarc.clips)
override=""            # extra S3PRL -o options, e.g. "config.runner.total_steps=2000,,config.optimizer.lr=1e-3"
features=""            # cache path: feature caches (default <expdir>/features)
device=""              # cpu | cuda (default: cuda when available)
launcher=local         # local | slurm
ngpu=0                 # local: one job per GPU over GPUs 0..ngpu-1 (0: one job at a time); slurm: a GPU per task
gpu_ids=""             # local: these GPU indices instead, e.g. 0,2,3
slurm_args=""          # extra #SBATCH options, e.g. "--partition=gpu --time=24:00:00 --mem=32G"
slurm_max_parallel=""  # at most this many array tasks at once
submit=true            # slurm: submit with sbatch --wait (true) or only write the array script (false)
preflight=true         # check that every upstream's weights can be had before training
base_url=""            # stage 0: another server or mirror of CREMA-D's AudioWAV (default: CREMA-D's Git LFS media)
manifest=""            # stage 0: a clip,bytes,sha256 manifest instead of the packaged one (mirrors, tests)
download_workers=8     # stage 0: parallel transfers
report_args=""         # stage 4: extra options of `s3prl-stimulus report`, e.g. "--upstream wavlm_large"
python=python          # the Python that has s3prl-stimulus installed
dry_run=false          # print every command, run nothing

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    echo "Options (default):"
    sed -n '/^# ---- options/,/^# ---- end of options/p' "${BASH_SOURCE[0]}" | grep -E '^[a-z_]+=' |
        sed -E 's/^([a-z_]+)=("[^"]*"|[^ ]*) *#? ?(.*)$/  --\1 (\2)  \3/; s/[$][{]recipe_dir[}]/recipes/'
}
# ---- end of options

die() { echo "run_paper.sh: $*" >&2; exit 2; }
known_options=$(sed -n '/^# ---- options/,/^# ---- end of options/p' "${BASH_SOURCE[0]}" | grep -oE '^[a-z_]+=' | tr -d '=')
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --*=*) name=${1%%=*}; value=${1#*=}; shift ;;
        --*) [ $# -ge 2 ] || die "option $1 needs a value (see --help)"; name=$1; value=$2; shift 2 ;;
        *) die "unexpected argument '$1': options are --name VALUE (see --help)" ;;
    esac
    name=${name#--}; name=${name//-/_}
    grep -qx -- "${name}" <<< "${known_options}" || die "unknown option --${name} (see --help)"
    printf -v "${name}" '%s' "${value}"
done
case "${path}" in s3prl|cache|authors) ;; *) die "--path ${path}: choose s3prl, cache or authors" ;; esac
case "${dry_run}" in true|false) ;; *) die "--dry_run ${dry_run}: true or false" ;; esac
for flag in submit preflight; do
    case "${!flag}" in true|false) ;; *) die "--${flag} ${!flag}: true or false" ;; esac
done
# Numbers are checked here: bash's `[ x -le 0 ]` only prints an error and is false, so a bad --stage
# would otherwise run no stage at all and exit 0.
is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
for flag in stage stop_stage; do
    { is_count "${!flag}" && [ "${!flag}" -le 4 ]; } || die "--${flag} ${!flag}: give a stage number from 0 to 4"
done
[ "${stop_stage}" -ge "${stage}" ] || die "--stop_stage ${stop_stage} comes before --stage ${stage}: no stage would run"
is_count "${ngpu}" || die "--ngpu ${ngpu}: give a number of GPUs (0: one job at a time)"
{ is_count "${download_workers}" && [ "${download_workers}" -ge 1 ]; } || die "--download_workers ${download_workers}: give a number >= 1"
# A votes file is named by its absolute path in every run's results (the report selects runs by it).
[ -f "${votes}" ] && votes=$(realpath "${votes}")

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (run_paper.sh) $*"; }
# Run a command, or print it under --dry_run true.
run() {
    if [ "${dry_run}" = true ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Options shared by stages 2 and 3 (s3prl_stimulus/study/recipe/).
recipe_options=(--path "${path}" --root "${expdir}" --corpus "${corpus}" --upstreams "${upstreams}"
                --stimuli "${stimuli}" --folds "${folds}" --seeds "${seeds}" --votes "${votes}" --clips "${clips}"
                --override "${override}" --python "$(command -v "${python}" || echo "${python}")")
[ -n "${features}" ] && recipe_options+=(--features "${features}")
[ -n "${authors}" ] && recipe_options+=(--authors "${authors}")
[ -n "${device}" ] && recipe_options+=(--device "${device}")
launch_options=(--launcher "${launcher}" --ngpu "${ngpu}" --submit "${submit}" --preflight "${preflight}"
                --slurm_args "${slurm_args}")
[ -n "${gpu_ids}" ] && launch_options+=(--gpu_ids "${gpu_ids}")
[ -n "${slurm_max_parallel}" ] && launch_options+=(--slurm_max_parallel "${slurm_max_parallel}")
[ "${dry_run}" = true ] && launch_options+=(--dry_run)
failed_stages=()

if [ "${stage}" -le 0 ] && [ "${stop_stage}" -ge 0 ]; then
    log "Stage 0: download CREMA-D's AudioWAV clips to ${corpus} and verify them"
    corpus_options=()
    [ -n "${manifest}" ] && corpus_options+=(--manifest "${manifest}")
    download_options=(--workers "${download_workers}")  # a bar on a terminal, progress lines in logs
    [ -n "${base_url}" ] && download_options+=(--base-url "${base_url}")
    run "${python}" -m s3prl_stimulus download --to "${corpus}" "${download_options[@]}" "${corpus_options[@]}"
    run "${python}" -m s3prl_stimulus verify --corpus "${corpus}" "${corpus_options[@]}"
fi

if [ "${stage}" -le 1 ] && [ "${stop_stage}" -ge 1 ]; then
    log "Stage 1: label files and agreement between label sets (Table II), votes: ${votes}"
    [ "${dry_run}" = true ] || mkdir -p "${expdir}"
    run "${python}" -m s3prl_stimulus labels --out "${expdir}/labels" --votes "${votes}"
    if [ "${dry_run}" = true ]; then
        run "${python}" -m s3prl_stimulus agreement --votes "${votes}" --format markdown
    else
        # Written under a temporary name, then renamed: never a half-written table.
        "${python}" -m s3prl_stimulus agreement --votes "${votes}" --format markdown > "${expdir}/table2_agreement.md.tmp"
        mv "${expdir}/table2_agreement.md.tmp" "${expdir}/table2_agreement.md"
        cat "${expdir}/table2_agreement.md"
    fi
fi

if [ "${stage}" -le 2 ] && [ "${stop_stage}" -ge 2 ]; then
    log "Stage 2: train every (upstream, train stimulus, fold, seed) on the ${path} path"
    "${python}" -m s3prl_stimulus.study.recipe train "${recipe_options[@]}" "${launch_options[@]}" || failed_stages+=(2)
fi

if [ "${stage}" -le 3 ] && [ "${stop_stage}" -ge 3 ]; then
    log "Stage 3: cross-test every dev-best checkpoint on every label set"
    "${python}" -m s3prl_stimulus.study.recipe evaluate "${recipe_options[@]}" "${launch_options[@]}" || failed_stages+=(3)
fi

if [ "${stage}" -le 4 ] && [ "${stop_stage}" -ge 4 ]; then
    log "Stage 4: report of ${expdir}/${path} in ${expdir}/report_${path}"
    # shellcheck disable=SC2086  # report_args is a list of options
    run "${python}" -m s3prl_stimulus report "${expdir}/${path}" --out "${expdir}/report_${path}" \
        --votes "${votes}" ${report_args} || failed_stages+=(4)
fi

if [ ${#failed_stages[@]} -gt 0 ]; then
    log "finished with failures in stage(s) ${failed_stages[*]}: see the FAILED/MISSING lines above; rerun to retry"
    exit 1
fi
log "finished"

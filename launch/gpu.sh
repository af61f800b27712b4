#!/usr/bin/env bash
# Train on every GPU of one host: one process, the batch split over the GPUs by jax.jit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${HERE}/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu.sh --config=CONFIG --workdir=DIR [--gpus=0,1,...] [--cuda=12] [--install]
                     [--dry-run] [-- EXTRA hml_jax.main FLAGS]

Runs `python -m hml_jax.main` on the GPUs of this host (all of them, or --gpus). The batch size
must be a multiple of the number of GPUs. Run it again with the same workdir to resume.
  --install   create .venv, install requirements.txt and jax[cudaCUDA]
  --dry-run   print the commands instead of running them
USAGE
}

CONFIG=""
WORKDIR=""
GPUS=""
CUDA=12
INSTALL=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --cuda=*) CUDA="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done
[[ -n "${CONFIG}" ]] || die "--config is required"
[[ -n "${WORKDIR}" ]] || die "--workdir is required"

cd "${HERE}/.."
if [[ "${INSTALL}" -eq 1 ]]; then
  run python3 -m venv .venv
  run .venv/bin/pip install -r requirements.txt "jax[cuda${CUDA}]"
fi
ENVIRONMENT=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.9)
if [[ -n "${GPUS}" ]]; then
  ENVIRONMENT+=("CUDA_VISIBLE_DEVICES=${GPUS}")
fi
run env "${ENVIRONMENT[@]}" .venv/bin/python -m hml_jax.main "--config=${CONFIG}" \
  "--workdir=${WORKDIR}" ${EXTRA[@]+"${EXTRA[@]}"}

#!/usr/bin/env bash
# Train on this machine (CPU or its accelerators): the same command every launcher runs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${HERE}/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [--config=configs/default.py] [--workdir=runs/local] [--install]
                       [--dry-run] [-- EXTRA hml_jax.main FLAGS]

Runs `python -m hml_jax.main --config=CONFIG --workdir=WORKDIR EXTRA...` from the repository root
in its .venv, with tcmalloc preloaded when it is installed (apt install libtcmalloc-minimal4;
HML_TCMALLOC=PATH picks one, HML_TCMALLOC=none turns it off). Run it again with the same
workdir to resume.
  --install   create .venv and install requirements.txt first
  --dry-run   print the commands instead of running them
USAGE
}

CONFIG=configs/default.py
WORKDIR=runs/local
INSTALL=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

cd "${HERE}/.."
if [[ "${INSTALL}" -eq 1 ]]; then
  run python3 -m venv .venv
  run .venv/bin/pip install -r requirements.txt
fi
# tcmalloc keeps XLA's per-step temporaries mapped instead of page-faulting them in every step.
PRELOAD=()
TCMALLOC="$(find_tcmalloc)"
if [[ -n "${TCMALLOC}" && -z "${LD_PRELOAD:-}" ]]; then
  PRELOAD=(env "LD_PRELOAD=${TCMALLOC}")
fi
run ${PRELOAD[@]+"${PRELOAD[@]}"} .venv/bin/python -m hml_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" ${EXTRA[@]+"${EXTRA[@]}"}

#!/usr/bin/env bash
# Cloud TPU VM: create it, install hml_jax on every worker, train on all workers at once, follow
# the logs, resume after preemption, delete it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "${HERE}/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh STEP [options] [-- EXTRA hml_jax.main FLAGS]

Steps:
  create    create the TPU VM (or a queued resource with --queued; spot capacity with --spot)
  install   copy this repository to every worker and install it (requirements.txt + jax[tpu])
  train     start `python -m hml_jax.main --config=CONFIG --workdir=WORKDIR` on all workers at
            once, detached (logs in ~/hml_jax/train.log); after a preemption run `create`,
            `install` and `train` again with the same --workdir: the run resumes
  logs      follow worker 0's log (--worker=N for another)
  status    describe the TPU VM
  delete    delete the TPU VM (and its queued resource)
  up        create + install + train

Options:
  --name=NAME             TPU VM name (default hml-jax)
  --zone=ZONE             (default us-central2-b)
  --accelerator=TYPE      e.g. v4-8, v4-32, v5litepod-16 (default v4-8)
  --version=RUNTIME       TPU software version (default tpu-ubuntu2204-base)
  --project=PROJECT       (default: gcloud's configured project)
  --spot                  spot (preemptible) capacity
  --queued                create through a queued resource
  --config=CONFIG         (default configs/coco.py)
  --workdir=gs://...      shared by all workers; required for train
  --worker=N              for logs (default 0)
  --dry-run               print the gcloud commands instead of running them
  -h, --help              this help
USAGE
}

STEP="${1:-}"
if [[ -z "${STEP}" || "${STEP}" == -h || "${STEP}" == --help ]]; then
  usage
  exit 0
fi
shift
NAME=hml-jax
ZONE=us-central2-b
ACCELERATOR=v4-8
VERSION=tpu-ubuntu2204-base
PROJECT=""
SPOT=0
QUEUED=0
CONFIG=configs/coco.py
WORKDIR=""
WORKER=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done

COMMON=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  COMMON+=(--project="${PROJECT}")
fi
REMOTE_DIR=hml_jax  # relative to the workers' home directory, where ssh commands start

create() {
  local capacity=()
  if [[ "${SPOT}" -eq 1 ]]; then
    capacity=(--spot)
  fi
  if [[ "${QUEUED}" -eq 1 ]]; then
    run gcloud compute tpus queued-resources create "${NAME}-queued" --node-id="${NAME}" \
      --accelerator-type="${ACCELERATOR}" --runtime-version="${VERSION}" "${COMMON[@]}" \
      "${capacity[@]}"
  else
    run gcloud compute tpus tpu-vm create "${NAME}" --accelerator-type="${ACCELERATOR}" \
      --version="${VERSION}" "${COMMON[@]}" "${capacity[@]}"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${COMMON[@]}" --command="$1"
}

install() {
  # The committed code only (git archive): no local .venv, runs or datasets.
  local archive=/tmp/hml_jax.tar.gz
  run git -C "$(cd "${HERE}/.." && pwd)" archive --format=tar.gz --output="${archive}" HEAD
  run gcloud compute tpus tpu-vm scp "${archive}" "${NAME}:hml_jax.tar.gz" --worker=all \
    "${COMMON[@]}"
  ssh_all "mkdir -p ${REMOTE_DIR} && tar -xzf hml_jax.tar.gz -C ${REMOTE_DIR} && cd ${REMOTE_DIR} \
&& python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'"
}

train() {
  [[ "${WORKDIR}" == gs://* ]] || die "--workdir=gs://BUCKET/PATH is required (all workers share it)"
  local flags
  flags=$(printf ' %q' "--config=${CONFIG}" "--workdir=${WORKDIR}" ${EXTRA[@]+"${EXTRA[@]}"})
  # Detached, so that a dropped ssh connection does not stop training. HML_MULTIHOST=1: every
  # worker is one process of jax.distributed, found by JAX on the TPU pod slice.
  ssh_all "cd ${REMOTE_DIR} && HML_MULTIHOST=1 nohup .venv/bin/python -m hml_jax.main${flags} \
> train.log 2>&1 < /dev/null &"
}

logs() {
  run gcloud compute tpus tpu-vm ssh "${NAME}" --worker="${WORKER}" "${COMMON[@]}" \
    --command="tail -n 200 -F ${REMOTE_DIR}/train.log"
}

status() {
  run gcloud compute tpus tpu-vm describe "${NAME}" "${COMMON[@]}"
}

delete() {
  if [[ "${QUEUED}" -eq 1 ]]; then
    run gcloud compute tpus queued-resources delete "${NAME}-queued" "${COMMON[@]}" --force \
      --quiet
  else
    run gcloud compute tpus tpu-vm delete "${NAME}" "${COMMON[@]}" --quiet
  fi
}

case "${STEP}" in
  create) create ;;
  install) install ;;
  train) train ;;
  logs) logs ;;
  status) status ;;
  delete) delete ;;
  up) create; install; train ;;
  *) usage >&2; die "unknown step ${STEP}" ;;
esac

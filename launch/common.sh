# Shared by the launch scripts (sourced, not run): dry-run aware command execution.
# shellcheck shell=bash

DRY_RUN=0

# run CMD ARGS...: prints the command, shell-quoted, then runs it (only prints with --dry-run).
run() {
  local quoted
  quoted=$(printf '%q ' "$@")
  echo "+ ${quoted% }"
  if [[ "${DRY_RUN}" -eq 0 ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# find_tcmalloc: prints the path of an installed tcmalloc (or nothing). XLA on CPU allocates each
# train step's temporaries afresh, and with glibc's malloc every step page-faults them in again;
# tcmalloc keeps them (about 1.4x faster on CPU; docs/performance.md "Speed on CPU"). HML_TCMALLOC=PATH
# chooses one, HML_TCMALLOC=none turns this off. The list matches hml_jax/runtime/host.py.
find_tcmalloc() {
  if [[ -n "${HML_TCMALLOC+set}" ]]; then
    [[ "${HML_TCMALLOC}" == none ]] || echo "${HML_TCMALLOC}"
    return 0
  fi
  local path
  for path in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
              /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 \
              /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
              /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4; do
    if [[ -e "${path}" ]]; then
      echo "${path}"
      return 0
    fi
  done
}

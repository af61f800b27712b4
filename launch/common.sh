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

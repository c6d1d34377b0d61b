#!/usr/bin/env bash
# Runs amos-train on every host of a Cloud TPU VM slice: creates the VM (or reuses
# it), ships the code, installs it, starts the run on --worker=all, streams worker
# 0's log and optionally deletes the VM. Rerunning it after a preemption recreates
# the slice and the run resumes from the latest checkpoint in its workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR --config CONFIG
                         --workdir DIR [options] [-- AMOS_TRAIN_ARGS...]

Create or reuse a Cloud TPU VM, copy (or git pull) this code onto every worker,
install it into ~/amos_jax/.venv, run amos-train on --worker=all and stream worker 0's log.

required (flag or environment variable):
  --name NAME          TPU_NAME         TPU VM name
  --zone ZONE          TPU_ZONE         e.g. us-east5-a
  --type TYPE          TPU_TYPE         accelerator type, e.g. v5p-64 (used on create)
  --config CONFIG      AMOS_CONFIG      e.g. configs/amos.py:base
  --workdir DIR        AMOS_WORKDIR     gs://bucket/run (shared by all hosts; a local
                                        path only works on a one-host slice)
options:
  --project PROJECT    TPU_PROJECT      gcloud project (default: gcloud's)
  --version VERSION    TPU_VERSION      TPU VM software (default v2-alpha-tpuv5 for v5p,
                                        v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)
  --spot               TPU_SPOT=1       create a preemptible (spot) VM
  --repo URL           AMOS_REPO        git clone/pull URL on the workers instead of
                                        copying this working tree
  --branch BRANCH      AMOS_BRANCH      branch for --repo (default main)
  --attach                              only stream the log of the run already going
  --teardown           TPU_TEARDOWN=1   delete the VM when the run ends
  --dry-run                             print the gcloud commands instead of running them
  -h, --help                            this message
Arguments after -- go to amos-train, e.g. -- --config.train.steps=1000.
LIBTPU_INIT_ARGS, if set here, is passed to the workers.

example:
  launch/tpu_pod.sh --name amos-v5p --zone us-east5-a --type v5p-64 --spot \
    --config configs/amos.py:base --workdir gs://my-bucket/amos-base
EOF
}

die() { echo "error: $*" >&2; exit 2; }

NAME="${TPU_NAME:-}"; ZONE="${TPU_ZONE:-}"; TYPE="${TPU_TYPE:-}"
PROJECT="${TPU_PROJECT:-}"; VERSION="${TPU_VERSION:-}"; SPOT="${TPU_SPOT:-0}"
CONFIG="${AMOS_CONFIG:-}"; WORKDIR="${AMOS_WORKDIR:-}"
REPO="${AMOS_REPO:-}"; BRANCH="${AMOS_BRANCH:-main}"
TEARDOWN="${TPU_TEARDOWN:-0}"; ATTACH=0; DRY_RUN=0
TRAIN_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --branch) need_value "$@"; BRANCH="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --attach) ATTACH=1; shift ;;
    --teardown) TEARDOWN=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "missing --name (or TPU_NAME): the TPU VM to create or reuse"
[[ -n "$ZONE" ]] || die "missing --zone (or TPU_ZONE), e.g. us-east5-a"
if [[ "$ATTACH" == 0 ]]; then
  [[ -n "$CONFIG" ]] || die "missing --config (or AMOS_CONFIG), e.g. configs/amos.py:base"
  [[ -n "$WORKDIR" ]] || die "missing --workdir (or AMOS_WORKDIR), e.g. gs://bucket/run"
fi
if [[ "$DRY_RUN" == 0 ]]; then
  command -v gcloud >/dev/null 2>&1 \
    || die "gcloud not found: install the Google Cloud CLI and run 'gcloud auth login'"
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR='~/amos_jax'
GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_workers() {  # on_workers WORKER COMMAND: one ssh to WORKER (a number or "all")
  run "${GCLOUD[@]}" ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

ensure_vm() {
  local state=""
  if [[ "$DRY_RUN" == 0 ]]; then
    state="$("${GCLOUD[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null || true)"
  fi
  case "$state" in
    READY) echo "reusing TPU VM $NAME ($ZONE)"; return ;;
    PREEMPTED|TERMINATED|FAILED)
      # A preempted spot slice cannot restart; delete it and create a fresh one.
      echo "TPU VM $NAME is $state: recreating it"
      run "${GCLOUD[@]}" delete "$NAME" "${LOCATION[@]}" --quiet ;;
    "") ;;
    *) die "TPU VM $NAME is $state; wait until it is READY, or delete it" ;;
  esac
  [[ -n "$TYPE" ]] || die "missing --type (or TPU_TYPE), e.g. v5p-64: needed to create $NAME"
  local version="$VERSION"
  if [[ -z "$version" ]]; then
    case "$TYPE" in
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) version=tpu-ubuntu2204-base ;;
    esac
  fi
  local create=("${GCLOUD[@]}" create "$NAME" "${LOCATION[@]}" --accelerator-type="$TYPE"
                --version="$version")
  [[ "$SPOT" == 1 ]] && create+=(--spot)
  echo "creating TPU VM $NAME ($TYPE, $version$([[ "$SPOT" == 1 ]] && echo ', spot'))"
  run "${create[@]}"
}

ship_code() {
  if [[ -n "$REPO" ]]; then
    on_workers all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin $BRANCH \
&& git -C $REMOTE_DIR checkout -q $BRANCH && git -C $REMOTE_DIR reset -q --hard origin/$BRANCH; \
else git clone -q -b $BRANCH $REPO $REMOTE_DIR; fi"
    return
  fi
  # The working tree as it is, uncommitted edits included, without ignored files
  # (.venv, runs/).
  command -v git >/dev/null 2>&1 || die "git not found: needed to pack the working tree"
  local tarball
  tarball="$(mktemp -t amos_jax.XXXXXX.tgz)"
  (cd "$HERE" && git ls-files -z --cached --others --exclude-standard \
    | tar -czf "$tarball" --null --ignore-failed-read -T -) \
    || die "could not pack $HERE (is it a git checkout?)"
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:~/amos_jax.tgz" "${LOCATION[@]}" --worker=all
  rm -f "$tarball"
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf ~/amos_jax.tgz -C $REMOTE_DIR"
}

install() {
  # The TPU images ship an older Python; setup.py needs 3.11. jax[tpu] brings the
  # libtpu matching the pinned jax.
  on_workers all "set -e; cd $REMOTE_DIR; \
command -v python3.11 >/dev/null || { sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv; }; \
if command -v make >/dev/null; then make -s install PYTHON=python3.11; \
else python3.11 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e .; fi; \
.venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
}

start_run() {
  local cmd
  cmd="$(printf '%q ' .venv/bin/amos-train --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")"
  [[ -n "${LIBTPU_INIT_ARGS:-}" ]] && cmd="LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS") $cmd"
  # The run must outlive this ssh session: the subshell ignores SIGHUP (amos-train
  # inherits that), and the log and exit code stay on each worker.
  on_workers all "cd $REMOTE_DIR && rm -f ~/amos_train.rc && \
( trap '' HUP; $cmd; echo \$? > ~/amos_train.rc ) > ~/amos_train.log 2>&1 < /dev/null & \
echo \$! > ~/amos_train.pid"
}

stream_log() {
  # Worker 0 is process 0, the one that logs; follow it until its run exits.
  on_workers 0 "tail --pid=\$(cat ~/amos_train.pid) -n +1 -F ~/amos_train.log; \
exit \$(cat ~/amos_train.rc 2>/dev/null || echo 1)"
}

status=0
if [[ "$ATTACH" == 0 ]]; then
  ensure_vm
  ship_code
  install
  start_run
fi
stream_log || status=$?
if [[ "$TEARDOWN" == 1 ]]; then
  run "${GCLOUD[@]}" delete "$NAME" "${LOCATION[@]}" --quiet
fi
[[ "$status" == 0 ]] || echo "error: amos-train on $NAME exited with status $status" >&2
exit "$status"

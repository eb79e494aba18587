#!/usr/bin/env bash
# One node of a zaya-train job: torchrun with N local ranks running `python -m zaya_train <Hydra overrides>`.
#
#   launch/torchrun.sh 8 recipe=pretrain model=small data.path=corpus.jsonl run_dir=runs/p1   # one node, 8 GPUs
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node01 MASTER_PORT=29500 launch/torchrun.sh 8 ... run_dir=/shared/runs/p1
#   DRY_RUN=1 launch/torchrun.sh 8 recipe=pretrain ...      # print the environment and the command, run nothing
#
# The first argument is the number of processes on this node (default: $NPROC_PER_NODE, else one per GPU, else 1
# on a CPU-only machine); everything after it goes to zaya-train unchanged.
#
# Environment (all optional):
#   NNODES (1)          nodes in the job; > 1 makes this one node of a multi-node c10d rendezvous, which needs
#   NODE_RANK           this node's index (default $SLURM_NODEID, as set by srun), MASTER_ADDR (the host of the
#   MASTER_ADDR         rendezvous store: the first node) and MASTER_PORT (29500). RDZV_ID names the rendezvous
#   MASTER_PORT         (default $SLURM_JOB_ID, else zaya-train); every node of a job must use the same one.
#   ZAYA_ENV            auto (default) | mi300x | cuda | none: which launch/env/*.sh to source. auto picks mi300x
#                       on ROCm (/dev/kfd or rocm-smi), cuda on NVIDIA (/dev/nvidiactl or nvidia-smi), else none.
#   LOG_DIR             per-rank stdout/stderr files go to $LOG_DIR/node<NODE_RANK>/ (default <run_dir>/logs),
#                       and every rank's output is also shown on the console, prefixed with its rank
#   LOG_RANKS           only these local ranks on the console (e.g. 0); the files keep every rank
#   MAX_RESTARTS (0)    torchrun restarts of the whole worker group after a failure (resume=auto continues)
#   TORCHRUN (torchrun) the launcher binary
#   DRY_RUN=1           print what would be exported and run, then exit 0
#
# Signals: SIGUSR1 (Slurm's warning before the time limit) is passed to the training processes, which finish the
# step, write a checkpoint and exit 0; torchrun itself ignores it (its default action would kill it). SIGTERM,
# SIGINT and SIGHUP go to torchrun, which stops the workers (the trainer checkpoints on SIGTERM too).
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() {
    echo "launch/torchrun.sh: error: $*" >&2
    exit 2
}

# --- arguments ---------------------------------------------------------------------------------------------------
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    NPROC_PER_NODE="$1"
    shift
fi
overrides=("$@")

# The environment file: chosen before the process count defaults, since "a GPU per process" needs to know the GPUs.
ZAYA_ENV="${ZAYA_ENV:-auto}"
if [[ "$ZAYA_ENV" == auto ]]; then
    if [[ -e /dev/kfd ]] || command -v rocm-smi >/dev/null 2>&1; then
        ZAYA_ENV=mi300x
    elif [[ -e /dev/nvidiactl ]] || command -v nvidia-smi >/dev/null 2>&1; then
        ZAYA_ENV=cuda
    else
        ZAYA_ENV=none
    fi
fi
case "$ZAYA_ENV" in
    # The file sources env/common.sh itself; both are listed for the dry run's report of what they set.
    mi300x | cuda)
        env_file="$LAUNCH_DIR/env/$ZAYA_ENV.sh"
        env_listed=("$LAUNCH_DIR/env/common.sh" "$env_file")
        ;;
    none) env_file="" env_listed=() ;;
    *) die "ZAYA_ENV: expected auto, mi300x, cuda or none, got '$ZAYA_ENV'" ;;
esac

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    # torchrun's `gpu` counts the visible GPUs (ROCm GPUs included); a CPU-only machine runs one process.
    if [[ "$ZAYA_ENV" == none ]]; then NPROC_PER_NODE=1; else NPROC_PER_NODE=gpu; fi
fi
[[ "$NPROC_PER_NODE" =~ ^([1-9][0-9]*|gpu)$ ]] || die "NPROC_PER_NODE: expected a positive number or gpu, got '$NPROC_PER_NODE'"
export NPROC_PER_NODE  # the env files size OMP_NUM_THREADS from it

# The last run_dir= override wins in Hydra, so it is the one the ranks write to.
run_dir=""
recipe=""
for arg in "${overrides[@]}"; do
    case "$arg" in
        run_dir=*) run_dir="${arg#run_dir=}" ;;
        recipe=*) recipe="${arg#recipe=}" ;;
    esac
done

# --- rendezvous ----------------------------------------------------------------------------------------------------
NNODES="${NNODES:-1}"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES: expected a positive number, got '$NNODES'"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if (( NNODES > 1 )); then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES: set MASTER_ADDR to the first node's address"
    MASTER_PORT="${MASTER_PORT:-29500}"
    if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
        die "NODE_RANK: expected 0..$((NNODES - 1)), got '$NODE_RANK'"
    fi
    # Each node would otherwise resolve the default run_dir (a timestamp) on its own and write somewhere else.
    [[ -n "$run_dir" ]] || die "NNODES=$NNODES: pass run_dir=<a directory every node sees> (the default differs per node)"
    # c10d: the node whose address is MASTER_ADDR hosts the rendezvous store, the others connect to it. Ranks are
    # assigned by the rendezvous in join order (torchrun ignores --node-rank under c10d, so it is not passed;
    # NODE_RANK only names this node's log directory).
    rendezvous=(
        "--nnodes=$NNODES"
        --rdzv-backend=c10d "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" "--rdzv-id=${RDZV_ID:-${SLURM_JOB_ID:-zaya-train}}"
    )
else
    NODE_RANK=0
    # One node: a private c10d store on a free local port, so two single-node runs on one machine do not collide.
    rendezvous=(--standalone)
    if [[ -z "$run_dir" ]]; then
        # The config's default run_dir is a timestamp each rank resolves for itself; fix it once for all ranks.
        run_dir="runs/${recipe:-nano}/$(date +%Y%m%d-%H%M%S)"
        overrides+=("run_dir=$run_dir")
    fi
fi

LOG_DIR="${LOG_DIR:-$run_dir/logs}"
logging=("--log-dir=$LOG_DIR/node$NODE_RANK" --tee=3)
[[ -z "${LOG_RANKS:-}" ]] || logging+=("--local-ranks-filter=$LOG_RANKS")

cmd=(
    "${TORCHRUN:-torchrun}" "${rendezvous[@]}" "--nproc-per-node=$NPROC_PER_NODE"
    "--max-restarts=${MAX_RESTARTS:-0}" "${logging[@]}"
    -m zaya_train "${overrides[@]}"
)

# --- environment -------------------------------------------------------------------------------------------------
if [[ -n "$env_file" ]]; then
    # shellcheck source=/dev/null
    source "$env_file"
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "# launch/torchrun.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es), environment $ZAYA_ENV, run_dir $run_dir"
    # Every variable the env files set, in their order, with the value this node would export.
    for file in "${env_listed[@]}"; do
        while read -r name; do
            if [[ -n "${!name+set}" ]]; then
                printf 'export %s=%q\n' "$name" "${!name}"
            else
                printf '# %s: left unset on this host\n' "$name"
            fi
        done < <(sed -n 's/^[[:space:]]*: "\${\([A-Za-z_][A-Za-z0-9_]*\):=.*/\1/p' "$file")
    done
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi

mkdir -p "$LOG_DIR"

# --- run -----------------------------------------------------------------------------------------------------------
# torchrun runs as a child (not exec'd) so that this shell can hand SIGUSR1 to the workers: torchrun's default action
# on USR1 is to die, and only recent versions can be told to forward it (--signals-to-handle). The traps are set
# before torchrun starts, so no signal finds this shell with its default action.
torchrun_pid=""
forwarded_stop=0
# The direct children of a process (torchrun's are the training processes): pgrep, or /proc where it is missing.
# shellcheck disable=SC2329  # called by on_usr1
children_of() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$1" || true
        return
    fi
    local stat line ppid
    for stat in /proc/[0-9]*/stat; do
        { read -r line <"$stat"; } 2>/dev/null || continue  # the process may be gone already
        # Fields after the command name (which may hold spaces): state, then the parent's pid.
        read -r _ ppid _ <<<"${line##*) }"
        if [[ "$ppid" == "$1" ]]; then
            stat="${stat#/proc/}"
            echo "${stat%/stat}"
        fi
    done
}
# shellcheck disable=SC2329  # called by the traps below
on_usr1() {
    local -a workers=()
    [[ -z "$torchrun_pid" ]] || mapfile -t workers < <(children_of "$torchrun_pid")
    if ((${#workers[@]} == 0)); then
        echo "launch/torchrun.sh: SIGUSR1 before the training processes started; ignored" >&2
        return
    fi
    echo "launch/torchrun.sh: SIGUSR1: asking the training processes (${workers[*]}) to checkpoint and stop" >&2
    kill -USR1 "${workers[@]}" 2>/dev/null || true
}
# shellcheck disable=SC2329  # called by the traps below
on_stop() {
    # Once: under Slurm torchrun usually gets the same signal directly, and it handles SIGTERM/SIGINT/SIGHUP itself
    # (it stops the workers; the trainer checkpoints on SIGTERM).
    if [[ -n "$torchrun_pid" ]] && ((forwarded_stop == 0)); then
        forwarded_stop=1
        kill -"$1" "$torchrun_pid" 2>/dev/null || true
    fi
}
trap on_usr1 USR1
trap 'on_stop TERM' TERM
trap 'on_stop INT' INT
trap 'on_stop HUP' HUP

# The subshell makes torchrun ignore USR1 (a signal sent to every process of a Slurm step must not kill it); the
# workers inherit that until the trainer installs its own handler.
( trap '' USR1; exec "${cmd[@]}" ) &
torchrun_pid=$!

# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting until torchrun has exited.
status=0
while true; do
    wait "$torchrun_pid" && status=0 || status=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$status"

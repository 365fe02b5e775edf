#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine, within 9.5 minutes: the GPU tests, the collection,
# evaluation and serving benchmarks, one default unlearning job on the embedded model, and the
# unlearning baselines against its mask. Each step
# runs under `timeout` (its own cap, and never past the overall budget); a failing step is recorded
# and the next one still runs, so one failure does not lose the other figures. Prints every step's
# output as it comes, a table of steps with their wall times, then every name=value figure found;
# exits non-zero if any step failed or timed out.
#
# Installs nothing: it uses the environment ./dev setup makes ($SELPRUNE_VENV, default .venv) and the
# embedded model and corpora already in $SELPRUNE_CACHE_DIR (default ~/.cache/selprune); hub access is
# switched off.
#
# Usage: bench/gpu.sh [--dry-run]
#   --dry-run                 print the plan (steps, commands, caps) and exit
#   SELPRUNE_BENCH_DEVICE     cuda (default), cuda:N, or cpu: a smoke test of this script's plumbing
#                             with tiny budgets (the GPU tests are then skipped by tests/conftest.py)
#   SELPRUNE_BENCH_BUDGET_S   overall budget in seconds (default 570 on cuda, 1920 on cpu)
#   SELPRUNE_BENCH_DTYPE      --dtype for every step (default: each script's own default)
#   SELPRUNE_BENCH_LOGS       folder for the step logs and the job's mask (default: a new temp folder)
#   SELPRUNE_BENCH_STACK      0: skip the serving-overhead step through a local stack (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

DEVICE=${SELPRUNE_BENCH_DEVICE:-cuda}
SMOKE=0
[[ "$DEVICE" == cpu ]] && SMOKE=1
BUDGET=${SELPRUNE_BENCH_BUDGET_S:-$([[ $SMOKE == 1 ]] && echo 1920 || echo 570)}
VENV=${SELPRUNE_VENV:-.venv}
PY="$VENV/bin/python"
LOGS=${SELPRUNE_BENCH_LOGS:-}
DTYPE_ARGS=()
[[ -n "${SELPRUNE_BENCH_DTYPE:-}" ]] && DTYPE_ARGS=(--dtype "$SELPRUNE_BENCH_DTYPE")

export SELPRUNE_CACHE_DIR=${SELPRUNE_CACHE_DIR:-$HOME/.cache/selprune}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} # as worker/settings.py apply_process_defaults
export PYTHONUNBUFFERED=1                           # step output shows as it comes, not at exit

# Steps: name, cap in seconds, command (one string, run by bash -c). On cuda the caps of the first seven
# steps sum to 555 s; serve_stack, the least needed, runs in what is left of the budget: each step's
# cap is cut to what is left less 15 s (the most a timed-out step takes to stop), and a step with
# under 15 s left is skipped, so the whole run ends within the budget. The smoke caps fit a busy
# 2-core CPU.
NAMES=() CAPS=() CMDS=()
step() { NAMES+=("$1"); CAPS+=("$2"); CMDS+=("$3"); }
q() { printf '%q ' "$@"; } # shell-quote arguments into a command string

if [[ $SMOKE == 0 ]]; then
  step preflight 20 "set -e; $(q "$PY" -c 'import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
print("gpu", torch.cuda.get_device_name(0))')
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv
    fi"
  step gpu_tests 80 "$(q "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu --device "$DEVICE")"
  step serve 120 "$(q "$PY" bench/serve.py --device "$DEVICE" --no-stack "${DTYPE_ARGS[@]}")"
  step collect 45 "$(q "$PY" bench/collect.py --device "$DEVICE" "${DTYPE_ARGS[@]}")"
  step evaluate 75 "$(q "$PY" bench/evaluate.py --device "$DEVICE" "${DTYPE_ARGS[@]}")"
  step prune 125 "$(q "$VENV/bin/selprune" prune --device "$DEVICE" --out "@LOGS@/masks" "${DTYPE_ARGS[@]}")"
  # The baselines against the prune step's mask (fp32 always: the gradient methods train).
  step baselines 90 "$(q "$PY" bench/baselines.py --device "$DEVICE" --json "@LOGS@/baselines_code.json") --mask \"\$(ls @LOGS@/masks/*.safetensors | head -n 1)\""
  step serve_stack 90 "$(q "$PY" bench/serve.py --device "$DEVICE" --only stack "${DTYPE_ARGS[@]}")"
else # the same commands with tiny budgets: this proves the plumbing, not the figures
  step preflight 60 "$(q "$PY" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())')"
  step gpu_tests 120 "$(q "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu --device cpu)"
  step serve 420 "$(q "$PY" bench/serve.py --device cpu --no-stack --batch 2 --new-tokens 3 --rounds 1 --only throughput,generate "${DTYPE_ARGS[@]}")"
  step collect 180 "$(q "$PY" bench/collect.py --device cpu --batches 1 --rounds 1 --token-limit 64 "${DTYPE_ARGS[@]}")"
  step evaluate 240 "$(q "$PY" bench/evaluate.py --device cpu --rounds 1 --eval-tokens 200 --token-limit 128 "${DTYPE_ARGS[@]}")"
  step prune 360 "$(q "$VENV/bin/selprune" prune --device cpu --out "@LOGS@/masks" --steps 1 --collect-tokens 1000 --eval-tokens 200 --token-limit 128 "${DTYPE_ARGS[@]}")"
  step baselines 420 "$(q "$PY" bench/baselines.py --device cpu --steps 2 --eval-every 1 --alphas 0.5 --eval-tokens 100 --relearn-steps 1 --relearn-n 2 --mia-texts 8 --batch-size 2 --token-limit 32) --mask \"\$(ls @LOGS@/masks/*.safetensors | head -n 1)\""
  step serve_stack 240 "$(q "$PY" bench/serve.py --device cpu --only stack --requests 3 "${DTYPE_ARGS[@]}")"
fi
if [[ "${SELPRUNE_BENCH_STACK:-1}" == 0 ]]; then
  unset 'NAMES[-1]' 'CAPS[-1]' 'CMDS[-1]'
fi

if [[ $DRY_RUN == 1 ]]; then
  echo "device=$DEVICE budget=${BUDGET}s python=$PY cache=$SELPRUNE_CACHE_DIR logs=${LOGS:-<new temp folder>}"
  for i in "${!NAMES[@]}"; do
    printf '%-12s cap %4ss  %s\n' "${NAMES[$i]}" "${CAPS[$i]}" "${CMDS[$i]//@LOGS@/${LOGS:-<logs>}}"
  done
  [[ -x "$PY" ]] || echo "note: $PY is missing: run ./dev setup first"
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  echo "no environment at $VENV: run ./dev setup first (this script installs nothing)" >&2
  exit 2
fi
LOGS=${LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/selprune-gpu.XXXXXX")}
mkdir -p "$LOGS"

START=$SECONDS
STATUS=() WALL=()
FAILED=0 INTERRUPTED=0 pid=
# Ctrl-C or TERM: stop the running step (timeout passes the signal on to its process group), report
# what ran, and exit 130.
trap 'INTERRUPTED=1; [[ -n $pid ]] && kill -INT "$pid" 2>/dev/null || true' INT TERM
echo "== bench/gpu.sh: device=$DEVICE budget=${BUDGET}s logs=$LOGS ($(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]} cmd=${CMDS[$i]//@LOGS@/$LOGS} log="$LOGS/${NAMES[$i]}.log"
  left=$((BUDGET - 15 - (SECONDS - START))) # 15 s kept for a timed-out step to stop (--kill-after)
  cap=$((CAPS[i] < left ? CAPS[i] : left))
  if [[ $name == evaluate && ! -f bench/evaluate.py ]]; then
    echo "== $name: skipped: bench/evaluate.py is not in this checkout" | tee "$log"
    STATUS+=("absent") WALL+=(0)
    continue
  fi
  if ((cap < 15)); then
    echo "== $name: skipped: $((BUDGET - (SECONDS - START)))s of the ${BUDGET}s budget left" | tee "$log"
    STATUS+=("no time") WALL+=(0)
    FAILED=1
    continue
  fi
  echo
  echo "== $name (cap ${cap}s): $cmd"
  t0=$EPOCHREALTIME
  # In the background, so the INT/TERM trap runs at once; tail streams the log until the step ends.
  # On time out, SIGINT first so Python unwinds (a local stack stops its Redis, gateway and workers),
  # KILL 15 s later.
  : >"$log" # before tail opens it
  timeout --signal=INT --kill-after=15 "$cap" bash -c "$cmd" >>"$log" 2>&1 &
  pid=$!
  tail -n +1 -s 0.2 -f --pid="$pid" "$log" &
  tail_pid=$!
  rc=0
  wait "$pid" || rc=$?
  while kill -0 "$pid" 2>/dev/null; do # the wait was cut short by the trap: wait for the step to end
    rc=0
    wait "$pid" || rc=$?
  done
  pid=
  wait "$tail_pid" || true
  wall=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  if ((INTERRUPTED)); then
    status=interrupted
  else
    case $rc in
      0) status=ok ;;
      124 | 137) status="timeout (${cap}s)" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  ((rc == 0)) || FAILED=1
  echo "== $name: $status in ${wall}s"
  STATUS+=("$status") WALL+=("$wall")
  ((INTERRUPTED == 0)) || break
done

# Figures: every numeric name=value on the lines that start with one (the benchmarks' figure lines; their
# settings headers start "model=NAME" or "device=NAME", and tracebacks are indented), less settings.
FIGURE_LINE='^[a-z][a-z0-9_]*=[-+]?[0-9]'
SETTINGS='^(batch|new_tokens|rounds|threads|tokens_per_pass|batch_size|token_limit|eval_tokens|steps|seed|port|texts)='
echo
echo "== summary: device=$DEVICE, $((SECONDS - START))s of ${BUDGET}s, logs in $LOGS"
ALL=()
for i in "${!STATUS[@]}"; do
  name=${NAMES[$i]} log="$LOGS/${NAMES[$i]}.log"
  figures=$(grep -aE "$FIGURE_LINE" "$log" 2>/dev/null |
    grep -aoE '\b[a-z][a-z0-9_]*=[-+]?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\b' | grep -vE "$SETTINGS" | awk -F= '{ last[$1] = $0; if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
      END { for (i = 1; i <= n; i++) printf "%s ", last[order[i]] }' || true)
  if [[ $name == gpu_tests ]]; then # pytest's tally only: "2 passed, 1 skipped in 9.1s"
    figures=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)' "$log" 2>/dev/null |
      tail -n 1 | grep -aoE '[0-9]+ (passed|failed|skipped|errors?|deselected)' |
      awk '{ printf "tests_%s=%s ", ($2 == "error" ? "errors" : $2), $1 }' || true)
  fi
  if [[ $name == prune ]]; then # the last step's drops and the job's own time, from its report
    job=$(grep -aE '^step [0-9]+/[0-9]+:.*\(drop' "$log" 2>/dev/null | tail -n 1 |
      sed -nE 's/.*forget top-1 [0-9.]+% \(drop ([-0-9.]+)%\).*retain top-1 [0-9.]+% \(drop ([-0-9.]+)%\).*/prune_forget_drop_pct=\1 prune_retain_drop_pct=\2 /p' || true)
    total=$(grep -aoE '\(total [0-9.]+s\)' "$log" 2>/dev/null | tail -n 1 | sed -E 's/\(total ([0-9.]+)s\)/prune_job_s=\1 /' || true)
    figures="$job$total$figures"
  fi
  figures="${figures% }"
  printf '%-12s %-18s %7ss  %s\n' "$name" "${STATUS[$i]}" "${WALL[$i]}" "$figures"
  for f in $figures; do ALL+=("$f"); done
  ALL+=("${name}_wall_s=${WALL[$i]}")
done
echo "figures: ${ALL[*]}"
if ((INTERRUPTED)); then
  echo "== interrupted"
  exit 130
fi
if ((FAILED)); then
  echo "== some steps failed or timed out: see the logs above and in $LOGS"
  exit 1
fi
echo "== all steps passed"

#!/usr/bin/env bash
# invfunc's GPU checks, as one command for a session that is lent a GPU machine.
#
#   bash benchmarks/gpu_checks.sh        # from the repository root
#
# Writes into $OUT (default ./gpu-out):
#   log.txt          everything below, with a summary at the end
#   gpu-tests.txt    python -m pytest -q tests/test_gpu.py -rs
#   bench/           benchmarks/run.py --device cuda: mlp.md, mlp.json, mlp.png,
#                    transformer.md, transformer.json (7 files in all: the device tool
#                    returns at most 8, at most two folders down, so no transformer.png)
#
# Stages; each runs whatever the earlier ones gave, and the summary says how each ended:
#   1. environment: nvidia-smi, python, torch, CUDA, cuDNN, the device
#   2. tools: pytest and hypothesis (see "Assumptions")
#   3. tests/test_gpu.py: CUDA RNG replay, CUDA autocast fp16/bf16, GradScaler, allocator
#      memory (freed bytes, return to baseline, peak flat in depth), streams
#   4. the reference benchmark on CUDA: reversible MLP at D = 8, 32, 128; then the
#      transformer block at D = 4, 16 (peers that are not installed get a row saying so)
#   5. the CPU test suite under this machine's torch (a version check), if time is left
#   Without CUDA (CI, a development machine) stage 3's tests are skipped and stages 4
#   and 5 are skipped with a message: a smoke check of the script itself.
#
# Time: GPU_CHECKS_BUDGET seconds for stages 3-5 together (default 420); each stage has
# its own cap and gets at most what is left, so the run ends well inside a 600 s command.
#
# Assumptions about the GPU machine (from the device tool's notes, 2026-11): it reaches
# no network; its `python3` holds a CUDA build of torch (2.11 when last seen) and
# pytest, hypothesis, numpy, matplotlib and tqdm. So:
#   - the python used is $PYTHON, else the first of python3/python whose torch sees CUDA,
#     else the first that imports torch (a CPU machine);
#   - invfunc is pure Python and is imported from src/ through PYTHONPATH, not installed:
#     `pip install -e .` needs the hatchling build backend, which an offline machine may
#     not have (children of benchmarks/run.py inherit PYTHONPATH);
#   - a missing pytest or hypothesis is installed from wheels in .whl/ (carry it), else
#     from the index with a short timeout; without hypothesis the tests run with
#     --noconftest (test_gpu.py does not use it); without pytest a small runner built
#     into this script runs test_gpu.py.
#
# Environment: OUT, PYTHON, GPU_CHECKS_BUDGET, GPU_CHECKS_WORKLOADS (default
# "mlp transformer").

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECKS_BUDGET:-420}
WORKLOADS=${GPU_CHECKS_WORKLOADS:-mlp transformer}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

STAGES=()
START=$SECONDS
CHECKS_START=""

record() { # name, status, seconds
    STAGES+=("$(printf '%-34s %-40s %5ss' "$1" "$2" "$3")")
}

banner() {
    printf '\n==== %s (%ss elapsed) ====\n' "$1" "$((SECONDS - START))"
}

# Seconds a stage may run: its cap, or what is left of the budget, whichever is less.
allowed() {
    local cap=$1 left
    left=$((BUDGET - (SECONDS - CHECKS_START)))
    if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

status_of() { # exit code -> word
    case $1 in
        0) echo "ok" ;;
        124 | 137) echo "TIMEOUT" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
        return
    fi
    local c fallback=""
    for c in python3 python; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
            echo "$c"
            return
        fi
        if [ -z "$fallback" ] && "$c" -c "import torch" 2>/dev/null; then
            fallback=$c
        fi
    done
    echo "${fallback:-python3}"
}

# A stand-in for pytest, for a machine without it: runs tests/test_gpu.py's test
# functions (parametrize, skipif and skip are all the file uses) and prints
# "N passed, N failed, N skipped".
# shellcheck disable=SC2317  # invoked through bash -c
mini_pytest() {
    "$PY" - "$ROOT/tests" <<'PYEOF'
import sys, time, traceback, types

class Skipped(Exception):
    pass

def skip(reason=""):
    raise Skipped(reason)

class _Marks:
    def __getattr__(self, name):
        def mark(*args, **kwargs):
            if name == "parametrize":
                def deco(fn):
                    fn.__dict__.setdefault("_params", []).append((args, kwargs))
                    return fn
                return deco
            return (name, args, kwargs)
        return mark

stub = types.ModuleType("pytest")
stub.mark, stub.skip = _Marks(), skip
sys.modules["pytest"] = stub
sys.path.insert(0, sys.argv[1])
import test_gpu as T

marks = T.pytestmark if isinstance(T.pytestmark, list) else [T.pytestmark]
skip_all = [m[2].get("reason", "") for m in marks if isinstance(m, tuple) and m[0] == "skipif" and m[1][0]]
passed = failed = skipped = 0
for name in [n for n in dir(T) if n.startswith("test_")]:
    fn = getattr(T, name)
    cases = [((), name)]
    for (argnames, values), kw in fn.__dict__.get("_params", []):
        ids = kw.get("ids") or [str(v) for v in values]
        cases = [(a + (v if "," in argnames else (v,)), f"{n}[{i}]") for a, n in cases for v, i in zip(values, ids)]
    for args, label in cases:
        t = time.perf_counter()
        try:
            if skip_all:
                raise Skipped(skip_all[0])
            fn(*args)
            passed += 1
            print(f"PASSED {label} ({time.perf_counter() - t:.2f}s)")
        except Skipped as e:
            skipped += 1
            print(f"SKIPPED {label}: {e}")
        except BaseException:
            failed += 1
            print(f"FAILED {label}")
            traceback.print_exc()
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
PYEOF
}

main() {
    banner "1. environment"
    local t0=$SECONDS
    PY=$(pick_python)
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "repo: $ROOT (commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"
    echo "out: $OUT"
    echo "python: $PY -> $(command -v "$PY" || echo missing)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'PYEOF'
import platform, torch, invfunc
print(f"Python {platform.python_version()}; torch {torch.__version__}; CUDA (build) {torch.version.cuda}; "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
print(f"invfunc {invfunc.__version__} from {invfunc.__file__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.get_device_name(0)}, capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs; bf16: {torch.cuda.is_bf16_supported()}")
else:
    print("CUDA: not available")
PYEOF
    local rc=$?
    HAS_CUDA=0
    if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        HAS_CUDA=1
    fi
    if ((rc == 0 && HAS_CUDA)); then
        record "1. environment" "ok (CUDA)" $((SECONDS - t0))
    elif ((rc == 0)); then
        record "1. environment" "ok (no CUDA: a smoke check)" $((SECONDS - t0))
    else
        record "1. environment" "$(status_of "$rc"): python/torch/invfunc" $((SECONDS - t0))
    fi

    banner "2. tools"
    t0=$SECONDS
    local missing=() m
    for m in pytest hypothesis; do
        "$PY" -c "import $m" 2>/dev/null || missing+=("$m")
    done
    if ((${#missing[@]})); then
        echo "missing: ${missing[*]}; trying wheels in .whl/, then the index (30 s)"
        if [ -d "$ROOT/.whl" ]; then
            "$PY" -m pip install -q --no-index --find-links "$ROOT/.whl" "${missing[@]}" || true
        fi
        for m in "${missing[@]}"; do
            "$PY" -c "import $m" 2>/dev/null ||
                timeout 30 "$PY" -m pip install -q --retries 0 --timeout 5 "$m" || true
        done
    fi
    PYTEST_ARGS=(-q -rs -p no:cacheprovider --durations=8)
    HAVE_PYTEST=1
    "$PY" -c "import pytest" 2>/dev/null || HAVE_PYTEST=0
    if ! "$PY" -c "import hypothesis" 2>/dev/null; then
        PYTEST_ARGS+=(--noconftest) # tests/conftest.py only sets hypothesis profiles
    fi
    if ((HAVE_PYTEST)); then
        echo "pytest $("$PY" -c 'import pytest; print(pytest.__version__)'); args: ${PYTEST_ARGS[*]}"
        record "2. tools" "ok" $((SECONDS - t0))
    else
        echo "pytest is missing: stage 3 uses the runner built into this script"
        record "2. tools" "no pytest: built-in runner" $((SECONDS - t0))
    fi

    CHECKS_START=$SECONDS

    banner "3. tests/test_gpu.py"
    t0=$SECONDS
    local t
    t=$(allowed 150)
    if ((HAVE_PYTEST)); then
        timeout -k 10 "$t" "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
        rc=${PIPESTATUS[0]}
    else
        (
            export -f mini_pytest
            export PY ROOT
            timeout -k 10 "$t" bash -c mini_pytest
        ) 2>&1 | tee "$OUT/gpu-tests.txt"
        rc=${PIPESTATUS[0]}
    fi
    local last
    last=$(grep -E '(passed|failed|skipped|error)' "$OUT/gpu-tests.txt" | tail -n 1 | tr -d '=' | xargs)
    record "3. GPU tests" "$(status_of "$rc"): ${last:-no summary line}" $((SECONDS - t0))

    local caps=(150 90) i=0 wl
    for wl in $WORKLOADS; do
        banner "4. benchmark: $wl on CUDA"
        t0=$SECONDS
        if ((!HAS_CUDA)); then
            echo "CUDA is not available here: the CUDA benchmark is skipped."
            record "4. bench $wl" "skipped (no CUDA)" 0
            continue
        fi
        t=$(allowed "${caps[i]:-90}")
        i=$((i + 1))
        if ((t < 30)); then
            echo "only ${t}s of the budget left: skipped."
            record "4. bench $wl" "skipped (budget spent)" 0
            continue
        fi
        local depths=(8 32 128)
        [ "$wl" = mlp ] || depths=(4 16)
        timeout -k 10 "$t" "$PY" benchmarks/run.py --workload "$wl" --device cuda --depths "${depths[@]}" \
            --steps 10 --warmup 2 --timeout 60 --out "$OUT/bench"
        rc=$?
        [ "$wl" = mlp ] || rm -f "$OUT/bench/$wl.png"
        record "4. bench $wl" "$(status_of "$rc")" $((SECONDS - t0))
    done

    banner "5. CPU test suite under this torch"
    t0=$SECONDS
    if ((!HAS_CUDA)); then
        echo "CUDA is not available here: skipped (CI runs the suite on CPU)."
        record "5. CPU suite" "skipped (no CUDA)" 0
    elif ((!HAVE_PYTEST)); then
        record "5. CPU suite" "skipped (no pytest)" 0
    else
        t=$(allowed 120)
        if ((t < 30)); then
            echo "only ${t}s of the budget left: skipped."
            record "5. CPU suite" "skipped (budget spent)" 0
        else
            # -m "not slow": no torch.compile or DDP process groups, to fit the budget
            CUDA_VISIBLE_DEVICES="" timeout -k 10 "$t" "$PY" -m pytest "${PYTEST_ARGS[@]}" -x \
                -m "not slow" --ignore=tests/test_gpu.py tests 2>&1 | tail -n 40
            rc=${PIPESTATUS[0]}
            if ((rc == 124 || rc == 137)); then # optional: a cut-short run is not a failure
                record "5. CPU suite" "stopped at its time cap (${t}s)" $((SECONDS - t0))
            else
                record "5. CPU suite" "$(status_of "$rc")" $((SECONDS - t0))
            fi
        fi
    fi

    banner "summary"
    printf '%s\n' "${STAGES[@]}"
    echo "files in $OUT:"
    (cd "$OUT" && find . -type f | sort)
    local bad=0 s
    for s in "${STAGES[@]}"; do
        case $s in *FAILED* | *TIMEOUT*) bad=1 ;; esac
    done
    echo "total: $((SECONDS - START))s; $( ((bad)) && echo "SOME STAGES FAILED" || echo "all stages ok or skipped")"
    return "$bad"
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The test suite, as CI runs it (the README's test command):
#   bash scripts/test.sh               both tiers, fast and slow (notebooks, two-process jobs, installs, demos,
#                                      kill-and-resume, and the real-model tier: SmolLM2-135M-Instruct in 4-bit,
#                                      marker real_model; alone: python -m pytest -m real_model)
#   bash scripts/test.sh --fast        the fast tier only: the developer's loop (same as a plain `python -m pytest`,
#                                      plus the second precision pass)
#   bash scripts/test.sh [--fast] ARGS extra pytest arguments, e.g. -k resume, -x
# Two passes. Pass 1 runs every selected test once with UNSLOTH_CPU_BF16=0 (fp32). Pass 2 runs the `numeric` tests
# again with UNSLOTH_CPU_BF16=1: Unsloth's CPU mode computes in bf16 where the CPU has native bf16 (AMX /
# AVX512-BF16) and in fp32 elsewhere, and a test whose verdict depends on that precision must hold both ways. Each
# pass prints its 15 slowest tests and its summary line with its time; the script fails if either pass fails.
# Every test has a timeout (pyproject.toml, pytest-timeout): a hang fails with the test's name.
# Both passes spread the tests over the machine's cores (pytest-xdist: one worker per CPU, at most 8;
# LLMFT_TEST_WORKERS=N to choose, 0 to run in one process), each worker with one OpenMP thread unless OMP_NUM_THREADS
# is set: two torch processes with two threads each on two cores spin-wait for each other (a SmolLM2 QLoRA step took
# 45 s instead of 5.7 s). A test file runs whole on one worker (its tests share module fixtures: the real-model SFT
# run, the notebooks' working directory, the two-process jobs' reference run), the files with slow tests first
# (tests/conftest.py). Not --dist loadgroup: with pytest 9.2 it no longer groups anything (pytest-xdist issue #1386).
set -uo pipefail
tier="not wheelhouse"
if [ "${1:-}" = "--fast" ]; then
  tier="not slow and not wheelhouse and not real_model"
  shift
fi
workers="${LLMFT_TEST_WORKERS:-$(nproc)}"
[ "$workers" -gt 8 ] && workers=8
if [ "$workers" -gt 0 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
status=0
echo "=== pass 1: every test ($tier) once, UNSLOTH_CPU_BF16=0, $workers workers ==="
UNSLOTH_CPU_BF16=0 python -m pytest "${parallel[@]}" -m "$tier" --durations=15 "$@" || status=1
echo "=== pass 2: the numeric tests ($tier) again, UNSLOTH_CPU_BF16=1, $workers workers ==="
UNSLOTH_CPU_BF16=1 python -m pytest "${parallel[@]}" -m "numeric and ($tier)" --durations=15 "$@"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi  # 5: the extra arguments selected no numeric test
exit $status

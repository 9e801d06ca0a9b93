#!/usr/bin/env bash
# Runs the test suite in both of Unsloth's CPU precisions, as CI does:
#   bash scripts/test.sh [pytest args...]
# Unsloth's CPU mode computes in bf16 where the CPU has native bf16 (AMX / AVX512-BF16) and in fp32 elsewhere, so the
# same suite must hold both ways; UNSLOTH_CPU_BF16=0/1 forces either (bf16 is emulated, hence slower, on CPUs without
# it). Each run prints its own pytest summary line (with its time); the script fails if either run fails.
set -uo pipefail
status=0
for bf16 in 0 1; do
  echo "=== pytest with UNSLOTH_CPU_BF16=$bf16 ==="
  UNSLOTH_CPU_BF16=$bf16 python -m pytest "$@" || status=1  # pytest's last line gives the run's time
done
exit $status

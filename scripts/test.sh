#!/usr/bin/env bash
# The project's test command: unit tests, then every scenario suite once per storage
# backend (DTM_TEST_STORE). Starts the database servers it needs.
#   scripts/test.sh                             every backend of this build
#   DTM_TEST_STORES="sqlite" scripts/test.sh    only the embedded store
set -uo pipefail
cd "$(dirname "$0")/.."

stores="${DTM_TEST_STORES:-sqlite}"
for s in $stores; do
  if [ "$s" != sqlite ]; then
    scripts/services.sh || exit 1
    break
  fi
done

cargo build --workspace --all-targets || exit 1
log=$(mktemp)
status=0
for s in $stores; do
  echo "=== tests on store: $s ==="
  DTM_TEST_STORE="$s" cargo test --workspace --lib --bins --tests --no-fail-fast 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .*; ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "stores: $stores"
echo "total: $passed passed, $failed failed"
exit $status

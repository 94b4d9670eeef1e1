#!/usr/bin/env bash
# Time-boxed fuzzing: runs every fuzz target in fuzz/ for SECONDS each
# (default 60) with libFuzzer, on a copy of the committed seed corpus.
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs
# cargo-fuzz when missing. Without nightly it says so and replays the seed
# corpus on stable instead (cargo test --test fuzz_corpus), which is also
# what it does when cargo-fuzz cannot be installed.
#
# Exit status: 0 when no target crashed (or, in the fallback, when the replay
# passed); 1 when a target crashed, ran out of memory or timed out; the
# crash inputs are listed at the end and kept in fuzz/artifacts/<target>/.
#
# Environment:
#   FUZZ_TARGETS        targets to run (default: all of them, one at a time)
#   FUZZ_RSS_LIMIT_MB   libFuzzer -rss_limit_mb (default 2048)
#   FUZZ_MALLOC_LIMIT_MB  libFuzzer -malloc_limit_mb (default 512)
#   FUZZ_TIMEOUT        seconds one input may take (default 10)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS]   (SECONDS per target, a positive integer)" >&2
    exit 2
fi
read -r -a targets <<<"${FUZZ_TARGETS:-load_model parse_plan load_with_external}"
rss_mb="${FUZZ_RSS_LIMIT_MB:-2048}"
malloc_mb="${FUZZ_MALLOC_LIMIT_MB:-512}"
timeout_s="${FUZZ_TIMEOUT:-10}"

replay() {
    echo "fuzz.sh: $1" >&2
    echo "fuzz.sh: falling back to replaying the seed corpus on stable: cargo test --test fuzz_corpus" >&2
    cargo test --locked --test fuzz_corpus
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    replay "the nightly toolchain is not installed, so libFuzzer cannot run (install it with: rustup toolchain install nightly)"
    exit $?
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install --locked cargo-fuzz)" >&2
    if ! cargo install --locked cargo-fuzz; then
        replay "cargo-fuzz is missing and could not be installed"
        exit $?
    fi
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/idprune-fuzz.XXXXXX")"
# The targets' temporary files go here: load_with_external writes a small
# folder per input, which a crashing input leaves behind. On a RAM disk
# that is also several times faster than on a disk-backed /tmp.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    run_tmp="$(mktemp -d /dev/shm/idprune-fuzz.XXXXXX)"
else
    run_tmp="$(mktemp -d "$work/tmp.XXXXXX")"
fi
trap 'rm -rf "$work" "$run_tmp"' EXIT
logs="fuzz/target/fuzz-logs"
mkdir -p "$logs"

echo "fuzz.sh: building the fuzz targets (cargo +nightly fuzz build)" >&2
cargo +nightly fuzz build

failed=()
for target in "${targets[@]}"; do
    # libFuzzer adds what it finds to the corpus folder it is given: give it a
    # copy, so the committed seed corpus stays as it is.
    corpus="$work/corpus/$target"
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    cp -R "fuzz/corpus/$target/." "$corpus/"
    log="$logs/$target.log"
    echo "fuzz.sh: $target for ${seconds}s (rss limit ${rss_mb} MB, malloc limit ${malloc_mb} MB), log in $log" >&2
    set +e
    TMPDIR="$run_tmp" cargo +nightly fuzz run "$target" "$corpus" -- \
        -max_total_time="$seconds" \
        -rss_limit_mb="$rss_mb" \
        -malloc_limit_mb="$malloc_mb" \
        -timeout="$timeout_s" \
        -print_final_stats=1 \
        >"$log" 2>&1
    status=$?
    set -e
    grep -E '^(#[0-9]+.*(INITED|DONE)|Done [0-9]+ runs|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' "$log" >&2 || true
    if [ "$status" -ne 0 ]; then
        echo "fuzz.sh: $target FAILED (exit $status); from its log ($log):" >&2
        # The panic message or sanitizer report and the first frames.
        grep -m 1 -A 24 -E "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$log" >&2 \
            || tail -n 40 "$log" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo >&2
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    for target in "${failed[@]}"; do
        grep -ho 'Test unit written to .*' "$logs/$target.log" | sed "s|^Test unit written to |  $target: |" >&2 || true
    done
    echo "fuzz.sh: reproduce with: cargo +nightly fuzz run TARGET ARTIFACT" >&2
    echo "fuzz.sh: minimise with: cargo +nightly fuzz tmin TARGET ARTIFACT" >&2
    echo "fuzz.sh: (cargo test --test fuzz_corpus replays fuzz/artifacts/ too)" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${targets[*]} (${seconds}s each)" >&2

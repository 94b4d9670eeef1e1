#!/usr/bin/env bash
# Time-boxed fuzzing: runs every fuzz target in fuzz/ for SECONDS each
# (default 60) with libFuzzer, on a copy of the committed seed corpus.
#
#   scripts/fuzz.sh [SECONDS]
#
# Toolchain: with nightly installed (rustup toolchain install nightly) the
# targets are built with AddressSanitizer, cargo-fuzz's default; without it
# they are built with the default (stable) toolchain and no sanitizer (cargo fuzz build -s none),
# which still gives libFuzzer's coverage guidance, debug assertions and
# overflow checks, its RSS limit and timeouts; the allocation cap that
# libFuzzer's -malloc_limit_mb gives under a sanitizer comes from the
# targets' own allocator there (fuzz/alloc_cap.rs). Installs cargo-fuzz
# when missing. If cargo-fuzz cannot be installed it says so and replays the
# seed corpus instead (cargo test --test fuzz_corpus), unless FUZZ_STRICT=1,
# where that is a failure (CI).
#
# Exit status: 0 when no target crashed; 1 when a target crashed, ran out
# of memory or timed out (the crash inputs are listed at the end and kept
# in fuzz/artifacts/<target>/), or when FUZZ_STRICT=1 and libFuzzer could
# not run; 2 on a usage error.
#
# Environment:
#   FUZZ_TARGETS          targets to run (default: all of them, one at a time)
#   FUZZ_TOOLCHAIN        nightly or default (default: nightly when installed)
#   FUZZ_SANITIZER        address or none (default: address with nightly, none without)
#   FUZZ_SEED             libFuzzer -seed, for a repeatable run (default: random)
#   FUZZ_RSS_LIMIT_MB     libFuzzer -rss_limit_mb (default 2048)
#   FUZZ_MALLOC_LIMIT_MB  libFuzzer -malloc_limit_mb (default 512; sanitizer builds only)
#   FUZZ_TIMEOUT          seconds one input may take (default 10)
#   FUZZ_STRICT           1: fail instead of falling back to the replay
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
strict="${FUZZ_STRICT:-0}"
seed_args=()
if [ -n "${FUZZ_SEED:-}" ]; then
    if ! [[ "$FUZZ_SEED" =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz.sh: FUZZ_SEED must be a positive integer, not '$FUZZ_SEED'" >&2
        exit 2
    fi
    seed_args=(-seed="$FUZZ_SEED")
fi

replay() {
    echo "fuzz.sh: $1" >&2
    if [ "$strict" = 1 ]; then
        echo "fuzz.sh: FUZZ_STRICT=1: not falling back to the corpus replay" >&2
        exit 1
    fi
    echo "fuzz.sh: falling back to replaying the seed corpus on stable: cargo test --test fuzz_corpus" >&2
    cargo test --locked --test fuzz_corpus
    exit $?
}

toolchain="${FUZZ_TOOLCHAIN:-}"
if [ -z "$toolchain" ]; then
    if cargo +nightly --version >/dev/null 2>&1; then toolchain=nightly; else toolchain=default; fi
fi
case "$toolchain" in
    nightly)
        toolchain_arg=(+nightly)
        sanitizer="${FUZZ_SANITIZER:-address}"
        ;;
    default)
        toolchain_arg=()
        sanitizer="${FUZZ_SANITIZER:-none}"
        ;;
    *)
        echo "fuzz.sh: FUZZ_TOOLCHAIN must be nightly or default, not '$toolchain'" >&2
        exit 2
        ;;
esac
case "$sanitizer" in
    none) ;;
    address)
        if [ "$toolchain" != nightly ]; then
            echo "fuzz.sh: FUZZ_SANITIZER=address needs the nightly toolchain (rustup toolchain install nightly)" >&2
            exit 2
        fi
        ;;
    *)
        echo "fuzz.sh: FUZZ_SANITIZER must be address or none, not '$sanitizer'" >&2
        exit 2
        ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install --locked cargo-fuzz --version 0.13.2)" >&2
    if ! cargo install --locked cargo-fuzz --version 0.13.2; then
        replay "cargo-fuzz is missing and could not be installed"
    fi
fi

# One build folder per toolchain and sanitizer, so switching between them
# does not rebuild everything. 16 codegen units: about half the build time
# of cargo-fuzz's default of 1, for a few percent of fuzzing speed.
build_args=(--sanitizer "$sanitizer" --codegen-units 16 --target-dir "fuzz/target/$toolchain-$sanitizer")

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
logs="fuzz/target/fuzz-logs/$toolchain-$sanitizer"
mkdir -p "$logs"

echo "fuzz.sh: building the fuzz targets ($toolchain toolchain, sanitizer $sanitizer)" >&2
build_start=$SECONDS
if ! cargo "${toolchain_arg[@]}" fuzz build "${build_args[@]}"; then
    echo "fuzz.sh: building the fuzz targets failed" >&2
    exit 1
fi
echo "fuzz.sh: the build took $((SECONDS - build_start)) s" >&2

failed=()
for target in "${targets[@]}"; do
    # libFuzzer adds what it finds to the corpus folder it is given: give it a
    # copy, so the committed seed corpus stays as it is.
    corpus="$work/corpus/$target"
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    cp -R "fuzz/corpus/$target/." "$corpus/"
    log="$logs/$target.log"
    echo "fuzz.sh: $target for ${seconds}s (rss limit ${rss_mb} MB, allocation limit ${malloc_mb} MB), log in $log" >&2
    set +e
    TMPDIR="$run_tmp" cargo "${toolchain_arg[@]}" fuzz run "${build_args[@]}" "$target" "$corpus" -- \
        "${seed_args[@]}" \
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
    echo "fuzz.sh: reproduce with: cargo ${toolchain_arg[*]} fuzz run ${build_args[*]} TARGET ARTIFACT" >&2
    echo "fuzz.sh: minimise with: cargo ${toolchain_arg[*]} fuzz tmin ${build_args[*]} TARGET ARTIFACT" >&2
    echo "fuzz.sh: (cargo test --test fuzz_corpus replays fuzz/artifacts/ too)" >&2
    exit 1
fi
echo "fuzz.sh: no crash in ${targets[*]} (${seconds}s each, $toolchain toolchain, sanitizer $sanitizer)" >&2

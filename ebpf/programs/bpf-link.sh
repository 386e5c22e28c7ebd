#!/usr/bin/env bash
# Linker for Ferry's eBPF programs (see ../../shared recipe and
# docs/development.md). rustc builds the crate for the host target as LLVM
# bitcode (-Clinker-plugin-lto) and calls this script like `cc`. We keep
# `-o OUT` and the object/archive inputs, export every unmangled symbol the
# crate defines (without an export list bpf-linker internalises and drops
# every program) and let bpf-linker retarget the bitcode to BPF.
set -euo pipefail

LLVM_BIN=${FERRY_LLVM_BIN:-/usr/lib/llvm-22/bin}
BPF_LINKER=${FERRY_BPF_LINKER:-bpf-linker}

expand_args() {
  local a
  for a in "$@"; do
    if [[ $a == @* && -f ${a:1} ]]; then
      # rustc passes long command lines through an argument file.
      local line
      while IFS= read -r line || [[ -n $line ]]; do
        printf '%s\n' "$line"
      done <"${a:1}"
    else
      printf '%s\n' "$a"
    fi
  done
}

out=""
inputs=()
next_is_out=0
while IFS= read -r arg; do
  if ((next_is_out)); then
    out=$arg
    next_is_out=0
    continue
  fi
  case "$arg" in
    -o) next_is_out=1 ;;
    -o*) out=${arg#-o} ;;
    -*) ;;
    *.o | *.rlib | *.a) inputs+=("$arg") ;;
  esac
done < <(expand_args "$@")

if [[ -z $out || ${#inputs[@]} -eq 0 ]]; then
  echo "bpf-link.sh: no output or no inputs in: $*" >&2
  exit 1
fi

# Unmangled symbols defined by the crate's own bitcode: programs and maps.
# Compiler intrinsics (mem*, __*) stay internal.
exports=$(mktemp)
trap 'rm -f "$exports"' EXIT
for f in "${inputs[@]}"; do
  case "$f" in
    */libcore-* | */libcompiler_builtins-* | */librustc_std_workspace_core-*) continue ;;
  esac
  "$LLVM_BIN/llvm-nm" --defined-only --extern-only --format=just-symbols "$f" 2>/dev/null || true
done | grep -Ev '^(_ZN|_R|__|mem(cpy|set|move|cmp)$|bcmp$|rust_)' | grep -Ev ':$' | grep -v '^$' | sort -u >"$exports" || true

if [[ ! -s $exports ]]; then
  echo "bpf-link.sh: no exported symbol found in the inputs (is -Clinker-plugin-lto set?)" >&2
  exit 1
fi

export_args=()
while IFS= read -r sym; do
  export_args+=(--export "$sym")
done <"$exports"

exec "$BPF_LINKER" --target bpfel --cpu v3 --btf "${export_args[@]}" -o "$out" "${inputs[@]}"

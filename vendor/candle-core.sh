#!/usr/bin/env bash
# Re-create vendor/candle-core from the crates.io release of candle-core plus our patches
# (vendor/patches/candle-core-*.patch, applied in name order; vendor/README.md says what each
# changes and why).
#
#   vendor/candle-core.sh           write vendor/candle-core from the release and the patches
#   vendor/candle-core.sh --check   only compare: exit 1 if vendor/candle-core differs (CI)
#
# The release is downloaded from crates.io (or taken from $CANDLE_CORE_CRATE, a .crate file) and
# checked against its SHA-256 (the checksum crates.io lists for the release).
set -euo pipefail
# A relative $CANDLE_CORE_CRATE is taken from where the script was started.
if [ -n "${CANDLE_CORE_CRATE:-}" ]; then
  CANDLE_CORE_CRATE="$(cd "$(dirname "$CANDLE_CORE_CRATE")" && pwd)/$(basename "$CANDLE_CORE_CRATE")"
fi
cd "$(dirname "$0")/.."
for tool in curl patch sha256sum tar diff; do
  command -v "$tool" >/dev/null || {
    echo "$0 needs $tool (for example: apt-get install -y curl patch coreutils tar diffutils)" >&2
    exit 1
  }
done

VERSION=0.11.1
SHA256=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325
mode="${1:-write}"
case "$mode" in write | --check) ;; *)
  echo "usage: $0 [--check]" >&2
  exit 2
  ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
crate="${CANDLE_CORE_CRATE:-}"
if [ -z "$crate" ]; then
  crate="$tmp/candle-core-$VERSION.crate"
  curl -sSfL --retry 3 -o "$crate" \
    "https://static.crates.io/crates/candle-core/candle-core-$VERSION.crate" || {
    echo "cannot download candle-core $VERSION from crates.io (set CANDLE_CORE_CRATE to a copy)" >&2
    exit 1
  }
fi
echo "$SHA256  $crate" | sha256sum -c --quiet - || {
  echo "$crate is not the candle-core $VERSION release (SHA-256 differs)" >&2
  exit 1
}
tar xzf "$crate" -C "$tmp"
src="$tmp/candle-core-$VERSION"
rm -f "$src/.cargo_vcs_info.json"
for p in vendor/patches/candle-core-*.patch; do
  patch -s -p1 -d "$src" --no-backup-if-mismatch -F0 <"$(pwd)/$p" || {
    echo "$p does not apply to candle-core $VERSION" >&2
    exit 1
  }
done

if [ "$mode" = --check ]; then
  if diff -r "$src" vendor/candle-core >"$tmp/diff"; then
    echo "vendor/candle-core = candle-core $VERSION + $(ls vendor/patches/candle-core-*.patch | wc -l) patches"
  else
    head -40 "$tmp/diff" >&2
    echo "vendor/candle-core differs from candle-core $VERSION + vendor/patches (regenerate the patches, or run $0)" >&2
    exit 1
  fi
else
  rm -rf vendor/candle-core
  cp -r "$src" vendor/candle-core
  echo "wrote vendor/candle-core (candle-core $VERSION + patches)"
fi

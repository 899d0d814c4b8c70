#!/usr/bin/env bash
# Re-create the vendored crates (vendor/<crate>) from their crates.io releases plus our patches
# (vendor/patches/<crate>-NNNN-*.patch, applied in name order; vendor/README.md says what each changes
# and why).
#
#   vendor/vendor.sh           write every vendor/<crate> from its release and its patches
#   vendor/vendor.sh --check   only compare: exit 1 if a vendor/<crate> differs (CI)
#
# Each release is downloaded from crates.io, or taken from $VENDOR_CRATE_DIR, a directory that
# must hold every <crate>-<version>.crate file (such as one of cargo's download caches, named in
# full: VENDOR_CRATE_DIR=~/.cargo/registry/cache/index.crates.io-<hash>; a glob is not expanded
# in an assignment); either way it is checked against
# its SHA-256 (the checksum crates.io lists for the release, as in Cargo.lock). A crate's patches
# are vendor/patches/<crate>-NNNN-*.patch (four digits after the name, so that one crate's
# patches never match another's whose name begins with its own, such as gemm and gemm-common).
set -euo pipefail
# A relative $VENDOR_CRATE_DIR is taken from where the script was started.
if [ -n "${VENDOR_CRATE_DIR:-}" ]; then
  VENDOR_CRATE_DIR="$(cd "$VENDOR_CRATE_DIR" && pwd)"
fi
cd "$(dirname "$0")/.."
for tool in curl patch sha256sum tar diff; do
  command -v "$tool" >/dev/null || {
    echo "$0 needs $tool (for example: apt-get install -y curl patch coreutils tar diffutils)" >&2
    exit 1
  }
done

# crate, version, SHA-256 of the .crate file
CRATES=(
  "candle-core 0.11.1 d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325"
  "gemm-common 0.19.0 88027625910cc9b1085aaaa1c4bc46bb3a36aad323452b33c25b5e4e7c8e2a3e"
)
mode="${1:-write}"
case "$mode" in write | --check) ;; *)
  echo "usage: $0 [--check]" >&2
  exit 2
  ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for entry in "${CRATES[@]}"; do
  read -r name version sha256 <<<"$entry"
  crate="$tmp/$name-$version.crate"
  if [ -n "${VENDOR_CRATE_DIR:-}" ]; then
    cp "$VENDOR_CRATE_DIR/$name-$version.crate" "$crate" || {
      echo "VENDOR_CRATE_DIR=$VENDOR_CRATE_DIR holds no $name-$version.crate (unset it to download from crates.io)" >&2
      exit 1
    }
  else
    curl -sSfL --retry 3 -o "$crate" \
      "https://static.crates.io/crates/$name/$name-$version.crate" || {
      echo "cannot download $name $version from crates.io (set VENDOR_CRATE_DIR to a directory holding $name-$version.crate)" >&2
      exit 1
    }
  fi
  echo "$sha256  $crate" | sha256sum -c --quiet - || {
    echo "$crate is not the $name $version release (SHA-256 differs)" >&2
    exit 1
  }
  tar xzf "$crate" -C "$tmp"
  src="$tmp/$name-$version"
  rm -f "$src/.cargo_vcs_info.json"
  patches=(vendor/patches/"$name"-[0-9][0-9][0-9][0-9]-*.patch)
  for p in "${patches[@]}"; do
    [ -e "$p" ] || continue
    patch -s -p1 -d "$src" --no-backup-if-mismatch -F0 <"$(pwd)/$p" || {
      echo "$p does not apply to $name $version" >&2
      exit 1
    }
  done
  n=0
  for p in "${patches[@]}"; do [ -e "$p" ] && n=$((n + 1)); done

  if [ "$mode" = --check ]; then
    if diff -r "$src" "vendor/$name" >"$tmp/diff"; then
      echo "vendor/$name = $name $version + $n patches"
    else
      head -40 "$tmp/diff" >&2
      echo "vendor/$name differs from $name $version + vendor/patches (regenerate the patches, or run $0)" >&2
      status=1
    fi
  else
    rm -rf "vendor/$name"
    cp -r "$src" "vendor/$name"
    echo "wrote vendor/$name ($name $version + $n patches)"
  fi
done
exit $status

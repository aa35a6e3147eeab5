#!/usr/bin/env bash
# Idempotent setup for building and testing beamredir on a fresh Debian machine.
# Everything the build and the tests need is installed here, so nothing done by hand is
# relied on. A second run only checks (a few seconds). See ../shared/notes/toolchain.md.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

# Debian packages used by the tests and the demo (real Erlang/Elixir peers, netns, bpftool,
# tinyproxy: the HTTP CONNECT proxy in front of the simulated API server). For `remsh`/`observer`
# (tests/tests/connect.rs): erlang-ssl and openssl (TLS distribution with test certificates),
# erlang-observer, xvfb (an X server with no screen) and xauth (its cookie), x11-utils (xwininfo),
# x11-apps (xwd) and imagemagick (the screenshot as PNG). The shells and man that check the
# completion scripts and man pages; musl-tools for the static release build of `cargo xtask
# dist`, binutils for its strip and objdump -T.
DEB_PACKAGES=(erlang-base erlang-crypto elixir iproute2 util-linux bpftool iptables python3 socat tinyproxy
  erlang-ssl openssl erlang-observer xvfb xauth x11-utils x11-apps imagemagick
  bash zsh fish man-db groff-base musl-tools binutils)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    log "need root to install Debian packages: ${missing[*]} (run with sudo)"; exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests run their own tinyproxy inside a test namespace; none should serve the host.
  if [[ " ${missing[*]} " == *" tinyproxy "* ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now tinyproxy >/dev/null 2>&1 || true
  fi
fi

# eBPF build: nightly + rust-src (for -Z build-std=core).
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"; rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"; rustup component add rust-src --toolchain nightly
fi

# bpf-linker, linked against the nightly's own LLVM (the only LLVM the machine has).
SYSROOT=$(rustc +nightly --print sysroot)
llvm_so=$(ls "$SYSROOT"/lib/libLLVM.so.* 2>/dev/null | head -n1 || true)
if [ -z "$llvm_so" ]; then log "no libLLVM in $SYSROOT/lib: cannot build bpf-linker"; exit 1; fi
llvm_major=$(basename "$llvm_so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version >/dev/null 2>&1; then
  ln -sf "$llvm_so" "$SYSROOT/lib/libLLVM.so"
  log "building bpf-linker against LLVM $llvm_major from the nightly toolchain (~70 s)"
  LLVM_PREFIX="$SYSROOT" cargo +stable install --locked bpf-linker --version 0.13.0 \
    --no-default-features --features "llvm-$llvm_major"
fi
# The official Python Kubernetes client: an independent check of the simulated API server.
if ! python3 -c "import kubernetes" >/dev/null 2>&1; then
  log "installing the Python kubernetes client (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "kubernetes==37.0.2"
fi
# JSON Schema validation of `beamredir status -o json` against docs/status.schema.json.
if ! python3 -c "import jsonschema, sys; sys.exit(not hasattr(jsonschema, 'Draft202012Validator'))" >/dev/null 2>&1; then
  log "installing the Python jsonschema validator (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "jsonschema==4.26.0"
fi
# `cargo xtask dist` builds a static binary: the musl target's standard library.
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  log "adding the x86_64-unknown-linux-musl target (static release builds)"
  rustup target add x86_64-unknown-linux-musl
fi
# kubectl (the other independent client) ships with these machines; say so if it is missing.
command -v kubectl >/dev/null 2>&1 || log "warning: kubectl not found; the kubectl fidelity test will fail"

# `setup.sh --vm` (cargo xtask test --vm): QEMU, a static busybox for the guest's initramfs, and
# Debian bookworm's generic 6.1 kernel (vmlinuz + modules, for 9p and overlayfs), unpacked
# from its .deb into target/vm/ (or $BEAMREDIR_VM_DIR). The newest bookworm kernel is the one
# the linux-image-amd64 metapackage depends on; an already unpacked one is kept.
if [ "${1:-}" = --vm ]; then
  VM_PACKAGES=(qemu-system-x86 busybox-static)
  missing=()
  for p in "${VM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    [ "$(id -u)" = 0 ] || { log "need root to install Debian packages: ${missing[*]} (run with sudo)"; exit 1; }
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  root=$(cd "$(dirname "$0")/.." && pwd)
  vm_dir=${BEAMREDIR_VM_DIR:-${CARGO_TARGET_DIR:-$root/target}/vm}
  mkdir -p "$vm_dir"
  if [ ! -e "$vm_dir/kernel/ready" ]; then
    newest_kernel() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1\./ {print $2; exit}'; }
    tmp=$(mktemp -d "$vm_dir/kernel.XXXXXX")
    kpkg=$(newest_kernel)
    # apt-get download writes into the current directory, as root (not as _apt, who cannot
    # write here). Stale package lists name a kernel the mirror no longer has: update, retry.
    if [ -z "$kpkg" ] || ! (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "$kpkg"); then
      apt-get update -qq
      kpkg=$(newest_kernel)
      [ -n "$kpkg" ] || { log "no bookworm 6.1 kernel package found (apt-cache depends linux-image-amd64)"; exit 1; }
      (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "$kpkg")
    fi
    log "unpacking $kpkg into $vm_dir/kernel"
    dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/root"
    rm -f "$tmp"/*.deb
    ls "$tmp"/root/boot/vmlinuz-* >/dev/null && ls -d "$tmp"/root/lib/modules/* >/dev/null
    echo "$kpkg" > "$tmp/root/package"
    rm -rf "$vm_dir/kernel"
    mv "$tmp/root" "$vm_dir/kernel" && rmdir "$tmp"
    touch "$vm_dir/kernel/ready"
  fi
  log "vm ok ($(cat "$vm_dir/kernel/package") in $vm_dir/kernel, qemu, busybox-static)"
fi
log "ok (nightly rust-src, bpf-linker, musl target, Debian packages, Python kubernetes and jsonschema)"

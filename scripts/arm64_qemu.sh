#!/usr/bin/env bash
# lmrt on arm64 Linux, emulated with qemu-user on an x86 machine: a Debian bookworm arm64 root
# (debootstrap) under .compat-envs/arm64-root, the CPU onnxruntime wheel for aarch64 from PyPI, lmrt
# from this working tree, then scripts/compat_worker.py over model directories exported on x86. Its
# tokens and logits are compared with the same directories run here, on x86, by compat_matrix.py.
#
#   sudo scripts/arm64_qemu.sh MODEL_DIR...          (ORT_VERSION=1.23.2 to pin the wheel)
#
# Perplexity is not measured there (emulated scoring takes too long): greedy tokens and logits are.
# Needs root (debootstrap, chroot, binfmt_misc) and Debian's qemu-user-static, binfmt-support and
# debootstrap packages (installed here when missing). Emulation is slow: minutes per model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 MODEL_DIR..." >&2; exit 2; }
ROOT=.compat-envs/arm64-root
OUT=.compat-envs/results/arm64
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y -qq qemu-user-static binfmt-support debootstrap
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  mountpoint -q /proc/sys/fs/binfmt_misc || mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64
fi
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOT" "$MIRROR"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"  # this machine's CAs (a proxy's too) for pip

# this working tree (tracked and new files, not ignored ones) and the model directories
rm -rf "$ROOT/work/lmrt" "$ROOT/work/models" "$ROOT/work/out"
mkdir -p "$ROOT/work/lmrt" "$ROOT/work/models"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$ROOT/work/lmrt"
for m in "$@"; do cp -al "$(realpath "$m")" "$ROOT/work/models/" 2>/dev/null || cp -r "$(realpath "$m")" "$ROOT/work/models/"; done
FORCED=$(ls -d .compat-envs/results/reference-*/forced.json 2>/dev/null | tail -1)  # x86's tokens, from compat_matrix.py
[ -n "$FORCED" ] && cp "$FORCED" "$ROOT/work/forced.json" || echo '{}' > "$ROOT/work/forced.json"

mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc"' EXIT
PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_FIND_LINKS= chroot "$ROOT" /bin/bash -euc "
  cd /work
  [ -x venv/bin/python ] || python3 -m venv venv
  venv/bin/pip install -q 'onnxruntime${ORT_VERSION:+==$ORT_VERSION}' numpy tokenizers jinja2 click
  venv/bin/pip install -q --no-deps ./lmrt
  uname -m; venv/bin/python -c 'import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)'
  venv/bin/lmrt doctor models/\$(ls models | head -1)
  LMRT_COMPAT_SCORED_TOKENS=0 venv/bin/python lmrt/scripts/compat_worker.py out models/* --forced forced.json
"
rm -rf "$OUT" && mkdir -p "$OUT" && cp "$ROOT"/work/out/* "$OUT/"
echo "arm64 results in $OUT; compare: .venv/bin/python scripts/compat_matrix.py --compare $OUT --models $*"

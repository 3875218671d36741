#!/usr/bin/env bash
# Show (not assume) that the portable backend trains on Linux aarch64 (Jetson, Raspberry Pi 5 class):
# build an arm64 Debian root with debootstrap, run it under qemu-user-static, install the aarch64 wheels
# of edge-peft[device-portable] there (plain onnxruntime, no torch), train a tiny portable artifact a
# few steps, generate, and print the versions. Needs root (debootstrap, chroot, binfmt) and the main
# .venv (to export the artifact on this machine). Slow under emulation: not part of CI.
# Usage: sudo scripts/verify_aarch64.sh [WORK_DIR]   (default /tmp/edge-peft-aarch64)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/tmp/edge-peft-aarch64}"
rootfs="$work/rootfs"
mkdir -p "$work"

if ! command -v debootstrap >/dev/null || [ ! -e /usr/bin/qemu-aarch64-static ]; then
  apt-get update -qq && apt-get install -y -qq debootstrap qemu-user-static binfmt-support
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -x "$rootfs/usr/bin/python3" ]; then
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs"
fi

# A tiny causal LM exported here (x86-64, torch) with the portable graphs only.
"$root/.venv/bin/python" - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import toy
from edge_peft.exporter.pipeline import ExportOptions, export_artifact
work = Path(sys.argv[1])
model = toy.make_model("gpt2", work / "model")
export_artifact(model, work / "artifact", ExportOptions(rank=4, alpha=8, max_seq_len=32, seed=7, backend="portable",
                                                        targets=toy.TARGETS["gpt2"]), quiet=True, overwrite=True)
toy.write_jsonl(work / "lm.jsonl", toy.lm_rows(48))
PY

rm -rf "$rootfs/opt/edge-peft" "$rootfs/opt/work"
mkdir -p "$rootfs/opt/edge-peft" "$rootfs/opt/work"
cp -r "$root/edge_peft" "$root/pyproject.toml" "$root/README.md" "$rootfs/opt/edge-peft/"
cp -r "$work/artifact" "$work/lm.jsonl" "$rootfs/opt/work/"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$rootfs/etc/pip.conf"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"  # this machine's trust, proxies included
for d in /opt/wheels /opt/pypi /opt/pypi-more; do  # local package mirrors this machine's pip.conf may name
  if [ -d "$d" ]; then mkdir -p "$rootfs$d"; mount --bind "$d" "$rootfs$d"; fi
done
mount -t proc proc "$rootfs/proc"  # no /sys: the host's x86 CPU list there crashes onnxruntime's cpuinfo under qemu
cleanup() {
  umount "$rootfs/proc" || true
  for d in /opt/wheels /opt/pypi /opt/pypi-more; do mountpoint -q "$rootfs$d" && umount "$rootfs$d"; done
  return 0
}
trap cleanup EXIT

chroot "$rootfs" /bin/bash -euo pipefail -c '
  cd /opt/work
  uname -m
  [ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
  /opt/venv/bin/pip install --quiet "/opt/edge-peft[device-portable]"
  /opt/venv/bin/python -c "import importlib.util as u, onnxruntime, platform; assert u.find_spec(\"torch\") is None; print(platform.machine(), \"python\", platform.python_version(), \"onnxruntime\", onnxruntime.__version__)"
  rm -rf run
  time /opt/venv/bin/edge-peft train artifact --data lm.jsonl --out run --steps 6 --batch-size 4 --lr 1e-2 \
    --eval-every 3 --checkpoint-every 3 --quiet
  /opt/venv/bin/edge-peft generate run --prompt "the cat" --max-new-tokens 5
  cut -c1-80 run/metrics.jsonl
'
echo "aarch64 verification passed ($(date -u +%Y-%m-%d))"

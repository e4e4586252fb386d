#!/bin/bash
# Boots Debian's kernel under QEMU (TCG) with only cgroup v2 mounted and runs
# tests/integration/cgroup2_guest.lua in it with this build's clawlua: the jail's cgroup v2
# limits (memory.max, pids.max, cpu.max) checked on a real kernel, on a host whose own memory,
# pids and cpu controllers are bound to cgroup v1.
#
# usage: cgroup2_guest.sh BUILD_DIR WORK_DIR     prints the guest's console; exit 0 when it ran
# Exit 77: a prerequisite is missing (no qemu-system-x86_64, the kernel package cannot be had).
set -euo pipefail
build=$(cd "$1" && pwd)
work=$2
src=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$work"
work=$(cd "$work" && pwd)
command -v qemu-system-x86_64 >/dev/null || { echo "no qemu-system-x86_64"; exit 77; }

# The kernel: Debian's, fetched once with apt-get download and kept in WORK_DIR (under a lock:
# ctest runs the spec in both hosts at once).
exec 9>"$work/.lock"
flock 9
kernel=$(ls "$work"/vmlinuz-* 2>/dev/null | head -1 || true)
if [ -z "$kernel" ]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { echo "cannot find Debian's kernel package"; exit 77; }
  (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "apt-get download $pkg failed"; exit 77; }
  rm -rf "$work/deb" && dpkg -x "$work"/"$pkg"_*.deb "$work/deb"
  cp "$work"/deb/boot/vmlinuz-* "$work"/
  rm -rf "$work/deb" "$work"/"$pkg"_*.deb
  kernel=$(ls "$work"/vmlinuz-* | head -1)
fi
flock -u 9

# Everything else is this run's own.
run=$(mktemp -d "$work/run.XXXXXX")
trap 'rm -rf "$run"' EXIT

# The initramfs: busybox, the clawlua host with the libraries it links, the static probe.
root="$run/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib64,usr/lib/x86_64-linux-gnu,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
for a in sh mount umount mkdir cat echo poweroff sleep cp switch_root unshare; do
  ln -s busybox "$root/bin/$a"
done
cp "$build/bin/clawlua" "$build/bin/clawlua-probe" "$root/bin/"
for lib in $(ldd "$build/bin/clawlua" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp "$src/tests/integration/cgroup2_guest.lua" "$root/test.lua"
# pivot_root cannot leave the initramfs (rootfs): the first stage moves onto a tmpfs.
cat > "$root/init" <<'INIT'
#!/bin/sh
mkdir /newroot
mount -t tmpfs -o size=200m root /newroot
cp -a /bin /lib /lib64 /usr /test.lua /init2 /newroot/
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp
exec switch_root /newroot /init2
INIT
cat > "$root/init2" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
echo "GUEST controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
/bin/clawlua /test.lua
echo "GUEST exit $?"
# as under `ip netns exec`: a mount namespace of its own (a slave) with a fresh sysfs, no cgroup2
# mounted: the runtime mounts cgroup2 itself there
unshare -m --propagation slave sh -c 'umount -l /sys && mount -t sysfs sys /sys && exec /bin/clawlua /test.lua private'
echo "GUEST private_exit $?"
poweroff -f
INIT
chmod +x "$root/init" "$root/init2"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$run/initrd.gz")

khz=$(awk '/cpu MHz/ {printf "%d", $4 * 1000; exit}' /proc/cpuinfo)
timeout 600 qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 512 -smp 1 -nographic \
  -no-reboot -kernel "$kernel" -initrd "$run/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 tsc_early_khz=$khz tsc=reliable cgroup_no_v1=all rdinit=/init" \
  </dev/null

#!/bin/busybox sh
# PID 1 of beamredir's test VM (`cargo xtask test --vm`), run from the initramfs that
# xtask/src/vm.rs builds. Only busybox is available here. It
#   1. mounts /proc, /sys, /dev and loads the modules listed in /vm/modules.order
#      (virtio-pci, 9p, overlayfs: modules in Debian's generic kernel);
#   2. builds the guest's root in a tmpfs: each host directory listed in /vm/shares arrives
#      over 9p, read-only, and gets a tmpfs overlay on top, so the guest can write anywhere
#      while nothing reaches the host; /run, /tmp, /dev, /proc, /sys, cgroup2 and bpffs are
#      the guest's own;
#   3. runs /vm/plan with the host's /bin/sh, chrooted into that root;
#   4. prints BEAMREDIR-VM-EXIT=<plan's exit code> on the console (the host reads it) and
#      powers off.
# With `beamredir.probe` on the kernel command line it only proves the guest boots (the KVM
# probe) and powers off.
/bin/busybox mkdir -p /proc /sys /dev /bin
/bin/busybox --install -s /bin
export PATH=/bin

finish() {
    echo "BEAMREDIR-VM-EXIT=$1"
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}
fail() {
    echo "beamredir-vm: init: $*"
    finish 125
}

mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sysfs /sys || fail "mounting /sys"
mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"

if grep -qw beamredir.probe /proc/cmdline; then
    echo "BEAMREDIR-VM-BOOTED"
    finish 0
fi

while read -r m; do
    insmod "/vm/modules/$m.ko" || fail "insmod $m"
done </vm/modules.order

R=/newroot
mkdir -p $R /lower /upper
mount -t tmpfs -o mode=755 root $R || fail "tmpfs root"
mount -t tmpfs -o mode=755 upper /upper || fail "tmpfs upper"
while read -r tag path; do
    mkdir -p "/lower/$tag" "/upper/$tag/data" "/upper/$tag/work" "$R$path"
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose "$tag" "/lower/$tag" ||
        fail "mounting 9p share $tag ($path)"
    mount -t overlay overlay -o "lowerdir=/lower/$tag,upperdir=/upper/$tag/data,workdir=/upper/$tag/work" "$R$path" ||
        fail "overlay on $path"
done </vm/shares
while read -r name target; do
    ln -s "$target" "$R/$name"
done </vm/links

mkdir -p $R/proc $R/sys $R/dev $R/run $R/tmp $R/var/tmp $R/var/lib $R/root $R/home
chmod 1777 $R/tmp $R/var/tmp
ln -s /run $R/var/run
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "mounting cgroup2"
mount -t bpf bpf $R/sys/fs/bpf || fail "mounting bpffs"
hostname beamredir-vm
ip link set lo up

mkdir -p $R/run/beamredir-vm
cp /vm/plan $R/run/beamredir-vm/plan
if grep -qw beamredir.shell /proc/cmdline; then
    chroot $R /bin/sh /run/beamredir-vm/plan
else
    chroot $R /bin/sh /run/beamredir-vm/plan </dev/null
fi
finish $?

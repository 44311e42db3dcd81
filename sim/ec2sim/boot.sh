#!/bin/sh
# PID 1 of an instance: runs inside its own mount, UTS and pid namespace (made by unshare
# with private propagation), so nothing here is visible on the host.
# Args: INSTANCE_DIR HOSTNAME UID
# INSTANCE_DIR, seen inside as /run/ec2sim, may also hold: image/ (layers over PATH
# directories, see below), bootcmd (cloud-config bootcmd as the /bin/sh script cloud-init
# makes of it), the FIFOs `booted` and `power` the daemon reads and, for a slow boot, the
# FIFO `gate` it writes.
set -eu
I=$1; HN=$2; UID_=$3
HERE=${0%/*}
PATH_DIRS="/usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin"

# bind_over FILE NAME: bind FILE over every program NAME on the PATH. A bind mount follows
# symlinks, so /sbin/poweroff -> systemctl covers systemctl (and all its other names); a
# program already covered by FILE (/sbin is /usr/sbin here) is skipped.
bind_over() {
  for d in $PATH_DIRS; do
    if [ -f "$d/$2" ] && [ ! "$d/$2" -ef "$1" ]; then mount --bind "$1" "$d/$2"; fi
  done
}

# bind_each LAYER DIR: where overlayfs is missing, bind each entry of an image layer over
# its program instead (a whiteout becomes an empty, non-executable file: dash's `command -v`
# then finds nothing, bash's still does; a symlink's target is covered with it).
bind_each() {
  for f in "$1"/*; do
    if [ -c "$f" ]; then mount --bind /run/no-such-program "$2/${f##*/}"
    else mount --bind "$f" "$2/${f##*/}"; fi
  done
}

# /run first, and bind the instance dir there: later tmpfs mounts (e.g. /tmp) must not hide
# the host keys and config even if the state dir lives under /tmp.
mount -t tmpfs -o mode=755 ec2sim-run /run
mkdir -p /run/ec2sim /run/sshd
chmod 755 /run/sshd
mount --bind "$I" /run/ec2sim
# The simulator's own files are read now, while the host's tree is all visible: the repo may
# itself live under /tmp (a fresh clone), which the tmpfs below hides.
cp "$HERE/power.sh" /run/ec2sim-power
chmod 0755 /run/ec2sim-power

# Private /dev: only the basics plus the volumes we mknod later (host loop devices stay hidden).
mount -t tmpfs -o mode=755 ec2sim-dev /dev
cd /dev
mknod -m 666 null c 1 3; mknod -m 666 zero c 1 5; mknod -m 666 full c 1 7
mknod -m 666 random c 1 8; mknod -m 666 urandom c 1 9; mknod -m 666 tty c 5 0
mkdir -p pts shm disk/by-id
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts /dev/pts
ln -s pts/ptmx ptmx
mount -t tmpfs -o mode=1777 ec2sim-shm /dev/shm
ln -s /proc/self/fd fd; ln -s /proc/self/fd/0 stdin; ln -s /proc/self/fd/1 stdout; ln -s /proc/self/fd/2 stderr
cd /

mount -t tmpfs -o mode=755 ec2sim-home /home
mkdir -p /home/ec2-user/.ssh
cp /run/ec2sim/authorized_keys /home/ec2-user/.ssh/authorized_keys
chmod 700 /home/ec2-user /home/ec2-user/.ssh
chmod 600 /home/ec2-user/.ssh/authorized_keys
chown -R "$UID_:$UID_" /home/ec2-user
# Hide the host's /root (its shell start-up files would run on every sudo -i) and /tmp.
mount -t tmpfs -o mode=700 ec2sim-root /root
mount -t tmpfs -o mode=1777 ec2sim-tmp /tmp
for f in passwd shadow group hosts hostname; do
  [ -e /etc/$f ] || continue
  mount --bind /run/ec2sim/etc/$f /etc/$f
done
mount --bind /run/ec2sim/etc/sudoers.d /etc/sudoers.d
hostname "$HN"
# What the mounts below bind, made first: once the image is mounted, cp or chmod may be gone.
: > /run/no-such-program
chmod 0444 /run/no-such-program
# The image: programs missing or broken (faults missing-tool, broken-tool, no-python). The
# daemon made a layer for each PATH directory concerned (hostops.write_image); mounted as a
# read-only overlay above that directory, it hides or replaces only those names.
if [ -f /run/ec2sim/image/dirs ]; then
  while read -r d; do
    mount -t overlay ec2sim-image -o "ro,lowerdir=/run/ec2sim/image$d:$d" "$d" ||
      bind_each "/run/ec2sim/image$d" "$d"
  done < /run/ec2sim/image/dirs
fi
# No way to the host's init or systemd: every power command is the simulator's shim.
for p in poweroff shutdown halt reboot systemctl telinit init; do
  bind_over /run/ec2sim-power "$p"
done
# The machine is up: the daemon, waiting for this line, may now put volumes into this /dev.
{ echo booted >&3; } 3<>/run/ec2sim/booted
# A slow boot (timing profile aws): the daemon made the FIFO `gate` and writes a line into
# it once the OS would have booted this far (shell builtins only: a faulted image may lack
# sleep or cat). cloud-init's bootcmd runs next, then sshd, as on EC2.
if [ -p /run/ec2sim/gate ]; then
  { read -r go <&3; } 3<>/run/ec2sim/gate
fi
# cloud-config bootcmd, as cloud-init runs it: early, as root, before sshd, one /bin/sh script
# with INSTANCE_ID set, stdin from /dev/null, output to the boot log; a failure is logged and
# the boot goes on. What it starts in the background stays in this pid namespace, so it dies
# with the instance.
if [ -f /run/ec2sim/bootcmd ]; then
  INSTANCE_ID=${I##*/} /bin/sh /run/ec2sim/bootcmd </dev/null ||
    echo "ec2sim: bootcmd exited with status $?" >&2
fi
exec /usr/sbin/sshd -D -f /run/ec2sim/sshd_config -E /run/ec2sim/sshd.log

#!/bin/sh
# PID 1 of an instance: runs inside its own mount, UTS and pid namespace (made by unshare
# with private propagation), so nothing here is visible on the host.
# Args: INSTANCE_DIR HOSTNAME UID [no-python]
set -eu
I=$1; HN=$2; UID_=$3; IMAGE=${4:-}

# /run first, and bind the instance dir there: later tmpfs mounts (e.g. /tmp) must not hide
# the host keys and config even if the state dir lives under /tmp.
mount -t tmpfs -o mode=755 ec2sim-run /run
mkdir -p /run/ec2sim /run/sshd
chmod 755 /run/sshd
mount --bind "$I" /run/ec2sim

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
# An image without python3: every python3 on the PATH becomes an empty, non-executable file.
if [ "$IMAGE" = no-python ]; then
  : > /run/no-such-program
  chmod 0444 /run/no-such-program
  for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    for p in "$d"/python3*; do
      if [ -f "$p" ]; then mount --bind /run/no-such-program "$p"; fi
    done
  done
fi
exec /usr/sbin/sshd -D -f /run/ec2sim/sshd_config -E /run/ec2sim/sshd.log

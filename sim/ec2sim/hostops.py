"""Host side of an instance: network namespace, veth, private mount namespace, sshd,
loop devices and the device nodes the instance sees. No moto in here."""
import fnmatch
import os
import selectors
import shutil
import signal
import stat
import subprocess

from . import config

SSHD = "/usr/sbin/sshd"
INSTANCE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PATH_DIRS = INSTANCE_PATH.split(":")  # where a fault looks for a program (boot.sh's too)
# A broken program (fault broken-tool): fails as blkid does on an I/O error (status 4).
BROKEN_TOOL = '#!/bin/sh\necho "${0##*/}: simulated failure" >&2\nexit 4\n'
HERE = os.path.dirname(os.path.abspath(__file__))

# Instance families that are Xen-based on EC2 (devices appear as /dev/xvdX); all others are Nitro (NVMe).
XEN_FAMILIES = {"t1", "t2", "m1", "m2", "m3", "m4", "c1", "c3", "c4", "r3", "r4", "x1", "x1e",
                "d2", "g2", "g3", "p2", "i2", "h1", "f1", "cc2", "cr1", "hs1"}

SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
{hostkeys}
PidFile none
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin no
StrictModes yes
MaxSessions 64
MaxStartups 64
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding yes
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def run(args, check=True, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")
    return r


def is_xen(instance_type):
    return (instance_type or "").split(".")[0] in XEN_FAMILIES


def _free_uid(passwd_lines):
    used = {int(l.split(":")[2]) for l in passwd_lines if l.count(":") >= 6}
    uid = 1000
    while uid in used:
        uid += 1
    return uid


def write_etc(idir, hostname, addr):
    """Private /etc/passwd, shadow, group, hosts, hostname and sudoers.d for ec2-user."""
    etc = os.path.join(idir, "etc")
    os.makedirs(os.path.join(etc, "sudoers.d"), exist_ok=True)
    with open("/etc/passwd") as f:
        passwd = [l for l in f.read().splitlines() if not l.startswith("ec2-user:")]
    with open("/etc/group") as f:
        group = [l for l in f.read().splitlines() if not l.startswith("ec2-user:")]
    with open("/etc/shadow") as f:
        shadow = [l for l in f.read().splitlines() if not l.startswith("ec2-user:")]
    uid = _free_uid(passwd)
    passwd.append(f"ec2-user:x:{uid}:{uid}:EC2 Default User:/home/ec2-user:/bin/bash")
    group.append(f"ec2-user:x:{uid}:")
    # '*' (not '!'): with UsePAM no, sshd treats '!' as a locked account.
    shadow.append("ec2-user:*:19000:0:99999:7:::")
    for fname, lines, mode in (("passwd", passwd, 0o644), ("group", group, 0o644),
                               ("shadow", shadow, 0o640)):
        p = os.path.join(etc, fname)
        with open(p, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(p, mode)
    with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n{addr} {hostname}\n")
    with open(os.path.join(etc, "hostname"), "w") as f:
        f.write(hostname + "\n")
    p = os.path.join(etc, "sudoers.d", "90-cloud-init-users")
    with open(p, "w") as f:
        f.write("ec2-user ALL=(ALL) NOPASSWD:ALL\n")
    os.chmod(p, 0o440)
    os.chmod(os.path.join(etc, "sudoers.d"), 0o755)
    return uid


def write_host_keys(idir, given):
    """Host keys: those from cloud-config ssh_keys if any (as cloud-init does), else fresh."""
    kdir = os.path.join(idir, "keys")
    os.makedirs(kdir, mode=0o700, exist_ok=True)
    names = []
    if given:
        for ktype, (priv, pub) in given.items():
            p = os.path.join(kdir, f"ssh_host_{ktype}_key")
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(priv.strip() + "\n")
            if not pub:
                pub = run(["ssh-keygen", "-y", "-f", p]).stdout
            with open(p + ".pub", "w") as f:
                f.write(pub.strip() + "\n")
            names.append(ktype)
    else:
        for ktype in ("ecdsa", "ed25519"):
            p = os.path.join(kdir, f"ssh_host_{ktype}_key")
            run(["ssh-keygen", "-q", "-t", ktype, "-N", "", "-C", "root@localhost", "-f", p])
            names.append(ktype)
    return names


def write_sshd_config(idir, keytypes):
    hostkeys = "\n".join(f"HostKey /run/ec2sim/keys/ssh_host_{t}_key" for t in keytypes)
    with open(os.path.join(idir, "sshd_config"), "w") as f:
        f.write(SSHD_CONFIG.format(hostkeys=hostkeys))


def host_pubkeys(idir):
    kdir = os.path.join(idir, "keys")
    out = []
    if os.path.isdir(kdir):
        for n in sorted(os.listdir(kdir)):
            if n.endswith(".pub"):
                with open(os.path.join(kdir, n)) as f:
                    out.append(f.read().strip())
    return out


def make_net(ledger, tag, block, idx, link):
    ns, hv = config.netns_name(tag, idx), config.veth_name(tag, idx)
    tmp_peer = f"es{tag}i{idx}"
    host, inst = config.addresses(block, idx)
    ledger.add("netns", name=ns)
    run(["ip", "netns", "add", ns])
    ledger.add("link", name=hv)
    run(["ip", "link", "add", hv, "type", "veth", "peer", "name", tmp_peer, "netns", ns])
    run(["ip", "-n", ns, "link", "set", tmp_peer, "name", "eth0"])
    run(["ip", "addr", "add", f"{host}/30", "dev", hv])
    run(["ip", "link", "set", hv, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{inst}/30", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", host])
    if link:
        shape(ns, hv, link)
    return ns, hv, inst


def net_block(ns, host):
    """The instance's network is not up yet (aws profile): it answers nothing, as an EC2
    instance that is still pending or booting. A blackhole route for the host's address in
    the instance's namespace drops every reply (SYN-ACK, RST, ICMP) there; ARP still
    answers, so a connection from the host hangs unanswered, neither refused nor
    unreachable."""
    run(["ip", "-n", ns, "route", "replace", "blackhole", f"{host}/32"])


def net_unblock(ns, host):
    run(["ip", "-n", ns, "route", "del", "blackhole", f"{host}/32"], check=False)


def shape(ns, hv, link):
    """Limit both ends so both directions are shaped. netem does rate+delay; kernels
    without sch_netem (like this VM's) get tbf: rate only, delay ignored with a warning.
    This kernel (6.18, /proc/config.gz) also lacks fq and etf (so no BPF-set departure
    times) and nft's queue; only an iptables NFQUEUE + userspace verdict loop could delay,
    needing the iptables package and a netlink client: not worth its fragility here."""
    ok = True
    for pre, dev in ((["tc"], hv), (["tc", "-n", ns], "eth0")):
        args = pre + ["qdisc", "replace", "dev", dev, "root", "netem", "limit", "100000"]
        if link.get("delay_ms"):
            args += ["delay", f"{link['delay_ms']}ms"]
        if link.get("mbit"):
            args += ["rate", f"{link['mbit']}mbit"]
        if run(args, check=False).returncode != 0:
            ok = False
            # burst must hold at least one full-size frame plus timer slack at this rate.
            burst = max(16 * 1024, int(link.get("mbit", 1000) * 1e6 / 8 / 250))
            run(pre + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                       f"{link['mbit']}mbit", "burst", str(burst), "latency", "100ms"])
    return ok


def unshape(ns, hv):
    run(["tc", "qdisc", "del", "dev", hv, "root"], check=False)
    run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], check=False)


def write_image(idir, missing, broken):
    """How the instance's image differs from the host's: programs missing (shell patterns,
    e.g. python3*) or broken (names). For each PATH directory holding one, a layer under
    INSTANCE_DIR/image that boot.sh mounts as an overlay above that directory: a whiteout (a
    0/0 character device) hides a name, a failing script replaces one. Only that name:
    a symlink's target and its other names stay (mkfs.ext4 broken leaves mke2fs working)."""
    if not missing and not broken:
        return
    layers = {}
    for d in PATH_DIRS:
        real = os.path.realpath(d)
        if real in layers or not os.path.isdir(real):
            continue
        names = os.listdir(real)
        entries = {n: None for pat in missing for n in fnmatch.filter(names, pat)}
        entries.update((n, BROKEN_TOOL) for n in broken if n in names)
        if entries:
            layers[real] = entries
    for real, entries in layers.items():
        top = os.path.join(idir, "image") + real
        os.makedirs(top, exist_ok=True)
        for name, script in entries.items():
            path = os.path.join(top, name)
            if script is None:
                os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            else:
                with open(path, "w") as f:
                    f.write(script)
                os.chmod(path, 0o755)
    if layers:
        with open(os.path.join(idir, "image", "dirs"), "w") as f:
            f.write("".join(d + "\n" for d in layers))


def start_sshd(ledger, idir, ns, hostname, uid):
    """unshare (host pid P) forks PID 1 of a new pid namespace that becomes sshd -D.
    Killing that PID 1 kills every process of the instance, even daemonised ones.
    Returns once boot.sh has made the instance's mounts (its private /dev above all, where
    add_device puts volumes), before its bootcmd and sshd: the machine is up, its OS boots."""
    booted = fifo(idir, "booted")  # boot.sh writes a line into it once its mounts are made
    log = open(os.path.join(idir, "boot.log"), "ab")
    args = ["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--mount", "--uts", "--pid",
            "--fork", "--mount-proc", "--propagation", "private", "--",
            "/bin/sh", os.path.join(HERE, "boot.sh"), idir, hostname, str(uid)]
    try:
        # A clean environment, as a booting machine has: PATH as systemd's (sbin included,
        # for a bootcmd's poweroff), and nothing of the caller's (its AWS keys above all).
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env={"PATH": INSTANCE_PATH})
        config.record_pid(ledger, p.pid, "unshare")
        exited = os.pidfd_open(p.pid)
        try:
            with selectors.DefaultSelector() as sel:  # not select(): fds past 1024
                sel.register(booted, selectors.EVENT_READ)
                sel.register(exited, selectors.EVENT_READ)
                ready = {key.fd for key, _ in sel.select(60)}
        finally:
            os.close(exited)
        if booted not in ready or not os.read(booted, 64):
            raise RuntimeError("instance boot script exited early; see boot.log")
    finally:
        os.close(booted)
        log.close()
    child = children(p.pid)  # boot.sh runs in it: unshare has forked
    if not child:
        raise RuntimeError("instance init process did not appear")
    config.record_pid(ledger, child[0], "init")
    return p, child[0]


def fifo(idir, name):
    """A root-only FIFO in the instance dir (inside: /run/ec2sim/NAME) through which the
    instance tells the simulator something. Returns a non-blocking fd to select on, opened
    read-write: the FIFO then never reads as hung up when a writer closes, and a writer's
    open never blocks."""
    path = os.path.join(idir, name)
    if not os.path.exists(path):
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_sessions(listener):
    """Kill every per-connection sshd under the listener, with everything under them.
    The listener is the instance's PID 1, so what bootcmd left in the background is its
    child too: only sshd children are sessions."""
    n = 0
    for c in children(listener):
        try:
            with open(f"/proc/{c}/comm") as f:
                if not f.read().startswith("sshd"):
                    continue
        except OSError:
            continue
        kill_tree([c] + descendants(c))
        n += 1
    return n


def nsexec(init_pid, script, check=True):
    return run(["nsenter", f"--mount=/proc/{init_pid}/ns/mnt", "--", "/bin/sh", "-c", script],
               check=check)


def loop_attach(ledger, vfile):
    ledger.add("loop", file=vfile)
    dev = run(["losetup", "-f", "--show", vfile]).stdout.strip()
    ledger.add("loop", file=vfile, dev=dev)
    # Direct I/O: the loop device hands its writes to the backing file's disk without copying
    # them into that file's page cache first, so a volume costs the host what an EBS volume
    # costs an instance (the block layer), not a second copy of every byte (~1.9 core-s per GiB
    # here). Best effort: where the backing filesystem cannot, the device stays buffered.
    run(["losetup", "--direct-io=on", dev], check=False)
    # A fresh attachment is writable, as on EC2 (where a detached device is gone): a loop
    # device keeps the read-only flag an earlier helper set on it (`blockdev --setro`).
    run(["blockdev", "--setrw", dev])
    return dev


def loop_minor(dev):
    return os.minor(os.stat(dev).st_rdev)


def device_names(instance_type, requested, vol_id, nvme_index):
    """(node, symlinks) as the instance's udev would create them on EC2."""
    if is_xen(instance_type):
        node = "/dev/xvd" + requested.split("/dev/")[-1].replace("xvd", "").replace("sd", "", 1)
        return node, []
    node = f"/dev/nvme{nvme_index}n1"
    links = [f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{vol_id.replace('-', '')}"]
    # amazon-ec2-utils (on AL2023) also links the requested /dev/sdX or /dev/xvdX name.
    links.append(requested)
    return node, links


def add_device(init_pid, node, minor, links):
    cmds = [f"rm -f {node}", f"mknod -m 660 {node} b 7 {minor}", f"chgrp disk {node} || true"]
    for l in links:
        target = os.path.relpath(node, os.path.dirname(l))
        cmds.append(f"mkdir -p {os.path.dirname(l)} && ln -sfn {target} {l}")
    nsexec(init_pid, " && ".join(cmds))


def remove_device(init_pid, node, minor, links):
    """Lazily unmount anything on the device inside the instance (a real detach yanks it)."""
    script = (f"awk '$3==\"7:{minor}\" {{print $5}}' /proc/self/mountinfo | sort -r | "
              f"while read m; do umount -l \"$m\"; done; rm -f {node} {' '.join(links)}")
    if init_pid and config.pid_start(init_pid):
        nsexec(init_pid, script, check=False)


def loop_detach(dev, vfile):
    """Detach only if the loop device still points at our file (device numbers get reused)."""
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            backing = f.read().strip()
    except OSError:
        return
    if backing.replace(" (deleted)", "") == vfile:
        run(["losetup", "-d", dev], check=False)


def delete_net(ns, hv):
    run(["ip", "link", "del", hv], check=False)
    run(["ip", "netns", "del", ns], check=False)


def copy_sparse(src, dst):
    run(["cp", "--sparse=always", src, dst])


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)

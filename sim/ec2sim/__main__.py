"""Command line of the simulator (called by scripts/ec2sim). stdout carries only the
result (exports, JSON, a path, the timing table); everything else goes to stderr.

Timing (timing.py has every figure with its source; `ec2sim timing` prints them):
  EC2SIM_TIMING=fast|aws at `up` (default fast; status JSON says which under "timing").
  Per figure, for either profile (seconds): EC2SIM_RUN_API_S, EC2SIM_PENDING_S,
  EC2SIM_NET_UP_S, EC2SIM_SSHD_UP_S, EC2SIM_START_S, EC2SIM_VOLUME_CREATE_S,
  EC2SIM_ATTACH_S, EC2SIM_DETACH_S, EC2SIM_TERMINATE_S, EC2SIM_STOP_S, EC2SIM_SNAPSHOT_S,
  EC2SIM_SG_RELEASE_S; EC2SIM_SNAPSHOT_MIBPS (MiB/s, 0: data takes no time);
  EC2SIM_TIMING_SCALE (multiplies every duration), EC2SIM_JITTER (+- fraction; aws 0.1),
  EC2SIM_SEED (repeatable jitter). EC2SIM_BOOT_DELAY and EC2SIM_STATE_DELAY are the fast
  profile's pending -> running and every other state change, as before."""
import glob
import os
import re
import shutil
import subprocess
import sys
import time

from . import cleanup, config, fast, faults, hostops, timing

EXPORTS = ("export AWS_ENDPOINT_URL=http://127.0.0.1:{port}\n"
           "export AWS_ENDPOINT_URL_EBS=http://127.0.0.1:{ebs_port}\n"
           "export AWS_ACCESS_KEY_ID=ec2sim\n"
           "export AWS_SECRET_ACCESS_KEY=ec2sim\n"
           "export AWS_REGION=us-east-1\n"
           "export AWS_DEFAULT_REGION=us-east-1\n"
           "export AWS_EC2_METADATA_DISABLED=true\n")


class Fail(Exception):
    pass


def _daemon_alive(sdir):
    for e in config.Ledger(sdir).entries():
        if e["kind"] == "pid" and e.get("role") == "daemon" and \
                config.pid_alive(e["pid"], e.get("start")):
            return e["pid"]
    return None


def _timing():
    try:
        return timing.resolve(os.environ)
    except timing.Bad as e:
        raise Fail(str(e))


def cmd_up(sdir, name, args):
    spec = _timing()  # before anything starts: a bad figure is only an error message
    if not shutil.which("nft"):  # firewall.py enforces the helpers' security groups with it
        raise Fail("nft is missing: install the Debian package nftables (scripts/setup does).")
    os.makedirs(sdir, exist_ok=True)
    with config.locked(os.path.join(os.path.dirname(sdir), f".{name}.lock")):
        cfg = config.read_json(os.path.join(sdir, "config.json"))
        if cfg and _daemon_alive(sdir) and os.path.exists(os.path.join(sdir, "ready")):
            running = (cfg.get("timing") or {}).get("profile", "fast")
            if running != spec["profile"]:
                sys.stderr.write(f"ec2sim: '{name}' is already up with timing {running}, not "
                                 f"{spec['profile']}: run `down` first to change it.\n")
            sys.stdout.write(_exports(cfg))
            return
        if cfg:  # a crashed daemon: clear what it left, then start clean
            cleanup.down(sdir)
            os.makedirs(sdir, exist_ok=True)
        with config.locked(os.path.join(config.state_root(), ".alloc.lock")):
            cfg = config.choose_config(sdir, name)
            cfg["timing"] = spec  # the daemon's figures, as resolved here
            config.write_json(os.path.join(sdir, "config.json"), cfg)
        led = config.Ledger(sdir)
        log = open(os.path.join(sdir, "daemon.log"), "ab")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        p = subprocess.Popen([sys.executable, "-m", "ec2sim.daemon", sdir], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, env=env, start_new_session=True)
        config.record_pid(led, p.pid, "daemon")
        # For fast.py: port and daemon identity without loading json (~20 ms of its 50).
        with open(os.path.join(sdir, "endpoint"), "w") as f:
            f.write(f"{cfg['port']} {p.pid} {config.pid_start(p.pid)}\n")
        ready = os.path.join(sdir, "ready")
        end = time.time() + 90
        while not os.path.exists(ready):
            if p.poll() is not None or time.time() > end:
                p.kill()
                tail = open(os.path.join(sdir, "daemon.log"), errors="replace").read()[-1500:]
                sys.stderr.write(tail)
                raise Fail(f"the simulator daemon did not start (log: {sdir}/daemon.log)")
            time.sleep(0.05)
        sys.stdout.write(_exports(cfg))


def _exports(cfg):
    # A daemon started before the lean EBS endpoint existed serves EBS direct on its port.
    return EXPORTS.format(port=cfg["port"], ebs_port=cfg.get("ebs_port") or cfg["port"])


def cmd_down(sdir, name, args):
    if not os.path.isdir(sdir):
        return
    os.makedirs(config.state_root(), exist_ok=True)
    lock = os.path.join(os.path.dirname(sdir), f".{name}.lock")
    with config.locked(lock):
        cleanup.down(sdir)
        os.unlink(lock)  # lock files would pile up, one per test simulator


def cmd_status(sdir, name, args):
    # scripts/ec2sim runs fast.py directly for these two; this path is for `python -m`.
    if args:
        raise Fail("usage: ec2sim status")
    return fast.status(sdir, name)


def cmd_timing(sdir, name, args):
    """The figures `up` would use with this environment, with their sources."""
    if args:
        raise Fail("usage: ec2sim timing")
    sys.stdout.write(timing.table(_timing()))


def cmd_volume_file(sdir, name, args):
    return fast.volume_file(sdir, name, args)


def _instances(sdir):
    out = []
    for p in glob.glob(os.path.join(sdir, "instances", "*", "info.json")):
        info = config.read_json(p)
        if info:
            out.append(info)
    return out


def cmd_fault(sdir, name, args):
    if not os.path.isdir(sdir):
        raise Fail(f"simulator '{name}' is not up")
    if not args:
        raise Fail("usage: ec2sim fault api ACTION CODE COUNT | boot-delay S | attach-delay S | "
                   "snapshot-delay S | never-boot [N] | no-python [N] | missing-tool PROGRAM [N] | "
                   "broken-tool PROGRAM [N] | link MBIT [DELAY_MS] | ebs-latency MS | "
                   "ebs-rate N | clear")
    kind, rest = args[0], args[1:]
    try:
        if kind == "api" and len(rest) == 3:
            action, code, count = rest[0], rest[1], int(rest[2])
            faults.update(sdir, lambda d: d.setdefault("api", {}).__setitem__(
                action, {"code": code, "count": count}))
        elif kind == "boot-delay" and len(rest) == 1:
            faults.update(sdir, lambda d: d.__setitem__("boot_delay", float(rest[0])))
        elif kind == "snapshot-delay" and len(rest) == 1:
            faults.update(sdir, lambda d: d.__setitem__("snapshot_delay", float(rest[0])))
        elif kind == "attach-delay" and len(rest) == 1:
            faults.update(sdir, lambda d: d.__setitem__("attach_delay", float(rest[0])))
        elif kind == "never-boot" and len(rest) <= 1:
            n = int(rest[0]) if rest else 1
            faults.update(sdir, lambda d: d.__setitem__("never_boot", d.get("never_boot", 0) + n))
        elif kind == "no-python" and len(rest) <= 1:
            n = int(rest[0]) if rest else 1
            faults.update(sdir, lambda d: d.__setitem__("no_python", d.get("no_python", 0) + n))
        elif kind in ("missing-tool", "broken-tool") and len(rest) in (1, 2):
            prog, n = _program(rest[0]), int(rest[1]) if len(rest) > 1 else 1
            faults.update(sdir, lambda d: _arm_tool(d, kind.replace("-tool", "_tools"), prog, n))
        elif kind == "link" and len(rest) in (1, 2):
            link = {"mbit": float(rest[0]), "delay_ms": float(rest[1]) if len(rest) > 1 else 0}
            faults.update(sdir, lambda d: d.__setitem__("link", link))
            for i in _instances(sdir):
                if not hostops.shape(i["ns"], i["veth"], link) and link["delay_ms"]:
                    sys.stderr.write("ec2sim: this kernel has no sch_netem: rate shaped "
                                     "with tbf, delay not applied.\n")
        elif kind == "ebs-latency" and len(rest) == 1:
            ms = float(rest[0])
            if not 0 <= ms < float("inf"):
                raise ValueError
            faults.update(sdir, lambda d: d.__setitem__("ebs_latency_ms", ms))
        elif kind == "ebs-rate" and len(rest) == 1:
            n = int(rest[0])
            if n < 0:
                raise ValueError
            faults.update(sdir, lambda d: d.__setitem__("ebs_rate", n))
        elif kind == "clear" and not rest:
            had_link = faults.load(sdir).get("link")
            faults.clear(sdir)
            if had_link:
                for i in _instances(sdir):
                    hostops.unshape(i["ns"], i["veth"])
        else:
            raise Fail(f"bad fault arguments: {' '.join(args)}")
    except ValueError:
        raise Fail(f"bad number in fault arguments: {' '.join(args)}")


# The instance's boot (boot.sh) and login need these: faulting them would break the
# simulator, not simulate a broken image.
BOOT_PROGRAMS = {"sh", "dash", "mount", "sshd"}


def _program(name):
    """A program name as boot.sh globs it on the PATH: a plain file name, no pattern."""
    if not re.fullmatch(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*", name):
        raise Fail(f"bad program name '{name}' (a file name on the PATH, e.g. blkid)")
    if name in BOOT_PROGRAMS:
        raise Fail(f"'{name}' is needed to boot the instance; it cannot be faulted")
    return name


def _arm_tool(d, key, prog, n):
    armed = d.setdefault(key, {})  # {program: instance boots left}
    armed[prog] = armed.get(prog, 0) + n


def cmd_kill_sessions(sdir, name, args):
    n = 0
    for i in _instances(sdir):
        if i.get("init_pid") and config.pid_alive(i["init_pid"], i.get("init_start")):
            n += hostops.kill_sessions(i["init_pid"])
    sys.stderr.write(f"killed {n} ssh session(s)\n")


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status,
            "volume-file": cmd_volume_file, "fault": cmd_fault,
            "kill-sessions": cmd_kill_sessions, "timing": cmd_timing}


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write("usage: ec2sim up|down|status|volume-file ID|fault ...|kill-sessions|"
                         "timing\n(timing at up: EC2SIM_TIMING=fast|aws; "
                         "`ec2sim timing` lists every figure, its variable and source)\n")
        return 2
    name = config.sim_name()
    if "/" in name or name.startswith("."):
        sys.stderr.write(f"invalid EC2SIM_NAME '{name}'.\n")
        return 2
    os.makedirs(config.state_root(), exist_ok=True)
    try:
        rc = COMMANDS[argv[0]](config.state_dir(name), name, argv[1:])
    except Fail as e:
        sys.stderr.write(f"ec2sim: {e}.\n" if not str(e).endswith(".") else f"ec2sim: {e}\n")
        return 1
    return rc or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

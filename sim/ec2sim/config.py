"""Where one simulator keeps its state, and the ledger of host resources it made.

Everything a simulator creates on the host (processes, namespaces, veths, loop
devices) is written to the ledger *before* it is created, so `down` can unwind
it even after the daemon was kill -9'd half-way through an operation.
"""
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_INSTANCES = 64  # 64 /30 blocks fit in one 169.254.X.0/24


def sim_name():
    return os.environ.get("EC2SIM_NAME") or "default"


def state_root():
    return os.path.abspath(os.environ.get("EC2SIM_STATE_DIR") or os.path.join(REPO, ".sim"))


def state_dir(name=None):
    return os.path.join(state_root(), name or sim_name())


def tag_of(sdir):
    # Short, per-state-dir tag used in namespace and interface names (IFNAMSIZ is 16).
    return hashlib.sha1(os.path.abspath(sdir).encode()).hexdigest()[:6]


def pid_start(pid):
    """Start time of a process (clock ticks), used to detect PID reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data[data.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid, start):
    return pid is not None and start is not None and pid_start(pid) == start


@contextmanager
def locked(path):
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class Ledger:
    """Append-only record of host resources; fsync'd so a crash cannot lose an entry."""

    def __init__(self, sdir):
        self.path = os.path.join(sdir, "ledger.jsonl")

    def add(self, kind, **fields):
        fields["kind"] = kind
        line = json.dumps(fields) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def entries(self):
        out = []
        try:
            with open(self.path) as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass  # a torn last line after a crash
        except OSError:
            pass
        return out


def record_pid(ledger, pid, role):
    # The start time may not be readable for a process that died at once; still record.
    ledger.add("pid", pid=pid, start=pid_start(pid), role=role)


def _port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _used_blocks():
    """Third octets of 169.254.X.* already on host interfaces or claimed by sibling sims."""
    used = set()
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        for word in out.split():
            if word.startswith("169.254."):
                used.add(int(word.split(".")[2]))
    except (OSError, ValueError):
        pass
    root = state_root()
    if os.path.isdir(root):
        for n in os.listdir(root):
            cfg = read_json(os.path.join(root, n, "config.json"))
            if cfg:
                used.add(cfg["block"])
    return used


def choose_config(sdir, name):
    """Deterministic port and address block from the name, probing past collisions."""
    h = int(hashlib.sha1(f"{name}:{os.path.abspath(sdir)}".encode()).hexdigest(), 16)
    used = _used_blocks()
    block = None
    for i in range(253):
        cand = 1 + (h + i) % 253  # 1..253; 0 and 255 are reserved in 169.254/16
        if cand != 169 and cand not in used:  # 169.254.169.254 is the metadata address
            block = cand
            break
    if block is None:
        raise SystemExit("no free 169.254.X.0/24 block for another simulator")
    port = None
    for i in range(2000):
        cand = 20000 + (h // 7 + i * 7919) % 20000
        if _port_free(cand):
            port = cand
            break
    if port is None:
        raise SystemExit("no free TCP port for the simulator")
    ebs_port = None  # the lean EBS direct endpoint (ebsserver.py)
    for i in range(1, 2000):
        cand = 20000 + (h // 7 + port + i * 104729) % 20000
        if cand != port and _port_free(cand):
            ebs_port = cand
            break
    if ebs_port is None:
        raise SystemExit("no free TCP port for the simulator's EBS endpoint")
    return {"name": name, "port": port, "ebs_port": ebs_port, "block": block,
            "tag": tag_of(sdir), "created": time.time()}


def addresses(block, idx):
    """(host-side, instance-side) addresses of instance slot idx: one /30 each."""
    base = idx * 4
    return f"169.254.{block}.{base + 1}", f"169.254.{block}.{base + 2}"


def netns_name(tag, idx):
    return f"es{tag}-{idx}"


def veth_name(tag, idx):
    return f"es{tag}v{idx}"

"""`status` and `volume-file` without the package: scripts/ec2sim runs this file directly
with `python -I -S`, so only os/sys/socket load (the Rust tests call status many
times; the boto3 version took ~2 s). Paths and liveness follow config.py; keep in step."""
import os
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATUS_PATH = "/_ec2sim/status"  # statusview.PATH, served by the daemon


def _state_dir(name):
    root = os.environ.get("EC2SIM_STATE_DIR") or os.path.join(REPO, ".sim")
    return os.path.join(os.path.abspath(root), name)


def _pid_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data[data.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _daemon_alive(sdir):
    import json
    try:
        with open(os.path.join(sdir, "ledger.jsonl")) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("kind") == "pid" and e.get("role") == "daemon" and \
                e.get("start") is not None and _pid_start(e["pid"]) == e["start"]:
            return True
    return False


def _get(port, path):
    """One HTTP/1.0 GET over a plain socket (http.client alone costs more than the call)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def _endpoint(sdir):
    """Port of a live daemon, or None. `up` writes "PORT PID START" to STATE/endpoint; a
    simulator started before that file existed is read through config.json + the ledger."""
    try:
        with open(os.path.join(sdir, "endpoint")) as f:
            port, pid, start = f.read().split()
        return int(port) if _pid_start(int(pid)) == int(start) else None
    except (OSError, ValueError):
        pass
    import json
    try:
        with open(os.path.join(sdir, "config.json")) as f:
            port = json.load(f)["port"]
    except (OSError, ValueError, KeyError):
        return None
    return port if _daemon_alive(sdir) else None


def status(sdir, name):
    port = _endpoint(sdir)
    if port is None:
        return fail(f"simulator '{name}' is not running (run: scripts/ec2sim up).")
    try:
        code, body = _get(port, STATUS_PATH)
    except (OSError, ValueError, IndexError) as e:
        return fail(f"simulator '{name}' did not answer status: {e}.")
    if code != 200:
        return fail(f"simulator '{name}' answered HTTP {code} to status.")
    sys.stdout.buffer.write(body)
    return 0


def volume_file(sdir, name, args):
    if len(args) != 1:
        return fail("usage: ec2sim volume-file VOLUME_ID")
    f = os.path.join(sdir, "volumes", args[0] + ".img")
    if "/" in args[0] or not os.path.exists(f):
        return fail(f"unknown volume {args[0]} in simulator '{name}'.")
    print(f)
    return 0


def fail(msg, rc=1):
    sys.stderr.write(f"ec2sim: {msg}\n")
    return rc


def main(argv):
    name = os.environ.get("EC2SIM_NAME") or "default"
    if "/" in name or name.startswith("."):
        return fail(f"invalid EC2SIM_NAME '{name}'.", 2)
    sdir = _state_dir(name)
    if argv[:1] == ["status"] and len(argv) == 1:
        return status(sdir, name)
    if argv[:1] == ["volume-file"]:
        return volume_file(sdir, name, argv[1:])
    return fail("fast.py handles only: status, volume-file ID", 2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

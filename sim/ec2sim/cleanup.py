"""`down`: unwind everything in the ledger (and only that), whether or not the daemon
is still alive. Every step checks identity first (PID start time, loop backing file,
our own name prefix + ledger) so another simulator's resources are never touched."""
import os
import shutil
import signal
import subprocess
import time

from . import config


def _kill(pid, start):
    if config.pid_alive(pid, start):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_gone(pids, timeout=5):
    end = time.time() + timeout
    while time.time() < end:
        if not any(config.pid_alive(p, s) for p, s in pids):
            return
        time.sleep(0.02)


def down(sdir):
    led = config.Ledger(sdir)
    entries = led.entries()
    pids = [(e["pid"], e.get("start")) for e in entries if e["kind"] == "pid"]
    # A pid recorded without a start time (died before we read it) cannot be verified: skip.
    pids = [(p, s) for p, s in pids if s is not None]
    daemon = [(p, s) for e in entries if e["kind"] == "pid" and e.get("role") == "daemon"
              for p, s in [(e["pid"], e.get("start"))] if s is not None]
    # The daemon first, so it cannot start anything new while we unwind.
    for p, s in daemon:
        _kill(p, s)
    _wait_gone(daemon)
    netns = {e["name"] for e in entries if e["kind"] == "netns"}
    # Processes inside our namespaces (covers a crash between spawn and ledger entry).
    for ns in netns:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for w in r.stdout.split():
            if w.isdigit():
                pids.append((int(w), config.pid_start(int(w))))
    for p, s in pids:
        _kill(p, s)
    _wait_gone(pids)
    # Loop devices whose backing file is one of ours (recorded, or under our volumes dir).
    vdir = os.path.join(os.path.abspath(sdir), "volumes") + "/"
    files = {e["file"] for e in entries if e["kind"] == "loop"}
    r = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True,
                       text=True)
    for line in r.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            back = parts[1].strip().replace(" (deleted)", "")
            if back in files or back.startswith(vdir):
                subprocess.run(["losetup", "-d", parts[0]], capture_output=True)
    for e in entries:
        if e["kind"] == "link":
            subprocess.run(["ip", "link", "del", e["name"]], capture_output=True)
    for ns in netns:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(sdir, ignore_errors=True)

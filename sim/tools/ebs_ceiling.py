#!/usr/bin/env python3
"""The EBS direct endpoint's ceiling: PutSnapshotBlock/s and MiB/s a trivial client gets from
it, at each concurrency. Standard library only (any python3 runs it).

Each worker thread keeps one HTTP/1.1 connection and sends raw PutSnapshotBlock requests
(the 512 KiB body, x-amz-Checksum, x-amz-Data-Length, as the SDKs send them) with no SigV4,
no SDK, and blocks and checksums computed before the clock starts: what it measures is the
server. Writes cycle over --blocks indices (default 2048: a 1 GiB snapshot), spread over
--snapshots snapshots (each has its own PutSnapshotBlock rate limit, `fault ebs-rate`, 1000/s
by default as on AWS; `scripts/ec2sim fault ebs-rate 0` lifts it). Each snapshot is then
completed and deleted (DeleteSnapshot on the EC2 endpoint; it goes once sealed).

  sim/tools/ebs_ceiling.py [--concurrency 16,64] [--seconds 10] [--snapshots 1]
                           [--blocks 2048] [--beside 'tar -cf - /usr | cat >/dev/null']
                           [--endpoint URL] [--ec2-endpoint URL] [--json]

--beside runs a shell command over and over meanwhile (CPU contention: e.g. the tar that
`ec2-backup` runs), stopped at the end by its process group (it runs in its own session).
Endpoints default to $AWS_ENDPOINT_URL_EBS and $AWS_ENDPOINT_URL (`eval "$(scripts/ec2sim
up)"`). One JSON object per concurrency on stdout with --json, else a table."""
import argparse
import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

BLOCK = 524288


def hostport(url):
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or 80


class Http:
    """One persistent connection; request() returns (status, headers, body)."""

    def __init__(self, addr):
        self.addr = addr
        self.sock = None
        self.buf = b""

    def _connect(self):
        self.sock = socket.create_connection(self.addr, timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, method, path, headers=(), body=b""):
        if self.sock is None:
            self._connect()
        hs = [f"{method} {path} HTTP/1.1", f"Host: {self.addr[0]}:{self.addr[1]}",
              f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers]
        head = ("\r\n".join(hs) + "\r\n\r\n").encode()
        if len(body) > 65536:
            self.sock.sendall(head)
            self.sock.sendall(body)
        else:
            self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buf:
            b = self.sock.recv(65536)
            if not b:
                raise ConnectionError("closed")
            self.buf += b
        rhead, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = rhead.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        rh = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            rh[k.strip().lower()] = v.strip()
        n = int(rh.get("content-length", 0))
        while len(self.buf) < n:
            b = self.sock.recv(max(65536, n - len(self.buf)))
            if not b:
                raise ConnectionError("closed")
            self.buf += b
        rbody, self.buf = self.buf[:n], self.buf[n:]
        if rh.get("connection", "").lower() == "close":
            self.close()
        return status, rh, rbody

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


AUTH = ("AWS4-HMAC-SHA256 Credential=ec2sim/20260101/us-east-1/{svc}/aws4_request, "
        "SignedHeaders=host, Signature=0")


def start_snapshot(ebs, gib):
    st, _, body = Http(ebs).request("POST", "/snapshots", [
        ("Content-Type", "application/json"), ("Authorization", AUTH.format(svc="ebs"))],
        json.dumps({"VolumeSize": gib, "Description": "ebs_ceiling",
                    "Timeout": 60}).encode())
    if st != 201:
        raise SystemExit(f"StartSnapshot: HTTP {st} {body[:300]!r}")
    return json.loads(body)["SnapshotId"]


def finish(ebs, ec2, sid, written):
    Http(ebs).request("POST", f"/snapshots/completion/{sid}", [
        ("x-amz-ChangedBlocksCount", str(written)), ("Authorization", AUTH.format(svc="ebs"))])
    if ec2:
        Http(ec2).request("POST", "/", [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Authorization", AUTH.format(svc="ec2"))],
            f"Action=DeleteSnapshot&Version=2016-11-15&SnapshotId={sid}".encode())


def run(ebs, ec2, conc, seconds, nsnaps, nblocks, datas):
    gib = max(1, -(-nblocks * BLOCK // (1 << 30)))
    sids = [start_snapshot(ebs, gib) for _ in range(nsnaps)]
    written = [set() for _ in sids]
    stats = {"ok": 0, "throttled": 0, "errors": 0}
    lat = []
    lock = threading.Lock()
    go = threading.Event()
    stop_at = [0.0]

    def worker(w):
        h = Http(ebs)
        k, ok, thr, err, mine = 0, 0, 0, 0, []
        go.wait()
        while time.monotonic() < stop_at[0]:
            si = (w + k) % len(sids)
            idx = (w + k * conc) % nblocks
            data, cks = datas[k % len(datas)]
            t = time.monotonic()
            try:
                st, rh, _ = h.request("PUT", f"/snapshots/{sids[si]}/blocks/{idx}", [
                    ("Content-Type", "application/octet-stream"),
                    ("x-amz-Data-Length", str(BLOCK)), ("x-amz-Checksum", cks),
                    ("x-amz-Checksum-Algorithm", "SHA256"),
                    ("Authorization", AUTH.format(svc="ebs"))], data)
            except (OSError, ConnectionError):
                err += 1
                h.close()
                continue
            mine.append(time.monotonic() - t)
            if st == 201:
                ok += 1
                with lock:
                    written[si].add(idx)
            elif "Throttl" in rh.get("x-amzn-errortype", ""):
                thr += 1
            else:
                err += 1
            k += 1
        h.close()
        with lock:
            stats["ok"] += ok
            stats["throttled"] += thr
            stats["errors"] += err
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(conc)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    go.set()
    for t in threads:
        t.join()
    dt = time.monotonic() - t0
    for sid, w in zip(sids, written):
        finish(ebs, ec2, sid, len(w))
    lat.sort()

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None
    return {"concurrency": conc, "seconds": round(dt, 2), "snapshots": nsnaps,
            "puts": stats["ok"], "throttled": stats["throttled"], "errors": stats["errors"],
            "puts_per_s": round(stats["ok"] / dt, 1),
            "mib_per_s": round(stats["ok"] * BLOCK / dt / (1 << 20), 1),
            "latency_ms_p50": pct(0.5), "latency_ms_p99": pct(0.99)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL_EBS"))
    ap.add_argument("--ec2-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"))
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--snapshots", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=2048)
    ap.add_argument("--beside", help="shell command run over and over meanwhile")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not a.endpoint:
        raise SystemExit("no endpoint: --endpoint URL or AWS_ENDPOINT_URL_EBS")
    ebs = hostport(a.endpoint)
    ec2 = hostport(a.ec2_endpoint) if a.ec2_endpoint else None
    datas = []
    for _ in range(8):
        d = os.urandom(BLOCK)
        datas.append((d, base64.b64encode(hashlib.sha256(d).digest()).decode()))
    side = None
    if a.beside:
        side = subprocess.Popen(["bash", "-c", f"while :; do {a.beside}; done"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)  # let it get going
    try:
        rows = [run(ebs, ec2, int(c), a.seconds, a.snapshots, a.blocks, datas)
                for c in a.concurrency.split(",")]
    finally:
        if side is not None:
            os.killpg(side.pid, signal.SIGKILL)  # its own session: only what it started
            side.wait()
    for r in rows:
        r["beside"] = a.beside
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"concurrency {r['concurrency']:>3}: {r['puts_per_s']:>7.1f} "
                  f"PutSnapshotBlock/s {r['mib_per_s']:>7.1f} MiB/s  (p50 "
                  f"{r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms, "
                  f"{r['throttled']} throttled, {r['errors']} errors, {r['snapshots']} "
                  "snapshot(s))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

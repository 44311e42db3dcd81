"""The EBS direct APIs on the simulator's lean endpoint (AWS_ENDPOINT_URL_EBS): the wire
format as boto3 (the same restJson1 protocol as aws-sdk-ebs) and raw HTTP/1.1 clients send
and read it, the fault switches (`fault api` per action, `fault ebs-latency`, `fault
ebs-rate`), and the random bytes of an encrypted snapshot's unwritten blocks."""
import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import REPO

BLOCK = 524288
GIB = 1 << 30
ACTIONS = ("StartSnapshot", "PutSnapshotBlock", "CompleteSnapshot", "ListSnapshotBlocks",
           "ListChangedBlocks", "GetSnapshotBlock")
ERROR_NS = ":http://internal.amazon.com/coral/com.amazon.zeppelindataservice/"


def b64(d):
    return base64.b64encode(d).decode()


def sha(d):
    return b64(hashlib.sha256(d).digest())


def code(e):
    return e.value.response["Error"]["Code"]


def until(pred, timeout=30, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out")


def client(sim, attempts=1, pool=10, endpoint=None, **kw):
    """boto3's ebs client on the lean endpoint (or `endpoint`); attempts=1: no retries."""
    return boto3.client(
        "ebs", endpoint_url=endpoint or sim.exports["AWS_ENDPOINT_URL_EBS"],
        region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y",
        config=Config(retries={"mode": "standard", "total_max_attempts": attempts},
                      max_pool_connections=pool, **kw))


def put(ebs, sid, idx, data):
    return ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=idx, BlockData=data,
                                  DataLength=len(data), Checksum=sha(data),
                                  ChecksumAlgorithm="SHA256")


def complete(ebs, sid, blocks):
    agg = hashlib.sha256(b"".join(hashlib.sha256(blocks[i]).digest()
                                  for i in sorted(blocks))).digest()
    return ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=len(blocks),
                                 Checksum=b64(agg), ChecksumAlgorithm="SHA256",
                                 ChecksumAggregationMethod="LINEAR")


def snap_state(sim, sid):
    return sim.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"]


def new_volume(sim, **kw):
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", **kw)["VolumeId"]
    sim.wait_volume(vid, "available", timeout=60)
    return vid


def read(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.fixture(autouse=True)
def no_faults(sim):
    sim.run("fault", "clear")
    yield
    sim.run("fault", "clear")


def addr(sim):
    u = urlparse(sim.exports["AWS_ENDPOINT_URL_EBS"])
    return u.hostname, u.port


def raw(sim, method, path, headers=None, body=b""):
    c = http.client.HTTPConnection(*addr(sim), timeout=30)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    c.close()
    return out


# --- the endpoint ------------------------------------------------------------------------
def test_up_prints_the_ebs_endpoint(sim):
    """`up` exports AWS_ENDPOINT_URL_EBS (the AWS SDKs' service-specific endpoint variable)
    beside AWS_ENDPOINT_URL, on its own port; a second `up` prints the same; an SDK given
    only the environment reaches it, and EC2 sees what it made."""
    ebs_url, ec2_url = sim.exports["AWS_ENDPOINT_URL_EBS"], sim.exports["AWS_ENDPOINT_URL"]
    assert ebs_url.startswith("http://127.0.0.1:") and ebs_url != ec2_url
    again = sim.run("up")
    assert f"export AWS_ENDPOINT_URL_EBS={ebs_url}\n" in again
    assert f"export AWS_ENDPOINT_URL={ec2_url}\n" in again
    code_ = ("import boto3; e = boto3.client('ebs'); print(e.meta.endpoint_url); "
             "print(e.start_snapshot(VolumeSize=1)['SnapshotId'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(sim.exports)
    out = subprocess.run([sys.executable, "-c", code_], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == ebs_url
    assert snap_state(sim, out[1]) == "pending"  # one state with moto's EC2 view
    sim.ec2.delete_snapshot(SnapshotId=out[1])


# --- wire format -------------------------------------------------------------------------
def test_lean_wire_format_with_boto3(sim):
    """Every operation through boto3 on the lean endpoint: status codes, headers and JSON
    members as botocore's ebs model reads them; ListChangedBlocks between a parent and its
    child; DescribeSnapshots and CreateVolume see the same snapshots."""
    ebs = client(sim)
    blocks = {0: os.urandom(BLOCK), 7: b"\x07" * BLOCK}
    s = ebs.start_snapshot(VolumeSize=1, Description="wire", Timeout=60,
                           Tags=[{"Key": "k", "Value": "v"}])
    assert s["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert s["Status"] == "pending" and s["BlockSize"] == BLOCK and s["VolumeSize"] == 1
    assert s["Tags"] == [{"Key": "k", "Value": "v"}] and s["Description"] == "wire"
    assert abs(s["StartTime"].timestamp() - time.time()) < 60 and s["SseType"] == "none"
    sid = s["SnapshotId"]
    for i, d in blocks.items():
        r = put(ebs, sid, i, d)
        assert r["ResponseMetadata"]["HTTPStatusCode"] == 201
        assert r["Checksum"] == sha(d) and r["ChecksumAlgorithm"] == "SHA256"
    r = complete(ebs, sid, blocks)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 202 and r["Status"] == "pending"
    until(lambda: snap_state(sim, sid) == "completed")
    lst = ebs.list_snapshot_blocks(SnapshotId=sid)
    assert [b["BlockIndex"] for b in lst["Blocks"]] == [0, 7]
    assert lst["ExpiryTime"].timestamp() > time.time() and lst["BlockSize"] == BLOCK
    tok = {b["BlockIndex"]: b["BlockToken"] for b in lst["Blocks"]}
    g = ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=7, BlockToken=tok[7])
    assert g["DataLength"] == BLOCK and g["Checksum"] == sha(blocks[7])
    assert g["ChecksumAlgorithm"] == "SHA256" and g["BlockData"].read() == blocks[7]
    # A child: block 7 unchanged (same token), 0 rewritten, 9 new.
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=sid)
    assert child["ParentSnapshotId"] == sid
    cid = child["SnapshotId"]
    mine = {0: os.urandom(BLOCK), 9: b"\x09" * BLOCK}
    for i, d in mine.items():
        put(ebs, cid, i, d)
    complete(ebs, cid, mine)
    until(lambda: snap_state(sim, cid) == "completed")
    ch = ebs.list_changed_blocks(FirstSnapshotId=sid, SecondSnapshotId=cid)["ChangedBlocks"]
    assert [c["BlockIndex"] for c in ch] == [0, 9]
    assert ch[0]["FirstBlockToken"] == tok[0] and ch[0]["SecondBlockToken"] != tok[0]
    assert "FirstBlockToken" not in ch[1] and ch[1]["SecondBlockToken"]
    assert [c["BlockIndex"] for c in
            ebs.list_changed_blocks(SecondSnapshotId=cid)["ChangedBlocks"]] == [0, 7, 9]
    ctok = {b["BlockIndex"]: b["BlockToken"]
            for b in ebs.list_snapshot_blocks(SnapshotId=cid)["Blocks"]}
    assert ctok[7] == tok[7]  # inherited
    assert ebs.get_snapshot_block(SnapshotId=cid, BlockIndex=7, BlockToken=ctok[7])[
        "BlockData"].read() == blocks[7]
    other = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as e:
        ebs.list_changed_blocks(FirstSnapshotId=other, SecondSnapshotId=cid)
    assert code(e) == "ValidationException" and e.value.response["Reason"] == \
        "UNRELATED_SNAPSHOTS"
    # Paging: MaxResults 100 over 150 blocks.
    many = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    z = b"\0" * BLOCK
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: put(ebs, many, i, z), range(150)))
    p1 = ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100)
    p2 = ebs.list_snapshot_blocks(SnapshotId=many, MaxResults=100, NextToken=p1["NextToken"])
    assert [b["BlockIndex"] for b in p1["Blocks"] + p2["Blocks"]] == list(range(150))
    assert "NextToken" not in p2
    # The snapshot is EC2's: a volume from the child has both generations' bytes.
    vf = sim.run("volume-file", new_volume(sim, SnapshotId=cid)).strip()
    assert read(vf, 0, BLOCK) == mine[0] and read(vf, 7 * BLOCK, BLOCK) == blocks[7]
    assert read(vf, 9 * BLOCK, BLOCK) == mine[9]
    for x in (sid, cid, other, many):
        sim.ec2.delete_snapshot(SnapshotId=x)


def test_lean_wire_format_raw(sim):
    """What SDKs may send besides a plain Content-Length body: Transfer-Encoding chunked,
    Expect: 100-continue, an aws-chunked (SigV4 streaming) body, HTTP/1.0; pipelined
    requests on one persistent connection; the error shape on the wire."""
    st, h, body = raw(sim, "POST", "/snapshots", {"Content-Type": "application/json"},
                      json.dumps({"VolumeSize": 1}).encode())
    assert st == 201 and h["content-type"] == "application/json" and h["x-amzn-requestid"]
    sid = json.loads(body)["SnapshotId"]
    d = os.urandom(BLOCK)
    hdr = {"x-amz-Data-Length": str(BLOCK), "x-amz-Checksum": sha(d),
           "x-amz-Checksum-Algorithm": "SHA256"}
    # chunked
    c = http.client.HTTPConnection(*addr(sim), timeout=30)
    c.request("PUT", f"/snapshots/{sid}/blocks/1", body=iter([d[:1000], d[1000:]]),
              headers=hdr, encode_chunked=True)
    r = c.getresponse()
    assert r.status == 201 and r.getheader("x-amz-Checksum") == sha(d)
    r.read()
    # aws-chunked with 100-continue, on the same connection
    framed = (f"{len(d):x};chunk-signature={'0' * 64}\r\n").encode() + d + \
        f"\r\n0;chunk-signature={'0' * 64}\r\n\r\n".encode()
    c.request("PUT", f"/snapshots/{sid}/blocks/2", body=framed, headers=dict(
        hdr, **{"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(BLOCK),
                "Expect": "100-continue"}))
    r = c.getresponse()
    assert r.status == 201
    r.read()
    c.close()
    # two requests pipelined on one socket, then HTTP/1.0 (the server closes)
    s = socket.create_connection(addr(sim))
    one = f"GET /snapshots/{sid}/blocks HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    s.sendall(one + one)
    got = b""
    while got.count(b"HTTP/1.1 200") < 2 or not got.endswith(b"}"):
        got += s.recv(65536)
    assert got.count(b'"BlockIndex": 1') == 2
    s.close()
    s = socket.create_connection(addr(sim))
    s.sendall(f"GET /snapshots/{sid}/blocks HTTP/1.0\r\n\r\n".encode())
    got = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
    assert got.startswith(b"HTTP/1.1 200") and b"Connection: close" in got
    s.close()
    # errors: status, x-amzn-ErrorType, {"message", "Reason"}
    st, h, body = raw(sim, "PUT", f"/snapshots/{sid}/blocks/3",
                      dict(hdr, **{"x-amz-Checksum": sha(b"other")}), d)
    assert st == 400 and h["x-amzn-errortype"] == "ValidationException" + ERROR_NS
    assert json.loads(body) == {"message": "The checksum does not match the block data.",
                                "Reason": "INVALID_BLOCK"}
    st, h, body = raw(sim, "GET", "/snapshots/snap-0123456789abcdef0/blocks")
    assert st == 404 and h["x-amzn-errortype"].split(":")[0] == "ResourceNotFoundException"
    assert json.loads(body)["Reason"] == "SNAPSHOT_NOT_FOUND"
    st, _, body = raw(sim, "GET", f"/snapshots/{sid}/blocks/5?blockToken=AAAA")
    assert st == 400 and json.loads(body)["Reason"] == "INVALID_BLOCK_TOKEN"
    sim.ec2.delete_snapshot(SnapshotId=sid)


# --- fault api ---------------------------------------------------------------------------
def _call(ebs, action, ctx):
    sid = ctx["sid"]
    return {"StartSnapshot": lambda: ebs.start_snapshot(VolumeSize=1),
            "PutSnapshotBlock": lambda: put(ebs, sid, 1, ctx["data"]),
            "CompleteSnapshot": lambda: ebs.complete_snapshot(SnapshotId=ctx["other"],
                                                              ChangedBlocksCount=0),
            "ListSnapshotBlocks": lambda: ebs.list_snapshot_blocks(SnapshotId=sid),
            "ListChangedBlocks": lambda: ebs.list_changed_blocks(SecondSnapshotId=sid),
            "GetSnapshotBlock": lambda: ebs.get_snapshot_block(
                SnapshotId=sid, BlockIndex=0, BlockToken=ctx["token"]),
            }[action]()


@pytest.mark.parametrize("endpoint", ["lean", "moto"])
def test_fault_api_for_every_ebs_action(sim, endpoint):
    """`fault api ACTION CODE COUNT`: the next COUNT calls of that action fail with CODE, at
    AWS's HTTP status for it, parsed by botocore as that code; other actions untouched.
    The same on moto's port (a client given AWS_ENDPOINT_URL only)."""
    url = None if endpoint == "lean" else sim.exports["AWS_ENDPOINT_URL"]
    ebs = client(sim, endpoint=url)
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    data = b"\x01" * BLOCK
    put(ebs, sid, 0, data)
    ctx = {"sid": sid, "data": data,
           "token": ebs.list_snapshot_blocks(SnapshotId=sid)["Blocks"][0]["BlockToken"]}
    made = [sid]
    for action, fault, status in zip(ACTIONS * 2, (
            "ThrottlingException", "InternalServerException", "ResourceNotFoundException",
            "RequestThrottledException", "AccessDeniedException", "ValidationException",
            "InternalServerException", "ThrottlingException", "ConflictException",
            "InternalServerException", "ResourceNotFoundException", "ThrottlingException"),
            (400, 500, 404, 400, 403, 400, 500, 400, 409, 500, 404, 400)):
        ctx["other"] = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
        made.append(ctx["other"])
        sim.run("fault", "api", action, fault, "2")
        for _ in range(2):
            with pytest.raises(ClientError) as e:
                _call(ebs, action, ctx)
            assert code(e) == fault, action
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
            assert "Simulated fault" in e.value.response["Error"]["Message"]
        for other in ACTIONS:  # nothing else was armed
            if other not in (action, "StartSnapshot", "CompleteSnapshot"):
                _call(ebs, other, ctx)
        r = _call(ebs, action, ctx)  # used up
        if action == "StartSnapshot":
            made.append(r["SnapshotId"])
    for x in made:  # the pending ones go at their Timeout (as on AWS) or at `down`
        sim.ec2.delete_snapshot(SnapshotId=x)


def test_sdk_retry_classification(sim):
    """botocore's standard retry mode, like aws-sdk-rust's, retries ThrottlingException,
    RequestThrottledException (throttling, by code) and InternalServerException (a 500)
    and gives up at once on ResourceNotFoundException and ValidationException."""
    ebs = client(sim, attempts=3)
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for fault in ("ThrottlingException", "RequestThrottledException",
                  "InternalServerException"):
        sim.run("fault", "api", "ListSnapshotBlocks", fault, "2")
        r = ebs.list_snapshot_blocks(SnapshotId=sid)
        assert r["ResponseMetadata"]["RetryAttempts"] == 2, fault
    for fault in ("ResourceNotFoundException", "ValidationException"):
        sim.run("fault", "api", "ListSnapshotBlocks", fault, "2")
        with pytest.raises(ClientError) as e:
            ebs.list_snapshot_blocks(SnapshotId=sid)
        assert code(e) == fault and e.value.response["ResponseMetadata"]["RetryAttempts"] == 0
        sim.run("fault", "clear")
    sim.ec2.delete_snapshot(SnapshotId=sid)


# --- latency -----------------------------------------------------------------------------
def test_ebs_latency_applies_to_each_request_in_parallel(sim):
    """`fault ebs-latency MS`: every EBS direct request answers MS later, and concurrent
    requests wait side by side (16 at once take ~MS, not 16 x MS); `fault clear` ends it."""
    ebs = client(sim, pool=32)
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    ebs.list_snapshot_blocks(SnapshotId=sid)  # connections warm
    sim.run("fault", "ebs-latency", "400")
    t = time.time()
    ebs.list_snapshot_blocks(SnapshotId=sid)
    assert 0.4 <= time.time() - t < 1.5
    data = b"\x02" * BLOCK

    def one(i):
        t0 = time.time()
        put(ebs, sid, i, data)
        return time.time() - t0
    t = time.time()
    with ThreadPoolExecutor(16) as ex:
        each = list(ex.map(one, range(16)))
    total = time.time() - t
    assert min(each) >= 0.4 and total < 1.6, (each, total)  # serialized would be 6.4 s
    sim.run("fault", "clear")
    t = time.time()
    ebs.list_snapshot_blocks(SnapshotId=sid)
    assert time.time() - t < 0.3
    sim.ec2.delete_snapshot(SnapshotId=sid)


# --- rate --------------------------------------------------------------------------------
def test_ebs_rate_limits_puts_per_snapshot(sim):
    """`fault ebs-rate N`: N PutSnapshotBlock a second per snapshot (bursts of N); past it
    RequestThrottledException, HTTP 400, Reason RESOURCE_LEVEL_THROTTLE, as AWS's per-snapshot
    limit answers; another snapshot has its own budget; `fault clear` restores AWS's 1000."""
    ebs = client(sim, pool=40)
    a, b = (ebs.start_snapshot(VolumeSize=1)["SnapshotId"] for _ in range(2))
    data = b"\x03" * BLOCK
    put(ebs, a, 0, data)  # warm
    sim.run("fault", "ebs-rate", "10")

    def burst(sid, n):
        def one(i):
            try:
                put(ebs, sid, i, data)
                return "ok"
            except ClientError as e:
                r = e.response
                assert r["ResponseMetadata"]["HTTPStatusCode"] == 400
                assert r.get("Reason") == "RESOURCE_LEVEL_THROTTLE"
                return r["Error"]["Code"]
        with ThreadPoolExecutor(20) as ex:
            return list(ex.map(one, range(n)))
    t = time.time()
    got = burst(a, 40)
    dt = time.time() - t
    ok = got.count("ok")
    assert set(got) == {"ok", "RequestThrottledException"}
    assert 10 <= ok <= 10 + 10 * dt + 1, (ok, dt)
    assert burst(b, 10).count("ok") == 10  # its own budget
    time.sleep(1.0)
    assert burst(a, 10).count("ok") == 10  # refilled
    sim.run("fault", "clear")  # AWS's 1000 a second again
    assert burst(a, 60).count("ok") == 60
    sim.run("fault", "ebs-rate", "0")  # 0: no limit
    assert burst(a, 60).count("ok") == 60
    for x in (a, b):
        sim.ec2.delete_snapshot(SnapshotId=x)


def test_fault_cli_rejects_bad_ebs_values(sim):
    for args in (("ebs-latency", "-1"), ("ebs-latency", "x"), ("ebs-rate", "-2"),
                 ("ebs-rate", "1.5"), ("ebs-rate",)):
        r = sim.run("fault", *args, check=False)
        assert r.returncode != 0, args


# --- encrypted snapshots: unwritten blocks ------------------------------------------------
def _distinct_garbage(chunks):
    for c in chunks:
        assert len(c) == BLOCK and c.count(0) < BLOCK // 64  # random: ~1/256 zero bytes
    assert len({hashlib.sha256(c).digest() for c in chunks}) == len(chunks)


def test_encrypted_snapshot_unwritten_blocks_read_random(sim):
    """A volume made from an encrypted StartSnapshot snapshot holds random bytes, not zeros,
    in the blocks no PutSnapshotBlock wrote (a child's too, but not its parent's blocks);
    an unencrypted one reads zeros there, and a larger volume's new space is zeros. The
    unwritten blocks are not listed and GetSnapshotBlock cannot read them (no token)."""
    ebs = client(sim)
    data = {0: os.urandom(BLOCK), 2: b"\0" * BLOCK, 5: b"\x05" * BLOCK}
    enc = ebs.start_snapshot(VolumeSize=1, Encrypted=True)["SnapshotId"]
    plain = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for sid in (enc, plain):
        for i, d in data.items():
            put(ebs, sid, i, d)
        complete(ebs, sid, data)
    until(lambda: snap_state(sim, enc) == snap_state(sim, plain) == "completed")
    lst = ebs.list_snapshot_blocks(SnapshotId=enc)
    assert [b["BlockIndex"] for b in lst["Blocks"]] == [0, 2, 5]
    with pytest.raises(ClientError) as e:  # never written: no token to read it with
        ebs.get_snapshot_block(SnapshotId=enc, BlockIndex=1,
                               BlockToken=lst["Blocks"][0]["BlockToken"])
    assert code(e) == "ValidationException" and e.value.response["Reason"] == \
        "INVALID_BLOCK_TOKEN"
    unwritten = (1, 3, 4, 6, 1000, 2047)
    ve = sim.run("volume-file", new_volume(sim, SnapshotId=enc, Size=2)).strip()
    ve2 = sim.run("volume-file", new_volume(sim, SnapshotId=enc)).strip()
    vp = sim.run("volume-file", new_volume(sim, SnapshotId=plain)).strip()
    for i, d in data.items():
        assert read(ve, i * BLOCK, BLOCK) == d == read(vp, i * BLOCK, BLOCK)
    garbage = [read(ve, i * BLOCK, BLOCK) for i in unwritten]
    _distinct_garbage(garbage)
    assert read(ve2, BLOCK, BLOCK) != garbage[0]  # fresh bytes for each volume
    for i in unwritten:
        assert read(vp, i * BLOCK, BLOCK) == b"\0" * BLOCK
    assert read(ve, GIB, BLOCK) == b"\0" * BLOCK == read(ve, 2 * GIB - BLOCK, BLOCK)
    # A child of the encrypted one: its parent's blocks, its own, garbage elsewhere.
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=enc)["SnapshotId"]
    mine = {1: b"\x11" * BLOCK}
    put(ebs, child, 1, mine[1])
    complete(ebs, child, mine)
    until(lambda: snap_state(sim, child) == "completed")
    vc = sim.run("volume-file", new_volume(sim, SnapshotId=child)).strip()
    assert read(vc, 0, BLOCK) == data[0] and read(vc, 5 * BLOCK, BLOCK) == data[5]
    assert read(vc, 2 * BLOCK, BLOCK) == b"\0" * BLOCK and read(vc, BLOCK, BLOCK) == mine[1]
    _distinct_garbage([read(vc, i * BLOCK, BLOCK) for i in (3, 4, 2047)])
    for sid in (enc, plain, child):
        sim.ec2.delete_snapshot(SnapshotId=sid)


def test_encrypted_child_of_a_createsnapshot_parent_keeps_its_data(sim):
    """A StartSnapshot child of an encrypted CreateSnapshot snapshot: the parent's whole
    volume is its data (zeros where the volume was never written), no garbage there."""
    vid = new_volume(sim, Size=1, Encrypted=True)
    vf = sim.run("volume-file", vid).strip()
    with open(vf, "r+b") as f:
        f.seek(3 * BLOCK)
        f.write(b"\x33" * BLOCK)
    parent = sim.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    until(lambda: snap_state(sim, parent) == "completed")
    ebs = client(sim)
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)["SnapshotId"]
    complete(ebs, child, {})
    until(lambda: snap_state(sim, child) == "completed")
    vc = sim.run("volume-file", new_volume(sim, SnapshotId=child)).strip()
    assert read(vc, 3 * BLOCK, BLOCK) == b"\x33" * BLOCK
    assert read(vc, 0, BLOCK) == read(vc, 2047 * BLOCK, BLOCK) == b"\0" * BLOCK
    for sid in (child, parent):
        sim.ec2.delete_snapshot(SnapshotId=sid)


# --- the ceiling tool --------------------------------------------------------------------
def test_ceiling_tool_runs(sim):
    """sim/tools/ebs_ceiling.py (used by the benchmark) measures and cleans up after itself."""
    before = {s["id"] for s in sim.status()["snapshots"]}
    env = dict(os.environ, **sim.exports)
    out = subprocess.run([sys.executable, os.path.join(REPO, "sim", "tools", "ebs_ceiling.py"),
                          "--seconds", "1", "--concurrency", "2,4", "--blocks", "64",
                          "--json"], env=env, capture_output=True, text=True, check=True)
    rows = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert [r["concurrency"] for r in rows] == [2, 4]
    for r in rows:
        assert r["puts"] > 0 and r["errors"] == 0 and r["mib_per_s"] > 0
    until(lambda: {s["id"] for s in sim.status()["snapshots"]} <= before)

"""EBS snapshots as on EC2: point in time, pending with a moving Progress, a DeleteSnapshot of
a pending one taking effect once it ends (CreateSnapshot and EBS direct, with StartSnapshot's
Timeout), CreateVolume from a snapshot, encryption and KMS keys, and `status`."""
import base64
import hashlib
import os
import time
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from conftest import Sim

MIB = 1 << 20
GIB = 1 << 30
# A snapshot takes 1 s plus its data at 100 MiB/s (300 MiB: ~4 s), a volume 1 s to create:
# long enough to act on a pending snapshot and a creating volume.
SIM_ENV = {"EC2SIM_SNAPSHOT_S": "1", "EC2SIM_SNAPSHOT_MIBPS": "100",
           "EC2SIM_VOLUME_CREATE_S": "1"}
BLOCK = 524288
TAG = "ec2-backup:run"


def code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def until(pred, timeout=30, step=0.05):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out")


def snap(sim, sid):
    return sim.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]


def gone(sim, sid):
    try:
        snap(sim, sid)
        return False
    except ClientError as e:
        assert e.response["Error"]["Code"] == "InvalidSnapshot.NotFound"
        return True


def state(sim, sid):
    return snap(sim, sid)["State"]


def volume(sim, size=1, **kw):
    """A volume, once available (size None: the snapshot's)."""
    if size is not None:
        kw["Size"] = size
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", **kw)["VolumeId"]
    return sim.wait_volume(vid, "available")


def vfile(sim, vid):
    return sim.run("volume-file", vid).strip()


def chunk(i, n=10 * MIB):
    return bytes([i + 1]) * n


def fill(path, count=30, stride=32 * MIB):
    """~300 MiB in `count` 10 MiB runs, run i all byte i+1, one every `stride`."""
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(i * stride)
            f.write(chunk(i))


def read(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def ebs_client(sim, **cfg):
    from botocore.config import Config
    return boto3.client("ebs", endpoint_url=sim.exports["AWS_ENDPOINT_URL"],
                        region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="y", config=Config(**cfg))


def put_block(ebs, sid, idx, data):
    return ebs.put_snapshot_block(
        SnapshotId=sid, BlockIndex=idx, BlockData=data, DataLength=len(data),
        Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
        ChecksumAlgorithm="SHA256")


# --- 1. point in time ------------------------------------------------------------------
def test_point_in_time_and_restore_to_a_larger_volume(sim):
    """The snapshot holds the volume as it was at CreateSnapshot: writes after the call,
    and the volume's deletion while pending, do not reach it. CreateSnapshot of 1 GiB with
    ~300 MiB written answers quickly (the copy is synchronous, of the data only). A volume
    made from it, twice as large, starts with exactly that data and zeros after."""
    vid = volume(sim)["VolumeId"]
    path = vfile(sim, vid)
    fill(path)
    t = time.time()
    s = sim.ec2.create_snapshot(VolumeId=vid, Description="pit")
    call = time.time() - t
    print(f"CreateSnapshot, 1 GiB volume, 300 MiB written: {call:.3f} s")
    assert call < 3.0
    assert s["State"] == "pending" and s["Progress"] == "0%" and s["StartTime"]
    sid = s["SnapshotId"]
    with open(path, "r+b") as f:  # after the call: none of this may reach the snapshot
        f.write(b"\xee" * (10 * MIB))             # over run 0
        f.seek(1000 * MIB)
        f.write(b"\xdd" * MIB)                    # where the volume was a hole
    sim.ec2.delete_volume(VolumeId=vid)           # the volume going changes nothing either
    assert state(sim, sid) == "pending"
    until(lambda: state(sim, sid) == "completed")
    v2 = volume(sim, size=2, SnapshotId=sid)
    assert v2["Size"] == 2 and v2["SnapshotId"] == sid
    p2 = vfile(sim, v2["VolumeId"])
    assert os.path.getsize(p2) == 2 * GIB
    for i in range(30):
        assert read(p2, i * 32 * MIB, 10 * MIB) == chunk(i), f"run {i}"
    assert read(p2, 1000 * MIB, MIB) == bytes(MIB)
    assert read(p2, GIB + 5 * MIB, MIB) == bytes(MIB)  # past the snapshot: zeros
    with pytest.raises(ClientError) as e:  # smaller than the snapshot
        sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=0, SnapshotId=sid)
    assert code(e) == "InvalidParameterValue"
    v3 = volume(sim, size=None, SnapshotId=sid)  # no Size: the snapshot's
    assert v3["Size"] == 1 and read(vfile(sim, v3["VolumeId"]), 29 * 32 * MIB, MIB) == \
        chunk(29, MIB)


# --- 2. pending, Progress, completed ----------------------------------------------------
def test_pending_progress_moves_and_time_grows_with_data(sim):
    """pending with Progress 0% ... 99%, then completed 100%; ~1 s for an empty volume,
    ~1 s + 300 MiB at 100 MiB/s for a written one; tags from TagSpecifications kept."""
    empty = volume(sim)["VolumeId"]
    full = volume(sim)["VolumeId"]
    fill(vfile(sim, full))
    tags = [{"ResourceType": "snapshot", "Tags": [{"Key": TAG, "Value": "r1"},
                                                  {"Key": "Name", "Value": "n"}]}]
    sids, t0 = {}, {}
    for v in (empty, full):
        r = sim.ec2.create_snapshot(VolumeId=v, TagSpecifications=tags)
        sids[v], t0[v] = r["SnapshotId"], time.time()
        assert {t["Key"]: t["Value"] for t in r["Tags"]} == {TAG: "r1", "Name": "n"}
    seen, took = {v: [] for v in sids}, {}
    while len(took) < 2:
        for v, sid in sids.items():
            if v in took:
                continue
            d = snap(sim, sid)
            if not seen[v] or seen[v][-1] != (d["State"], d["Progress"]):
                seen[v].append((d["State"], d["Progress"]))
            if d["State"] == "completed":
                took[v] = time.time() - t0[v]
        assert time.time() - min(t0.values()) < 30
        time.sleep(0.05)
    print("took", took, "progress seen", len(seen[full]), "values")
    assert 0.7 < took[empty] < 2.5
    assert 3.2 < took[full] < 6.0
    pcts = [int(p.rstrip("%")) for st, p in seen[full] if st == "pending"]
    assert pcts == sorted(pcts) and len(set(pcts)) >= 5 and pcts[0] < 10 and pcts[-1] <= 99
    assert seen[full][-1] == ("completed", "100%")
    d = snap(sim, sids[full])
    assert d["VolumeId"] == full and d["VolumeSize"] == 1 and d["StartTime"]
    assert {t["Key"]: t["Value"] for t in d["Tags"]} == {TAG: "r1", "Name": "n"}
    filt = sim.ec2.describe_snapshots(Filters=[{"Name": "tag:" + TAG, "Values": ["r1"]}])
    assert {x["SnapshotId"] for x in filt["Snapshots"]} == set(sids.values())


# --- 3. DeleteSnapshot of a pending snapshot -----------------------------------------------
def test_delete_pending_snapshot_takes_effect_when_it_completes(sim):
    vid = volume(sim)["VolumeId"]
    fill(vfile(sim, vid), count=10)  # 100 MiB: ~2 s pending
    sid = sim.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    sfile = os.path.join(sim.state_dir, "snapshots", sid + ".img")
    sim.ec2.delete_snapshot(SnapshotId=sid)  # accepted
    d = snap(sim, sid)  # still there, still pending
    assert d["State"] == "pending"
    st = {x["id"]: x for x in sim.status()["snapshots"]}[sid]
    assert st["state"] == "pending" and st["deleting"] is True
    sim.ec2.delete_snapshot(SnapshotId=sid)  # again: accepted again
    with pytest.raises(ClientError) as e:
        sim.ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=sid)
    assert code(e) == "IncorrectState"
    until(lambda: gone(sim, sid))
    assert not os.path.exists(sfile)
    assert sid not in {x["id"] for x in sim.status()["snapshots"]}
    with pytest.raises(ClientError) as e:
        sim.ec2.delete_snapshot(SnapshotId=sid)
    assert code(e) == "InvalidSnapshot.NotFound"


def test_delete_completed_snapshot_is_at_once(sim):
    vid = volume(sim)["VolumeId"]
    sid = sim.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    until(lambda: state(sim, sid) == "completed")
    sim.ec2.delete_snapshot(SnapshotId=sid)
    assert gone(sim, sid)
    assert not os.path.exists(os.path.join(sim.state_dir, "snapshots", sid + ".img"))


def test_delete_pending_direct_snapshot_goes_after_complete(sim):
    """A StartSnapshot snapshot deleted while pending stays (pending, still taking blocks)
    until CompleteSnapshot's seal ends it, then goes, from the EBS direct APIs too."""
    ebs = ebs_client(sim)
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    put_block(ebs, sid, 0, b"a" * BLOCK)
    sim.ec2.delete_snapshot(SnapshotId=sid)
    assert state(sim, sid) == "pending"
    put_block(ebs, sid, 1, b"b" * BLOCK)
    assert ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)["Status"] == "pending"
    assert state(sim, sid) == "pending"
    until(lambda: gone(sim, sid))
    for call in (lambda: ebs.list_snapshot_blocks(SnapshotId=sid),
                 lambda: ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=0,
                                                BlockToken="x"),
                 lambda: put_block(ebs, sid, 2, b"c" * BLOCK)):
        with pytest.raises(ClientError) as e:
            call()
        assert code(e) == "ResourceNotFoundException"


def test_start_snapshot_timeout_range(sim):
    ebs = ebs_client(sim, parameter_validation=False)  # botocore checks the range itself
    for bad in (9, 4321):
        with pytest.raises(ClientError) as e:
            ebs.start_snapshot(VolumeSize=1, Timeout=bad)
        assert code(e) == "ValidationException"


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """A second simulator whose minutes are 0.6 s (EC2SIM_TIMING_SCALE=0.01): StartSnapshot's
    shortest Timeout, 10 minutes, is 6 s there."""
    name = f"t{uuid.uuid4().hex[:8]}"
    s = Sim(name, str(tmp_path_factory.mktemp(name)), {"EC2SIM_TIMING_SCALE": "0.01"})
    try:
        yield s
    finally:
        s.run("down")
        assert not os.path.exists(s.state_dir)


def test_direct_snapshot_cancelled_at_its_timeout(scaled):
    """Not completed within Timeout (counted anew from each block put): cancelled, `error`;
    a DeleteSnapshot accepted while pending takes effect then."""
    ebs = ebs_client(scaled)
    idle = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    dropped = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    busy = ebs.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    t0 = time.time()
    scaled.ec2.delete_snapshot(SnapshotId=dropped)
    time.sleep(4)
    put_block(ebs, busy, 0, b"x" * BLOCK)  # its 6 s start again here
    assert state(scaled, idle) == state(scaled, dropped) == state(scaled, busy) == "pending"
    until(lambda: state(scaled, idle) == "error", timeout=10)
    assert 5.0 < time.time() - t0 < 9.0
    until(lambda: gone(scaled, dropped), timeout=5)
    assert state(scaled, busy) == "pending"
    with pytest.raises(ClientError) as e:  # cancelled: takes no more blocks
        put_block(ebs, idle, 1, b"y" * BLOCK)
    assert code(e) == "ValidationException"
    until(lambda: state(scaled, busy) == "error", timeout=10)
    assert time.time() - t0 > 9.0
    scaled.ec2.delete_snapshot(SnapshotId=idle)  # an error snapshot goes at once
    assert gone(scaled, idle)


# --- 4. CreateVolume from a snapshot ------------------------------------------------------
def test_create_volume_from_pending_snapshot_refused(sim):
    vid = volume(sim)["VolumeId"]
    fill(vfile(sim, vid), count=5)
    sid = sim.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    with pytest.raises(ClientError) as e:
        sim.ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=sid)
    assert code(e) == "IncorrectState"
    assert e.value.response["Error"]["Message"] == "Snapshot is in invalid state - pending"
    ebs = ebs_client(sim)
    direct = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as e:
        sim.ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=direct)
    assert code(e) == "IncorrectState"
    vols = sim.ec2.describe_volumes(Filters=[{"Name": "snapshot-id",
                                              "Values": [sid, direct]}])["Volumes"]
    assert vols == []
    until(lambda: state(sim, sid) == "completed")
    assert volume(sim, SnapshotId=sid)["SnapshotId"] == sid


def test_delete_snapshot_while_a_volume_is_created_from_it(sim):
    """EC2 lists no "a volume is being created from it" among DeleteSnapshot's refusals:
    the snapshot goes at once and the creating volume still gets its data."""
    vid = volume(sim)["VolumeId"]
    fill(vfile(sim, vid), count=3)
    sid = sim.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    until(lambda: state(sim, sid) == "completed")
    new = sim.ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=sid)
    assert new["State"] == "creating"
    sim.ec2.delete_snapshot(SnapshotId=sid)
    assert gone(sim, sid)
    assert sim.ec2.describe_volumes(VolumeIds=[new["VolumeId"]])["Volumes"][0][
        "State"] == "creating"
    v = sim.wait_volume(new["VolumeId"], "available")
    assert v["SnapshotId"] == sid
    p = vfile(sim, v["VolumeId"])
    for i in range(3):
        assert read(p, i * 32 * MIB, 10 * MIB) == chunk(i)


# --- 5. encryption ------------------------------------------------------------------------
def test_encryption_and_kms_keys(sim):
    kms = boto3.client("kms", endpoint_url=sim.exports["AWS_ENDPOINT_URL"],
                       region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="y")
    mine = kms.create_key(Description="mine")["KeyMetadata"]
    other = kms.create_key(Description="other")["KeyMetadata"]
    kms.create_alias(AliasName="alias/ec2sim-test-mine", TargetKeyId=mine["KeyId"])

    def vol(vid):
        return sim.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]

    def snapshot_of(vid):
        sid = sim.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
        until(lambda: state(sim, sid) == "completed")
        return snap(sim, sid)

    # Encrypted without a key: the account's default EBS key (an ARN).
    d = volume(sim, Encrypted=True)
    default = d["KmsKeyId"]
    assert d["Encrypted"] and default.startswith("arn:aws:kms:us-east-1:")
    s = snapshot_of(d["VolumeId"])
    assert s["Encrypted"] and s["KmsKeyId"] == default
    # A key by ID, alias or ARN: DescribeVolumes shows its ARN.
    for name in (mine["KeyId"], "alias/ec2sim-test-mine", mine["Arn"]):
        v = volume(sim, Encrypted=True, KmsKeyId=name)
        assert v["Encrypted"] and v["KmsKeyId"] == mine["Arn"], name
    s = snapshot_of(v["VolumeId"])
    assert s["Encrypted"] and s["KmsKeyId"] == mine["Arn"]
    # From an encrypted snapshot: encrypted with its key, whatever Encrypted says.
    for kw in ({}, {"Encrypted": True}, {"Encrypted": False}):
        r = volume(sim, SnapshotId=s["SnapshotId"], **kw)
        assert r["Encrypted"] and r["KmsKeyId"] == mine["Arn"], kw
    # ... or re-encrypted with another key, named with Encrypted.
    r = volume(sim, SnapshotId=s["SnapshotId"], Encrypted=True, KmsKeyId=other["KeyId"])
    assert r["Encrypted"] and r["KmsKeyId"] == other["Arn"]
    with pytest.raises(ClientError) as e:  # a key without Encrypted
        sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, KmsKeyId=mine["KeyId"])
    assert code(e) == "InvalidParameterDependency"
    # Unencrypted: its snapshot too, with no key; a volume from it encrypted on request.
    plain = volume(sim)
    assert not plain["Encrypted"] and "KmsKeyId" not in plain
    s = snapshot_of(plain["VolumeId"])
    assert not s["Encrypted"] and "KmsKeyId" not in s
    assert not volume(sim, SnapshotId=s["SnapshotId"])["Encrypted"]
    r = volume(sim, SnapshotId=s["SnapshotId"], Encrypted=True)
    assert r["Encrypted"] and r["KmsKeyId"] == default
    # StartSnapshot: Encrypted gives the default key, KmsKeyArn another; a child of an
    # encrypted parent has the parent's key.
    ebs = ebs_client(sim)
    a = ebs.start_snapshot(VolumeSize=1, Encrypted=True)
    assert a["KmsKeyArn"] == default and snap(sim, a["SnapshotId"])["Encrypted"]
    b = ebs.start_snapshot(VolumeSize=1, Encrypted=True, KmsKeyArn=mine["Arn"])
    assert b["KmsKeyArn"] == mine["Arn"] and snap(sim, b["SnapshotId"])["KmsKeyId"] == \
        mine["Arn"]
    with pytest.raises(ClientError) as e:
        ebs.start_snapshot(VolumeSize=1, KmsKeyArn=mine["Arn"])
    assert code(e) == "ValidationException"
    ebs.complete_snapshot(SnapshotId=b["SnapshotId"], ChangedBlocksCount=0)
    until(lambda: state(sim, b["SnapshotId"]) == "completed")
    c = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=b["SnapshotId"])
    d = snap(sim, c["SnapshotId"])
    assert d["Encrypted"] and d["KmsKeyId"] == mine["Arn"] == c["KmsKeyArn"]
    r = volume(sim, SnapshotId=b["SnapshotId"])
    assert r["Encrypted"] and r["KmsKeyId"] == mine["Arn"]
    for sid in (a["SnapshotId"], c["SnapshotId"]):
        sim.ec2.delete_snapshot(SnapshotId=sid)


# --- 6. status --------------------------------------------------------------------------
def test_status_lists_snapshots(sim):
    vid = volume(sim, Encrypted=True)["VolumeId"]
    fill(vfile(sim, vid), count=5)
    sid = sim.ec2.create_snapshot(VolumeId=vid, TagSpecifications=[
        {"ResourceType": "snapshot", "Tags": [{"Key": TAG, "Value": "st"}]}])["SnapshotId"]
    st = sim.status()
    mine = {x["id"]: x for x in st["snapshots"]}
    x = mine[sid]
    assert x["state"] == "pending" and x["progress"].endswith("%") and x["volume"] == vid
    assert x["size"] == 1 and x["tags"] == {TAG: "st"} and x["encrypted"] is True
    assert x["kms_key_id"].startswith("arn:aws:kms:") and x["start_time"]
    assert x["file"] and os.path.exists(x["file"]) and x["deleting"] is False
    assert len(st["snapshots"]) < 100  # not moto's ~1300 behind its AMIs
    until(lambda: {y["id"]: y for y in sim.status()["snapshots"]}[sid]["state"] ==
          "completed")
    assert {y["id"]: y for y in sim.status()["snapshots"]}[sid]["progress"] == "100%"

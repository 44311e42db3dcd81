"""API rules a garbage collector and a temporary security group rely on."""
import pytest
from botocore.exceptions import ClientError

RUN = "ec2-backup:run"
DONE = "ec2-backup:completed"


def code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def tags(rtype, **kv):
    return [{"ResourceType": rtype, "Tags": [{"Key": k, "Value": v} for k, v in kv.items()]}]


def test_run_instances_unknown_group_refused(sim):
    for kw in (dict(SecurityGroupIds=["sg-0123456789abcdef0"]), dict(SecurityGroups=["nosuch"])):
        with pytest.raises(ClientError) as e:
            sim.launch("t3.nano", wait=False, **kw)
        assert code(e) == "InvalidGroup.NotFound"
    assert not [i for i in sim.status()["instances"] if i["state"] != "terminated"]


def test_group_in_use_cannot_be_deleted(sim):
    gid = sim.ec2.create_security_group(GroupName="tmp-helper", Description="d",
                                        TagSpecifications=tags("security-group", **{RUN: "r"})
                                        )["GroupId"]
    inst = sim.launch("t3.nano", SecurityGroupIds=[gid])
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [gid]
    st = sim.status()
    assert next(i for i in st["instances"] if i["id"] == inst["InstanceId"])[
        "security_groups"] == [gid]
    assert next(g for g in st["security_groups"] if g["id"] == gid)["tags"] == {RUN: "r"}
    with pytest.raises(ClientError) as e:
        sim.ec2.delete_security_group(GroupId=gid)
    assert code(e) == "DependencyViolation"
    sim.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
    with pytest.raises(ClientError) as e:  # shutting-down still holds its interface
        sim.ec2.delete_security_group(GroupId=gid)
    assert code(e) == "DependencyViolation"
    sim.wait_instance(inst["InstanceId"], "terminated")
    sim.ec2.delete_security_group(GroupId=gid)
    with pytest.raises(ClientError) as e:
        sim.ec2.delete_security_group(GroupId=gid)
    assert code(e) == "InvalidGroup.NotFound"


def test_tag_filters(sim):
    """tag-key and tag:KEY filters on every resource type the collector scans."""
    ec2 = sim.ec2
    g_run = ec2.create_security_group(GroupName="f-run", Description="d",
                                      TagSpecifications=tags("security-group", **{RUN: "a"})
                                      )["GroupId"]
    g_done = ec2.create_security_group(GroupName="f-done", Description="d",
                                       TagSpecifications=tags("security-group",
                                                              **{RUN: "b", DONE: "true"})
                                       )["GroupId"]
    ec2.create_key_pair(KeyName="f-run", TagSpecifications=tags("key-pair", **{RUN: "a"}))
    ec2.create_key_pair(KeyName="f-plain")
    v_run = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1,
                              TagSpecifications=tags("volume", **{RUN: "a"}))["VolumeId"]
    v_done = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1,
                               TagSpecifications=tags("volume", **{RUN: "b", DONE: "true"})
                               )["VolumeId"]
    ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)
    i_run = sim.launch("t3.nano", wait=False,
                       TagSpecifications=tags("instance", **{RUN: "a"}))["InstanceId"]
    sim.launch("t3.nano", wait=False)

    def ids(kind, name, values):
        f = [{"Name": name, "Values": values}]
        if kind == "instances":
            return {i["InstanceId"] for r in ec2.describe_instances(Filters=f)["Reservations"]
                    for i in r["Instances"]}
        if kind == "volumes":
            return {v["VolumeId"] for v in ec2.describe_volumes(Filters=f)["Volumes"]}
        if kind == "groups":
            return {g["GroupId"] for g in ec2.describe_security_groups(Filters=f)[
                "SecurityGroups"]}
        return {k["KeyName"] for k in ec2.describe_key_pairs(Filters=f)["KeyPairs"]}

    assert ids("instances", "tag-key", [RUN]) == {i_run}
    assert ids("volumes", "tag-key", [RUN]) == {v_run, v_done}
    assert ids("groups", "tag-key", [RUN]) == {g_run, g_done}
    assert ids("keys", "tag-key", [RUN]) == {"f-run"}
    assert ids("volumes", "tag:" + DONE, ["true"]) == {v_done}
    assert ids("groups", "tag:" + DONE, ["true"]) == {g_done}
    assert ids("instances", "tag:" + DONE, ["true"]) == set()
    assert ids("keys", "tag:" + DONE, ["true"]) == set()
    assert ids("volumes", "tag:" + RUN, ["a"]) == {v_run}
    ec2.terminate_instances(InstanceIds=[i_run])


def test_ebs_direct_blocks_land_in_snapshot(sim):
    """StartSnapshot/PutSnapshotBlock/CompleteSnapshot as AWS checks them; CreateVolume from
    the snapshot holds the bytes; List/GetSnapshotBlock read them back."""
    import base64
    import hashlib
    import os
    import time
    import boto3
    ebs = boto3.client("ebs", endpoint_url=sim.exports["AWS_ENDPOINT_URL"],
                       region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    B = 524288
    s = ebs.start_snapshot(VolumeSize=1, Description="d", ClientToken="tok-1",
                           Tags=[{"Key": RUN, "Value": "r"}])
    sid = s["SnapshotId"]
    assert s["BlockSize"] == B and s["Status"] == "pending" and s["VolumeSize"] == 1
    # ClientToken: the same request again is the same snapshot; another with the same
    # token is a ConflictException (409), as AWS answers it.
    assert ebs.start_snapshot(VolumeSize=1, Description="d", ClientToken="tok-1",
                              Tags=[{"Key": RUN, "Value": "r"}])["SnapshotId"] == sid
    with pytest.raises(ClientError) as e:
        ebs.start_snapshot(VolumeSize=1, ClientToken="tok-1")
    assert code(e) == "ConflictException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert not [v for v in sim.status()["volumes"] if v["file"] is None and v["size"] == 1
                and not v["attachments"]]  # no phantom volume

    def b64(d):
        return base64.b64encode(d).decode()

    def put(idx, data, checksum=None, length=None):
        return ebs.put_snapshot_block(
            SnapshotId=sid, BlockIndex=idx, BlockData=data, DataLength=length or len(data),
            Checksum=checksum or b64(hashlib.sha256(data).digest()),
            ChecksumAlgorithm="SHA256")

    blocks = {0: b"A" * B, 5: os.urandom(B), 2047: b"Z" * B}
    for bad in (dict(idx=2048, data=blocks[0]), dict(idx=1, data=b"x" * 512),
                dict(idx=1, data=blocks[0], checksum=b64(b"\0" * 32))):
        with pytest.raises(ClientError) as e:
            put(**bad)
        assert code(e) == "ValidationException"
    for i, d in blocks.items():
        put(i, d)
    digests = b"".join(hashlib.sha256(blocks[i]).digest() for i in sorted(blocks))
    with pytest.raises(ClientError) as e:  # wrong count
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)
    assert code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:  # wrong aggregate
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3, Checksum=b64(b"\1" * 32),
                              ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    assert code(e) == "ValidationException"
    r = ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3,
                              Checksum=b64(hashlib.sha256(digests).digest()),
                              ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    assert r["Status"] in ("pending", "completed")
    with pytest.raises(ClientError):  # sealed
        put(1, blocks[0])
    end = time.time() + 10
    while sim.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] != "completed":
        assert time.time() < end
        time.sleep(0.05)
    lst = ebs.list_snapshot_blocks(SnapshotId=sid, MaxResults=100)
    assert [b["BlockIndex"] for b in lst["Blocks"]] == [0, 5, 2047] and lst["BlockSize"] == B
    tok = {b["BlockIndex"]: b["BlockToken"] for b in lst["Blocks"]}
    g = ebs.get_snapshot_block(SnapshotId=sid, BlockIndex=5, BlockToken=tok[5])
    data = g["BlockData"].read()
    assert data == blocks[5] and g["Checksum"] == b64(hashlib.sha256(data).digest())
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", SnapshotId=sid)["VolumeId"]
    with open(sim.run("volume-file", vid).strip(), "rb") as f:
        for i, d in blocks.items():
            f.seek(i * B)
            assert f.read(B) == d
    with pytest.raises(ClientError) as e:
        ebs.list_snapshot_blocks(SnapshotId="snap-0000000000000000f")
    assert code(e) == "ResourceNotFoundException"

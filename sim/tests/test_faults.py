"""Fault switches: API errors, boot and attach delays, never-boot, shaped link, killed sessions."""
import subprocess
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError


def test_api_fault_count_consumed(sim):
    sim.run("fault", "api", "DescribeVolumes", "InternalError", "2")
    sim.status()  # the status command must not consume armed faults
    for _ in range(2):
        with pytest.raises(ClientError) as e:
            sim.ec2.describe_volumes()
        assert e.value.response["Error"]["Code"] == "InternalError"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    sim.ec2.describe_volumes()
    sim.run("fault", "api", "RunInstances", "InsufficientInstanceCapacity", "1")
    with pytest.raises(ClientError) as e:
        sim.launch("t3.nano", wait=False)
    assert e.value.response["Error"]["Code"] == "InsufficientInstanceCapacity"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_throttling_is_retried_by_sdk(sim):
    sim.run("fault", "api", "DescribeInstances", "RequestLimitExceeded", "2")
    ex = sim.exports
    c = boto3.client("ec2", endpoint_url=ex["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="x", aws_secret_access_key="y",
                     config=Config(retries={"mode": "standard", "max_attempts": 5}))
    t = time.time()
    c.describe_instances()
    # Two throttled attempts were spent before the third succeeded.
    with pytest.raises(ClientError):  # nothing left armed: a 1-attempt client now succeeds
        sim.run("fault", "api", "DescribeInstances", "RequestLimitExceeded", "1")
        sim.ec2.describe_instances()
    sim.ec2.describe_instances()
    assert time.time() - t < 30


def test_boot_delay_and_never_boot(sim):
    sim.run("fault", "boot-delay", "1.5")
    t = time.time()
    inst = sim.launch("t3.nano", wait=False)
    assert inst["State"]["Name"] == "pending"
    inst = sim.wait_instance(inst["InstanceId"])
    assert time.time() - t >= 1.4
    sim.run("fault", "clear")
    sim.run("fault", "never-boot")
    dead = sim.launch("t3.nano")
    r = subprocess.run(["ssh", "-i", sim.key, "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        f"ec2-user@{dead['PublicIpAddress']}", "true"], capture_output=True)
    assert r.returncode == 255
    ok = sim.launch("t3.nano")  # only the next one: this one boots
    sim.ssh(ok, "true")
    sim.ec2.terminate_instances(InstanceIds=[dead["InstanceId"], ok["InstanceId"],
                                            inst["InstanceId"]])


def test_no_python_image(sim):
    sim.run("fault", "no-python")
    bare = sim.launch("t3.nano")
    full = sim.launch("t3.nano")  # only the next one is bare
    probe = ("python3 -c 'print(1)' 2>/dev/null || echo none; "
             "sudo -n bash -c 'python3 -c 1 2>/dev/null || echo none'")
    assert sim.ssh(bare, probe).stdout.split() == ["none", "none"]
    assert "none" not in sim.ssh(full, probe).stdout
    assert sim.ssh(bare, "command -v sh").stdout.strip()  # the rest of the image is there
    sim.ec2.terminate_instances(InstanceIds=[bare["InstanceId"], full["InstanceId"]])


def test_attach_delay(sim):
    inst = sim.launch("t3.nano")
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    sim.wait_volume(vid, "available")
    sim.run("fault", "attach-delay", "1.2")
    t = time.time()
    sim.ec2.attach_volume(VolumeId=vid, InstanceId=inst["InstanceId"], Device="/dev/sdf")
    sim.wait_volume(vid, "in-use")
    assert time.time() - t >= 1.1
    sim.run("fault", "clear")


def test_link_shaping(sim):
    inst = sim.launch("t3.nano")
    sim.ssh(inst, "true")

    def pull(mb):
        t = time.time()
        sim.ssh(inst, f"head -c {mb}M /dev/zero", timeout=60)
        return time.time() - t

    fast = pull(2)
    sim.run("fault", "link", "8", "20")  # 8 Mbit/s: 2 MiB needs >= 2 s
    slow = pull(2)
    assert slow >= 2.0 and slow > fast
    sim.run("fault", "clear")
    assert pull(2) < slow


def test_kill_sessions(sim):
    inst = sim.launch("t3.nano")
    known = sim.known_hosts(inst["InstanceId"], inst["PublicIpAddress"])
    sim.ssh(inst, "true", known=known)  # sshd answers a moment after `running`
    p = subprocess.Popen(["ssh", "-i", sim.key, "-o", f"UserKnownHostsFile={known}",
                          "-o", "BatchMode=yes", f"ec2-user@{inst['PublicIpAddress']}",
                          "sleep 30"])
    time.sleep(1.0)
    assert p.poll() is None
    sim.run("kill-sessions")
    assert p.wait(timeout=10) == 255
    sim.ssh(inst, "true", known=known)  # the listener survives


TOOL_PROBE = ("for p in blkid wipefs lsblk; do "
              "if command -v $p >/dev/null; then echo $p:present; else echo $p:absent; fi; done; "
              "sh -c \"command -v wipefs || echo wipefs:absent-for-sh\"; "
              "blkid /dev/null; echo blkid-rc=$?; /sbin/blkid -V >/dev/null; "
              "echo sbin-blkid-rc=$?")


def probe_tools(sim, inst):
    # As root's PATH has them (/usr/sbin), with bash's `command -v`, which, unlike dash's,
    # finds a non-executable file too: a missing program must not be there at all.
    r = sim.ssh(inst, f"sudo bash -c '{TOOL_PROBE}'")
    return r.stdout.split(), r.stderr


def test_missing_and_broken_tools(sim):
    sim.run("fault", "broken-tool", "blkid")
    sim.run("fault", "missing-tool", "wipefs", "2")
    a = sim.launch("t3.nano")  # blkid broken, wipefs missing
    b = sim.launch("t3.nano")  # wipefs missing
    sim.run("fault", "missing-tool", "lsblk")
    sim.run("fault", "clear")
    c = sim.launch("t3.nano")  # as the host
    out, err = probe_tools(sim, a)
    assert out == ["blkid:present", "wipefs:absent", "lsblk:present", "wipefs:absent-for-sh",
                   "blkid-rc=4", "sbin-blkid-rc=4"], out
    assert err.count("blkid: simulated failure") == 2
    out, err = probe_tools(sim, b)
    assert out == ["blkid:present", "wipefs:absent", "lsblk:present", "wipefs:absent-for-sh",
                   "blkid-rc=2", "sbin-blkid-rc=0"], out  # blkid finds nothing on /dev/null
    out, err = probe_tools(sim, c)
    assert "wipefs:present" in out and "lsblk:present" in out and "blkid-rc=2" in out
    # Only the faulted name: mkfs.ext4 is a symlink to mke2fs, which stays whole.
    sim.run("fault", "broken-tool", "mkfs.ext4")
    d = sim.launch("t3.nano")
    r = sim.ssh(d, "sudo mkfs.ext4 -V; echo rc=$?; sudo mke2fs -V >/dev/null 2>&1; echo rc=$?")
    assert r.stdout.split() == ["rc=4", "rc=0"] and "mkfs.ext4: simulated failure" in r.stderr
    for bad in (["missing-tool", "a/b"], ["broken-tool", "*"], ["broken-tool", "sh"],
                ["missing-tool"], ["broken-tool", "blkid", "x"]):
        r = sim.run("fault", *bad, check=False)
        assert r.returncode == 1 and r.stderr.startswith("ec2sim: "), (bad, r.stderr)
    sim.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in (a, b, c, d)])

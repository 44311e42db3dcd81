"""Control-plane rules, instances, devices, user-data and snapshots."""
import base64
import json
import os
import subprocess
import time

import pytest
from botocore.exceptions import ClientError


def code(excinfo):
    return excinfo.value.response["Error"]["Code"]


@pytest.fixture(scope="module")
def nitro(sim):
    return sim.launch("t3.micro")


@pytest.fixture(scope="module")
def xen(sim):
    return sim.launch("t2.micro")


def new_volume(sim, zone="us-east-1a", size=1, **kw):
    vid = sim.ec2.create_volume(AvailabilityZone=zone, Size=size, **kw)["VolumeId"]
    return sim.wait_volume(vid, "available")["VolumeId"]


def test_exports_and_warm_up(sim):
    assert set(sim.exports) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                "AWS_REGION", "AWS_EC2_METADATA_DISABLED"}
    t = time.time()
    sim.ec2.describe_images(ImageIds=[sim.ami()])
    assert time.time() - t < 1.0
    t = time.time()
    out = sim.run("up")  # idempotent and fast when already up
    assert time.time() - t < 3 and out.startswith("export AWS_ENDPOINT_URL=")


def test_volume_created_through_creating(sim):
    v = sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=2, Encrypted=True)
    assert v["State"] == "creating" and v["Encrypted"]
    sim.wait_volume(v["VolumeId"], "available")
    path = sim.run("volume-file", v["VolumeId"]).strip()
    assert os.path.getsize(path) == 2 * 1024 ** 3 and os.stat(path).st_blocks == 0
    r = sim.run("volume-file", "vol-0000000000000000", check=False)
    assert r.returncode == 1 and r.stderr.strip()


def test_bad_zone_refused(sim):
    with pytest.raises(ClientError) as e:
        sim.ec2.create_volume(AvailabilityZone="us-east-1z", Size=1)
    assert code(e) == "InvalidParameterValue"


def test_instance_reports_where_sshd_listens(sim, nitro):
    assert nitro["PublicIpAddress"] == nitro["PrivateIpAddress"]
    assert nitro["PublicDnsName"] == nitro["PublicIpAddress"]
    assert nitro["PublicIpAddress"].startswith("169.254.")
    r = sim.ssh(nitro, "id -un; sudo -n id -u; hostname")
    assert r.stdout.split()[:2] == ["ec2-user", "0"]


def test_bogus_ami_type_key_and_arch_refused(sim):
    sim.keypair()
    cases = [dict(ImageId="ami-00000000deadbeef0", InstanceType="t3.micro"),
             dict(ImageId=sim.ami(), InstanceType="t3.bogus"),
             dict(ImageId=sim.ami(), InstanceType="t3.micro", KeyName="no-such-key"),
             dict(ImageId=sim.ami("x86_64"), InstanceType="t4g.micro"),
             dict(ImageId=sim.ami("arm64"), InstanceType="t3.micro")]
    codes = []
    for c in cases:
        c.setdefault("KeyName", sim.keypair())
        with pytest.raises(ClientError) as e:
            sim.ec2.run_instances(MinCount=1, MaxCount=1, **c)
        codes.append(code(e))
    assert codes[0] == "InvalidAMIID.NotFound"
    assert codes[1] == "InvalidParameterValue"
    assert codes[2] == "InvalidKeyPair.NotFound"
    assert codes[3:] == ["InvalidParameterValue"] * 2


def test_arm_image_runs_on_graviton(sim):
    img = sim.ec2.describe_images(ImageIds=[sim.ami("arm64")])["Images"][0]
    assert img["Architecture"] == "arm64"
    inst = sim.launch("t4g.nano")
    sim.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def test_attach_rules(sim, nitro):
    iid = nitro["InstanceId"]
    other_zone = new_volume(sim, zone="us-east-1b")
    with pytest.raises(ClientError) as e:
        sim.ec2.attach_volume(VolumeId=other_zone, InstanceId=iid, Device="/dev/sdf")
    assert code(e) == "InvalidVolume.ZoneMismatch"
    v1, v2 = new_volume(sim), new_volume(sim)
    a = sim.ec2.attach_volume(VolumeId=v1, InstanceId=iid, Device="/dev/sdf")
    assert a["State"] == "attaching"
    with pytest.raises(ClientError) as e:  # in-use, even while still attaching
        sim.ec2.attach_volume(VolumeId=v1, InstanceId=iid, Device="/dev/sdg")
    assert code(e) == "VolumeInUse"
    with pytest.raises(ClientError) as e:
        sim.ec2.attach_volume(VolumeId=v2, InstanceId=iid, Device="/dev/sdf")
    assert code(e) == "InvalidParameterValue"
    sim.wait_volume(v1, "in-use")
    with pytest.raises(ClientError) as e:
        sim.ec2.delete_volume(VolumeId=v1)
    assert code(e) == "VolumeInUse"
    d = sim.ec2.detach_volume(VolumeId=v1)  # no InstanceId: moto alone answers 500
    assert d["State"] == "detaching" and d["InstanceId"] == iid
    sim.wait_volume(v1, "available")
    with pytest.raises(ClientError) as e:
        sim.ec2.detach_volume(VolumeId=v1)
    assert code(e) == "IncorrectState"
    sim.ec2.delete_volume(VolumeId=v1)
    assert sim.run("volume-file", v1, check=False).returncode == 1


def test_attach_to_terminated_refused(sim):
    inst = sim.launch("t3.nano")
    iid = inst["InstanceId"]
    vid = new_volume(sim)
    sim.ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdh")
    sim.wait_volume(vid, "in-use")
    t = sim.ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0]
    assert t["CurrentState"]["Name"] == "shutting-down"
    assert sim.describe(iid)["State"]["Name"] in ("shutting-down", "terminated")
    sim.wait_instance(iid, "terminated")
    sim.wait_volume(vid, "available")  # terminate detaches (not DeleteOnTermination)
    with pytest.raises(ClientError) as e:
        sim.ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdh")
    assert code(e) == "IncorrectState"
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(
        inst["PublicIpAddress"]) == 0


def test_nitro_device_and_write_lands_in_file(sim, nitro):
    vid = new_volume(sim)
    sim.ec2.attach_volume(VolumeId=vid, InstanceId=nitro["InstanceId"], Device="/dev/sdk")
    sim.wait_volume(vid, "in-use")
    link = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_" + vid.replace("-", "")
    r = sim.ssh(nitro, f"sudo test -b /dev/nvme1n1 && readlink -f {link} && "
                "echo hello-ec2sim | sudo dd of=/dev/nvme1n1 bs=512 seek=8 conv=fsync status=none")
    assert r.stdout.strip() == "/dev/nvme1n1"
    vfile = sim.run("volume-file", vid).strip()
    with open(vfile, "rb") as f:
        f.seek(8 * 512)
        assert f.read(12) == b"hello-ec2sim"
    # Like EBS: 512-byte sectors, and no second copy of what is written in the host's page
    # cache (the loop device uses direct I/O on its backing file).
    loop = subprocess.run(["losetup", "-n", "-O", "DIO,LOG-SEC", "-j", vfile],
                          capture_output=True, text=True, check=True).stdout.split()
    assert loop == ["1", "512"]
    sim.ec2.detach_volume(VolumeId=vid, InstanceId=nitro["InstanceId"])
    sim.wait_volume(vid, "available")
    assert sim.ssh(nitro, "test -e /dev/nvme1n1", check=False).returncode == 1


def test_xen_device(sim, xen):
    vid = new_volume(sim)
    sim.ec2.attach_volume(VolumeId=vid, InstanceId=xen["InstanceId"], Device="/dev/sdf")
    sim.wait_volume(vid, "in-use")
    sim.ssh(xen, "sudo test -b /dev/xvdf && ! test -e /dev/nvme1n1 && "
            "sudo mkfs.ext4 -q /dev/xvdf && sudo mount /dev/xvdf /mnt && sudo touch /mnt/x")
    # Detach while mounted: the simulator unmounts lazily as a real detach would break it.
    sim.ec2.detach_volume(VolumeId=vid)
    sim.wait_volume(vid, "available")
    assert subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE",
                           sim.run("volume-file", vid).strip()],
                          capture_output=True, text=True).stdout.strip() == "ext4"


def test_user_data_keys(sim, tmp_path):
    kdir = str(tmp_path)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{kdir}/user"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@x",
                    "-f", f"{kdir}/host"], check=True)
    upub = open(f"{kdir}/user.pub").read().strip()
    hpriv, hpub = open(f"{kdir}/host").read(), open(f"{kdir}/host.pub").read().strip()
    ud = "#cloud-config\nssh_authorized_keys:\n  - " + upub + "\nssh_keys:\n  ed25519_private: |\n"
    ud += "".join("    " + l + "\n" for l in hpriv.splitlines())
    ud += f"  ed25519_public: {hpub}\n"
    inst = sim.launch("t3.micro", UserData=ud)  # boto3 base64-encodes UserData
    known = os.path.join(kdir, "known")
    with open(known, "w") as f:
        f.write(f"{inst['PublicIpAddress']} {' '.join(hpub.split()[:2])}\n")
    r = sim.ssh(inst, "echo ok", key=f"{kdir}/user", known=known)
    assert r.stdout.strip() == "ok"
    out = sim.ec2.get_console_output(InstanceId=inst["InstanceId"])["Output"]
    assert hpub.split()[1] in out
    sim.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


BOOTCMD = """#cloud-config
bootcmd:
  - echo "uid $(id -u) in $INSTANCE_ID" > /run/bootcmd-string
  - [sh, -c, 'printf "%s|" "$@" > /run/bootcmd-argv', sh, "it's", "two words"]
  - readlink /proc/self/fd/0 > /run/bootcmd-stdin
  - echo to-the-boot-log
  - false
  - setsid sh -c 'exec sleep 1000' &
  - sleep 0.5; touch /run/bootcmd-last
  - exit 3
"""


def _host_pids(ns, argv):
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    found = []
    for pid in out.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:-1] == argv:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_bootcmd_runs_before_sshd_and_what_it_starts_dies_with_the_instance(sim):
    """cloud-config bootcmd as cloud-init runs it: root, before sshd, strings as shell lines
    and lists as argv, stdin /dev/null, output and failures in the boot log (the boot goes
    on). A command it backgrounds keeps running inside the instance, survives kill-sessions,
    and ends with the instance."""
    inst = sim.launch("t3.nano", UserData=BOOTCMD)
    iid = inst["InstanceId"]
    r = sim.ssh(inst, "cat /run/bootcmd-string /run/bootcmd-argv /run/bootcmd-stdin; echo; "
                "test -e /run/bootcmd-last && echo last-ran; pgrep -x sleep")
    lines = r.stdout.splitlines()
    assert lines[:4] == [f"uid 0 in {iid}", "it's|two words|/dev/null", "", "last-ran"], lines
    assert len(lines) == 5  # the background sleep, seen inside
    idir = os.path.join(sim.state_dir, "instances", iid)
    log = open(os.path.join(idir, "boot.log")).read()
    assert "to-the-boot-log" in log and "bootcmd exited with status 3" in log
    ns = json.load(open(os.path.join(idir, "info.json")))["ns"]
    pids = _host_pids(ns, [b"sleep", b"1000"])
    assert len(pids) == 1
    sim.run("kill-sessions")
    assert _host_pids(ns, [b"sleep", b"1000"]) == pids
    sim.ec2.terminate_instances(InstanceIds=[iid])
    sim.wait_instance(iid, "terminated")
    assert not os.path.exists(f"/proc/{pids[0]}") or \
        open(f"/proc/{pids[0]}/cmdline", "rb").read() != b"sleep\x001000\x00"


def test_snapshot_copy_and_restore(sim, nitro):
    vid = new_volume(sim)
    path = sim.run("volume-file", vid).strip()
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"snapshot-bytes")
    s = sim.ec2.create_snapshot(VolumeId=vid)
    assert s["State"] == "pending"
    for _ in range(100):
        if sim.ec2.describe_snapshots(SnapshotIds=[s["SnapshotId"]])["Snapshots"][0][
                "State"] == "completed":
            break
        time.sleep(0.05)
    with open(path, "r+b") as f:  # later writes must not reach the snapshot
        f.seek(1 << 20)
        f.write(b"XXXXXXXXXXXXXX")
    with pytest.raises(ClientError):
        sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=0, SnapshotId=s["SnapshotId"])
    v2 = new_volume(sim, size=2, SnapshotId=s["SnapshotId"])
    p2 = sim.run("volume-file", v2).strip()
    assert os.path.getsize(p2) == 2 * 1024 ** 3
    with open(p2, "rb") as f:
        f.seek(1 << 20)
        assert f.read(14) == b"snapshot-bytes"
    st = sim.status()
    assert any(x["id"] == s["SnapshotId"] and x["state"] == "completed" for x in st["snapshots"])


def test_status_shape(sim, nitro):
    st = sim.status()
    assert set(st) == {"timing", "instances", "volumes", "snapshots", "security_groups",
                       "key_pairs"}
    assert st["timing"] == "fast"
    i = next(x for x in st["instances"] if x["id"] == nitro["InstanceId"])
    assert set(i) == {"id", "state", "type", "zone", "address", "image", "key_name", "tags",
                      "security_groups", "ssh_admits", "state_reason", "shutdown"}
    assert i["address"] == nitro["PublicIpAddress"] and i["state"] == "running"
    assert sim.ssh_source(nitro["PublicIpAddress"]) + "/32" in i["ssh_admits"]  # Sim.admit
    assert i["state_reason"] is None and i["shutdown"] is None
    assert i["security_groups"] == [g["GroupId"] for g in nitro["SecurityGroups"]]
    v = st["volumes"][0]
    assert set(v) == {"id", "state", "size", "zone", "encrypted", "file", "tags", "attachments"}
    assert "test-" + sim.name in st["key_pairs"]
    assert all(set(g) == {"id", "name", "tags"} for g in st["security_groups"])


def test_status_matches_api_and_is_fast(sim, nitro):
    """status is served from the daemon's models: same answers as the API, in a few ms."""
    vid = new_volume(sim, TagSpecifications=[{"ResourceType": "volume", "Tags": [
        {"Key": "ec2-backup:run", "Value": "r1"}]}])
    sim.ec2.create_tags(Resources=[nitro["InstanceId"]], Tags=[{"Key": "k", "Value": "v"}])
    times = []
    for _ in range(3):
        t = time.time()
        st = sim.status()
        times.append(time.time() - t)
    assert min(times) < 0.3, times
    i = next(x for x in st["instances"] if x["id"] == nitro["InstanceId"])
    assert i["tags"] == {"k": "v"}
    v = next(x for x in st["volumes"] if x["id"] == vid)
    assert v["tags"] == {"ec2-backup:run": "r1"} and v["state"] == "available"
    api = {x["VolumeId"]: x["State"] for x in sim.ec2.describe_volumes()["Volumes"]}
    assert {x["id"]: x["state"] for x in st["volumes"]} == api
    api = {x["InstanceId"]: x["State"]["Name"] for r in sim.ec2.describe_instances()[
        "Reservations"] for x in r["Instances"]}
    assert {x["id"]: x["state"] for x in st["instances"]} == api


def test_setup_prints_nothing(sim):
    r = subprocess.run([os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "scripts", "ec2sim"), "setup"],
        capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == ""

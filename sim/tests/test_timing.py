"""The aws timing profile (EC2SIM_TIMING=aws), scaled down ten times (EC2SIM_TIMING_SCALE=0.1)
so that the module takes seconds: the order of the state changes and their rough durations,
each checked against its figure in sim/ec2sim/timing.py. The figures' own defaults, unscaled,
are checked by test_timing_aws.py (launch to ssh only)."""
import os
import socket
import subprocess
import sys
import time

import pytest
from botocore.exceptions import ClientError

from conftest import EC2SIM, REPO

sys.path.insert(0, os.path.join(REPO, "sim"))
from ec2sim import timing  # noqa: E402

SCALE = 0.1
SIM_ENV = {"EC2SIM_TIMING": "aws", "EC2SIM_TIMING_SCALE": str(SCALE), "EC2SIM_SEED": "7",
           # a snapshot's fixed part 1 s, its data 0.25 MiB/s once scaled: 64 MiB ~2.6 s
           "EC2SIM_SNAPSHOT_S": "10", "EC2SIM_SNAPSHOT_MIBPS": "2.5"}
AWS = timing.resolve({"EC2SIM_TIMING": "aws"})["figures"]


def fig(name):
    """A figure as this module's simulator has it (scaled), in seconds."""
    return AWS[name] * SCALE


def within(measured, expected, slack=0.6, early=0.1):
    """A duration drawn within +-10 % of expected, plus what polling and the host add (a
    start seen late makes it look shorter by up to `early`)."""
    assert 0.9 * expected - early <= measured <= 1.1 * expected + slack, (measured, expected)


def code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def port22(addr, timeout=0.15):
    """open, refused (sshd not started, network up) or hang (no answer: network down)."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((addr, 22))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except (socket.timeout, TimeoutError):
        return "hang"
    except OSError as e:
        return f"error {e.errno}"
    finally:
        s.close()


def until(pred, timeout=30, step=0.02):
    """Seconds until pred() holds (polled)."""
    t, end = time.time(), time.time() + timeout
    while not pred():
        assert time.time() < end, "timed out"
        time.sleep(step)
    return time.time() - t


def watch_boot(sim, iid, timeout=30):
    """First times (host clock) of running, refused and open on port 22, and every probe
    result in the phase before each (pending, booting, network up)."""
    first, probes, addr = {}, {"pending": set(), "running": set(), "refused": set()}, None
    end = time.time() + timeout
    while "open" not in first:
        assert time.time() < end, (first, probes)
        d = sim.describe(iid)
        now = time.time()
        if d["State"]["Name"] == "running":
            first.setdefault("running", now)
        addr = addr or d.get("PublicIpAddress")
        if not addr:
            time.sleep(0.02)
            continue
        phase = "refused" if "refused" in first else "running" if "running" in first \
            else "pending"
        r = port22(addr)
        if r == "open":
            first.setdefault("refused", time.time())  # (the network was up since)
            first["open"] = time.time()
        elif r == "refused" and "refused" not in first:
            first["refused"] = time.time()
        else:
            probes[phase].add(r)
            time.sleep(0.02)
    return first, probes


def volume_state(sim, vid):
    v = sim.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
    return v["Attachments"][0]["State"] if v["Attachments"] else v["State"]


# --- the figures themselves (no simulator) --------------------------------------------

def test_fast_profile_is_as_before():
    """Without EC2SIM_TIMING, everything is EC2SIM_BOOT_DELAY / EC2SIM_STATE_DELAY as it
    always was, with no jitter and nothing added."""
    spec = timing.resolve({"EC2SIM_BOOT_DELAY": "0.2", "EC2SIM_STATE_DELAY": "0.1"})
    assert spec["profile"] == "fast" and spec["jitter"] == 0 and spec["scale"] == 1
    f = spec["figures"]
    assert f["pending"] == 0.2
    assert {k for k, v in f.items() if v == 0.1} == {
        "start", "volume_create", "attach", "detach", "terminate", "stop", "snapshot"}
    assert {k for k, v in f.items() if v == 0} == {
        "run_api", "net_up", "sshd_up", "snapshot_mibps", "sg_release"}
    t = timing.Timing(spec)
    assert [t.draw("attach") for _ in range(3)] == [0.1] * 3 and t.snapshot(1 << 30) == 0.1
    assert not t.boots_slowly()
    assert timing.resolve({})["figures"]["pending"] == 1.0  # the defaults: 1 s and 0.3 s
    assert timing.resolve({})["figures"]["detach"] == 0.3


def test_aws_figures_seed_and_overrides():
    spec = timing.resolve({"EC2SIM_TIMING": "aws"})
    f = spec["figures"]
    # daemonology ec2-boot-bench: ~29 s from RunInstances to ssh
    assert 28 <= f["run_api"] + f["pending"] + f["net_up"] + f["sshd_up"] <= 30
    assert spec["jitter"] == 0.1 and timing.Timing(spec).boots_slowly()
    assert {x.env for x in timing.FIGURES} == {
        "EC2SIM_RUN_API_S", "EC2SIM_PENDING_S", "EC2SIM_NET_UP_S", "EC2SIM_SSHD_UP_S",
        "EC2SIM_START_S", "EC2SIM_VOLUME_CREATE_S", "EC2SIM_ATTACH_S", "EC2SIM_DETACH_S",
        "EC2SIM_TERMINATE_S", "EC2SIM_STOP_S", "EC2SIM_SNAPSHOT_S", "EC2SIM_SNAPSHOT_MIBPS",
        "EC2SIM_SG_RELEASE_S"}
    assert all(x.source for x in timing.FIGURES)
    env = {"EC2SIM_TIMING": "aws", "EC2SIM_SEED": "42"}
    a, b = (timing.Timing(timing.resolve(env)) for _ in range(2))
    draws = [a.draw("pending") for _ in range(20)]
    assert draws == [b.draw("pending") for _ in range(20)]  # seeded: repeatable
    assert all(4.41 <= d <= 5.39 for d in draws) and len(set(draws)) > 1  # +-10 %
    t = timing.Timing(timing.resolve(dict(env, EC2SIM_JITTER="0", EC2SIM_PENDING_S="2",
                                          EC2SIM_TIMING_SCALE="0.5")))
    assert t.draw("pending") == 1.0
    assert t.snapshot(100 << 20) == (30 + 2) * 0.5  # 100 MiB at 50 MiB/s, scaled
    for bad in ({"EC2SIM_TIMING": "slow"}, {"EC2SIM_ATTACH_S": "soon"},
                {"EC2SIM_DETACH_S": "-1"}, {"EC2SIM_JITTER": "1.5"}):
        with pytest.raises(timing.Bad):
            timing.resolve(bad)


# --- the simulator under the scaled aws profile -----------------------------------------

def test_status_up_and_timing_show_the_profile(sim):
    assert sim.status()["timing"] == "aws"
    again = subprocess.run([EC2SIM, "up"], capture_output=True, text=True,
                           env=dict(sim.env, EC2SIM_TIMING="fast"))
    assert again.returncode == 0 and again.stdout.startswith("export AWS_ENDPOINT_URL=")
    assert "already up with timing aws" in again.stderr
    table = sim.run("timing")
    assert table.startswith("timing profile aws: scale 0.1, jitter +-10 %, seed 7")
    assert "EC2SIM_NET_UP_S" in table and "ec2-boot-bench" not in table  # cited by tag
    assert "[daemonology] running -> port 22 closed 17.2 s" in table
    bad = subprocess.run([EC2SIM, "up"], capture_output=True, text=True,
                         env=dict(sim.env, EC2SIM_NAME=sim.name + "-bad",
                                  EC2SIM_TIMING="slow"))
    assert bad.returncode == 1 and "EC2SIM_TIMING='slow'" in bad.stderr and not bad.stdout
    assert not os.path.exists(sim.status_path() + "-bad")


BOOTCMD_AT = "#cloud-config\nbootcmd:\n  - date +%s.%N > /run/bootcmd-at\n"


def test_launch_pending_then_running_then_network_then_sshd(sim):
    """RunInstances answers after run_api; pending for `pending`; running long before ssh:
    connections hang (network down) for net_up, are refused for sshd_up, then sshd
    accepts. bootcmd runs just before sshd, not at `running`."""
    t0 = time.time()
    inst = sim.launch("t3.nano", wait=False, UserData=BOOTCMD_AT)
    answered = time.time()
    assert inst["State"]["Name"] == "pending"
    within(answered - t0, fig("run_api"), slack=0.4)
    iid = inst["InstanceId"]
    first, probes = watch_boot(sim, iid)
    within(first["running"] - answered, fig("pending"))
    assert not probes["pending"] & {"refused", "open"}, probes
    assert probes["running"] == {"hang"}, probes  # running, but nothing answers
    within(first["refused"] - first["running"], fig("net_up"), slack=0.8)
    assert probes["refused"] <= {"refused"}, probes
    # the network's coming up is seen up to a probe (0.15 s) late
    within(first["open"] - first["refused"], fig("sshd_up"), slack=0.8, early=0.3)
    assert first["open"] - first["running"] >= 0.9 * (fig("net_up") + fig("sshd_up")) - 0.2
    d = sim.describe(iid)
    assert d["State"]["Name"] == "running"
    at = float(sim.ssh(d, "cat /run/bootcmd-at").stdout)
    assert first["refused"] + 0.9 * fig("sshd_up") - 0.3 <= at <= first["open"] + 0.1
    sim.ec2.terminate_instances(InstanceIds=[iid])


def test_volume_created_attached_and_detached_in_their_time(sim):
    """creating, attaching and detaching last their figures; a volume attaches while the
    instance's OS still boots (running, nothing answering) and is there once it is up."""
    inst = sim.launch("t3.nano", wait=False)
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    assert volume_state(sim, vid) == "creating"
    within(until(lambda: volume_state(sim, vid) == "available"), fig("volume_create"))
    inst = sim.wait_instance(inst["InstanceId"])
    assert port22(inst["PublicIpAddress"]) == "hang"
    t = time.time()
    a = sim.ec2.attach_volume(VolumeId=vid, InstanceId=inst["InstanceId"], Device="/dev/sdf")
    assert a["State"] == "attaching"
    until(lambda: volume_state(sim, vid) == "attached")
    within(time.time() - t, fig("attach"))
    until(lambda: port22(inst["PublicIpAddress"]) == "open")
    link = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_" + vid.replace("-", "")
    sim.ssh(inst, f"sudo test -b {link}")
    d = sim.ec2.detach_volume(VolumeId=vid)
    assert d["State"] == "detaching"
    within(until(lambda: volume_state(sim, vid) == "available"), fig("detach"))
    assert sim.ssh(inst, f"test -e {link}", check=False).returncode == 1
    sim.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def test_shutting_down_lasts_and_the_group_stays_in_use_after(sim):
    """shutting-down lasts `terminate`; the instance's security group answers
    DependencyViolation throughout and for sg_release after `terminated`, then goes."""
    gid = sim.ec2.create_security_group(GroupName="held-" + sim.name,
                                        Description="d")["GroupId"]
    inst = sim.launch("t3.nano", SecurityGroupIds=[gid])
    iid = inst["InstanceId"]
    t = time.time()
    assert sim.ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0][
        "CurrentState"]["Name"] == "shutting-down"
    with pytest.raises(ClientError) as e:
        sim.ec2.delete_security_group(GroupId=gid)
    assert code(e) == "DependencyViolation"
    until(lambda: sim.describe(iid)["State"]["Name"] == "terminated")
    terminated = time.time()
    within(terminated - t, fig("terminate"), slack=1.0)  # plus the host's teardown
    with pytest.raises(ClientError) as e:  # terminated, its interface not yet deleted
        sim.ec2.delete_security_group(GroupId=gid)
    assert code(e) == "DependencyViolation"
    held = []

    def deleted():
        try:
            sim.ec2.delete_security_group(GroupId=gid)
            return True
        except ClientError as e:
            held.append(e.response["Error"]["Code"])
            return False
    within(until(deleted, step=0.1), fig("sg_release"))
    assert set(held) == {"DependencyViolation"}
    with pytest.raises(ClientError) as e:
        sim.ec2.delete_security_group(GroupId=gid)
    assert code(e) == "InvalidGroup.NotFound"


def test_snapshot_time_grows_with_the_data(sim):
    """pending -> completed: the fixed part, plus the data written at the configured rate
    (here 64 MiB at 2.5 MiB/s, scaled)."""
    empty, full = (sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
                   for _ in range(2))
    for v in (empty, full):
        until(lambda: volume_state(sim, v) == "available")
    with open(sim.run("volume-file", full).strip(), "r+b") as f:
        for _ in range(64):
            f.write(b"\x5a" * (1 << 20))
    snaps = {v: sim.ec2.create_snapshot(VolumeId=v)["SnapshotId"] for v in (empty, full)}
    t, took = time.time(), {}
    while len(took) < 2:
        for v, s in snaps.items():
            if v not in took and sim.ec2.describe_snapshots(SnapshotIds=[s])["Snapshots"][0][
                    "State"] == "completed":
                took[v] = time.time() - t
        assert time.time() - t < 30
        time.sleep(0.05)
    base = 10 * SCALE
    within(took[empty], base)
    within(took[full], base + 64 / 2.5 * SCALE, slack=1.0)


def test_reboot_boots_as_slowly_again(sim):
    """A reboot keeps the instance running; its network and sshd come back only after the
    boot figures again."""
    inst = sim.launch("t3.nano")
    addr = inst["PublicIpAddress"]
    until(lambda: port22(addr) == "open")
    r = sim.ssh(inst, "sudo reboot", check=False)
    assert r.returncode in (0, 255)
    t = time.time()
    until(lambda: port22(addr) == "hang", timeout=5)  # the network went down with it
    until(lambda: port22(addr) == "open")
    within(time.time() - t, fig("net_up") + fig("sshd_up"), slack=1.0)
    assert sim.describe(inst["InstanceId"])["State"]["Name"] == "running"
    sim.ssh(inst, "true")
    sim.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])

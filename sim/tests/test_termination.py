"""How instances end: DeleteOnTermination set after launch (ModifyInstanceAttribute), and a
shutdown from inside (poweroff on the helper) as EC2 does it, through the simulator's power
shim, which cannot reach the host's init."""
import json
import os
import subprocess
import time

import pytest
from botocore.exceptions import ClientError

SHIM = "/run/ec2sim-power"  # where boot.sh puts power.sh inside an instance
POWER_COMMANDS = ("poweroff", "shutdown", "halt", "reboot", "systemctl", "telinit", "init")
INITIATED = "Client.InstanceInitiatedShutdown"


def code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def new_volume(sim):
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    return sim.wait_volume(vid, "available")["VolumeId"]


def attached(sim, inst, device):
    vid = new_volume(sim)
    sim.ec2.attach_volume(VolumeId=vid, InstanceId=inst["InstanceId"], Device=device)
    sim.wait_volume(vid, "in-use")
    return vid


def by_id(vid):
    return "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_" + vid.replace("-", "")


def write_through_instance(sim, inst, vid, data):
    sim.ssh(inst, f"printf {data} | sudo dd of={by_id(vid)} bs=512 seek=8 conv=fsync "
            "status=none")


def on_file(path, n):
    with open(path, "rb") as f:
        f.seek(8 * 512)
        return f.read(n)


def set_dot(sim, iid, device, value):
    # The request shape aws-sdk and boto3 send: BlockDeviceMapping.1.DeviceName and
    # BlockDeviceMapping.1.Ebs.DeleteOnTermination.
    sim.ec2.modify_instance_attribute(InstanceId=iid, BlockDeviceMappings=[
        {"DeviceName": device, "Ebs": {"DeleteOnTermination": value}}])


def dot_everywhere(sim, iid, vid):
    """DeleteOnTermination of vid as DescribeVolumes, DescribeInstances,
    DescribeInstanceAttribute and the status JSON report it."""
    att = sim.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"][0]
    bdm = next(m for m in sim.describe(iid)["BlockDeviceMappings"]
               if m["Ebs"]["VolumeId"] == vid)
    attr = next(m for m in sim.ec2.describe_instance_attribute(
        InstanceId=iid, Attribute="blockDeviceMapping")["BlockDeviceMappings"]
        if m["Ebs"]["VolumeId"] == vid)
    st = next(v for v in sim.status()["volumes"] if v["id"] == vid)["attachments"][0]
    return [att["DeleteOnTermination"], bdm["Ebs"]["DeleteOnTermination"],
            attr["Ebs"]["DeleteOnTermination"], st["delete_on_termination"]]


def states_until(sim, iid, final, timeout=20):
    """The distinct states iid passes through until final (polled every 20 ms)."""
    seen, end = [], time.time() + timeout
    while time.time() < end:
        s = sim.describe(iid)["State"]["Name"]
        if not seen or seen[-1] != s:
            seen.append(s)
        if s == final:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"{iid} not {final}: {seen}")


def assert_deleted(sim, vid, path):
    with pytest.raises(ClientError) as e:
        sim.ec2.describe_volumes(VolumeIds=[vid])
    assert code(e) == "InvalidVolume.NotFound"
    assert not os.path.exists(path)


def pid_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        return None


def host_init():
    """What identifies the host's PID 1 (a reboot or a new init would change it)."""
    with open("/proc/1/stat") as f:
        start = f.read().rsplit(")", 1)[1].split()[19]
    with open("/proc/1/cmdline", "rb") as f:
        cmdline = f.read()
    return start, cmdline, os.stat("/proc/self/ns/pid").st_ino


def host_shutdown_traces():
    """Files a host shutdown (systemd or sysvinit) leaves: none must appear."""
    return [p for p in ("/run/nologin", "/run/systemd/shutdown/scheduled", "/etc/nologin")
            if os.path.exists(p)]


def instance(sim, status, iid):
    return next(i for i in status["instances"] if i["id"] == iid)


def test_delete_on_termination_set_after_launch(sim):
    """AttachVolume attaches with DeleteOnTermination false; ModifyInstanceAttribute changes
    it; every view reports it; TerminateInstances deletes the volume and its file, or keeps it
    available with its bytes."""
    inst = sim.launch("t3.nano")
    iid = inst["InstanceId"]
    gone, kept = attached(sim, inst, "/dev/sdf"), attached(sim, inst, "/dev/sdg")
    assert dot_everywhere(sim, iid, gone) == [False] * 4
    set_dot(sim, iid, "/dev/sdf", True)
    set_dot(sim, iid, "/dev/sdg", True)
    set_dot(sim, iid, "/dev/sdg", False)  # false again (not a truthy string "false")
    assert dot_everywhere(sim, iid, gone) == [True] * 4
    assert dot_everywhere(sim, iid, kept) == [False] * 4
    with pytest.raises(ClientError) as e:
        set_dot(sim, iid, "/dev/sdz", True)
    assert code(e) == "InvalidInstanceAttributeValue"
    write_through_instance(sim, inst, kept, "kept-bytes")
    gone_file, kept_file = (sim.run("volume-file", v).strip() for v in (gone, kept))
    t = sim.ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0]
    assert t["CurrentState"]["Name"] == "shutting-down"
    # A second call while it shuts down changes nothing (moto alone says terminated at once).
    again = sim.ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0]
    assert again["CurrentState"]["Name"] == "shutting-down"
    assert states_until(sim, iid, "terminated")[-2:] == ["shutting-down", "terminated"]
    assert_deleted(sim, gone, gone_file)
    v = sim.wait_volume(kept, "available")
    assert v["Attachments"] == [] and on_file(kept_file, 10) == b"kept-bytes"
    st = instance(sim, sim.status(), iid)
    assert st["shutdown"] == "user-initiated" and st["state_reason"] == \
        "Client.UserInitiatedShutdown"


def test_power_commands_inside_are_the_shim(sim):
    """Every power command on the helper's PATH, by name or by path, is the shim; only root
    may use it; systemctl's other verbs fail as where systemd is not PID 1. The host's own
    programs are untouched."""
    inst = sim.launch("t3.nano", InstanceInitiatedShutdownBehavior="terminate")
    names = [n for n in POWER_COMMANDS if any(
        os.path.exists(f"{d}/{n}") for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"))]
    paths = [p for p in ("/sbin/poweroff", "/usr/sbin/reboot", "/sbin/halt", "/sbin/shutdown",
                         "/sbin/init", "/usr/bin/systemctl") if os.path.exists(p)]
    assert "poweroff" in names and "/sbin/poweroff" in paths, "the host has no poweroff"
    probe = "; ".join(
        [f'cmp -s "$(readlink -f "$(command -v {n})")" {SHIM} && echo "{n} shim"' for n in names]
        + [f'cmp -s "$(readlink -f {p})" {SHIM} && echo "{p} shim"' for p in paths])
    r = sim.ssh(inst, f"sudo sh -c '{probe}'", check=False)
    assert r.stdout.split("\n")[:-1] == [f"{x} shim" for x in names + paths], r.stdout
    r = sim.ssh(inst, "/sbin/poweroff", check=False)  # not root
    assert r.returncode == 1 and "must be superuser" in r.stderr
    r = sim.ssh(inst, "sudo systemctl status", check=False)
    assert r.returncode == 1 and "not been booted with systemd" in r.stderr
    assert sim.describe(inst["InstanceId"])["State"]["Name"] == "running"
    sim.ssh(inst, "true")
    shim = open(os.path.join(os.path.dirname(__file__), "..", "ec2sim", "power.sh"), "rb").read()
    for p in paths:  # on the host, the binaries are what they were
        assert open(os.path.realpath(p), "rb").read(len(shim)) != shim
    sim.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def test_poweroff_terminates_as_ec2_and_takes_its_volumes(sim):
    """poweroff on a helper launched with InstanceInitiatedShutdownBehavior=terminate:
    shutting-down, then terminated, through the TerminateInstances teardown; its
    DeleteOnTermination volume is deleted with its file, the other one is available with its
    bytes. The host's init is untouched and its sshd is gone."""
    inst = sim.launch("t3.nano", InstanceInitiatedShutdownBehavior="terminate")
    iid = inst["InstanceId"]
    gone, kept = attached(sim, inst, "/dev/sdf"), attached(sim, inst, "/dev/sdg")
    set_dot(sim, iid, "/dev/sdf", True)
    write_through_instance(sim, inst, kept, "kept-bytes")
    gone_file, kept_file = (sim.run("volume-file", v).strip() for v in (gone, kept))
    info = json.load(open(os.path.join(sim.state_dir, "instances", iid, "info.json")))
    before, traces = host_init(), host_shutdown_traces()
    r = sim.ssh(inst, "sudo poweroff", check=False)
    assert r.returncode in (0, 255), r.stderr  # 255: the connection went down with it
    seen = states_until(sim, iid, "terminated")
    assert seen[-2:] == ["shutting-down", "terminated"], seen
    reason = sim.describe(iid)["StateReason"]
    assert reason["Code"] == INITIATED
    st = sim.status()
    assert instance(sim, st, iid)["shutdown"] == "instance-initiated"
    assert instance(sim, st, iid)["state_reason"] == INITIATED
    assert_deleted(sim, gone, gone_file)
    v = sim.wait_volume(kept, "available")
    assert v["Attachments"] == [] and on_file(kept_file, 10) == b"kept-bytes"
    assert pid_start(info["init_pid"]) != info["init_start"]  # its sshd (PID 1) is gone
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert info["ns"] not in netns.split()
    assert host_init() == before and host_shutdown_traces() == traces


def test_every_power_command_shuts_down(sim):
    cmds = ["sudo shutdown -h now", "sudo halt", "sudo systemctl poweroff", "sudo init 0",
            "sudo /sbin/poweroff -f"]
    insts = [sim.launch("t3.nano", wait=False, InstanceInitiatedShutdownBehavior="terminate")
             for _ in cmds]
    for inst, cmd in zip(insts, cmds):
        inst = sim.wait_instance(inst["InstanceId"])
        r = sim.ssh(inst, cmd, check=False)
        assert r.returncode in (0, 255), (cmd, r.stderr)
    for inst, cmd in zip(insts, cmds):
        sim.wait_instance(inst["InstanceId"], "terminated")
        assert sim.describe(inst["InstanceId"])["StateReason"]["Code"] == INITIATED, cmd


def test_raw_reboot_syscall_ends_only_the_instance(sim):
    """Even past the shim, reboot(2) inside a helper ends only that helper: in a pid
    namespace the kernel turns it into the end of the namespace's init. The script refuses
    to call it unless it runs in a pid namespace other than this test's."""
    inst = sim.launch("t3.nano", InstanceInitiatedShutdownBehavior="terminate")
    before = host_init()
    script = (f"import ctypes, os, sys\n"
              f"if os.stat('/proc/self/ns/pid').st_ino == {before[2]}: sys.exit(9)\n"
              f"ctypes.CDLL(None).reboot(0x4321FEDC)\n")  # LINUX_REBOOT_CMD_POWER_OFF
    r = sim.ssh(inst, f'sudo python3 -c "{script}"', check=False)
    # 9: same pid namespace, not run. The kernel ends the caller with status 0 after it kills
    # the namespace's init (reboot_pid_ns: SIGKILL to init, then do_exit(0)), and that 0 can
    # reach ssh before the session's sshd dies with the namespace; or the link drops: 255.
    assert r.returncode in (0, 255), (r.returncode, r.stderr)
    assert states_until(sim, inst["InstanceId"], "terminated")[-1] == "terminated"
    assert host_init() == before


def test_shutdown_with_stop_behaviour_stops(sim):
    """EC2's default InstanceInitiatedShutdownBehavior is stop: stopped, volume attached;
    it starts again with the volume in place."""
    inst = sim.launch("t3.nano")
    iid = inst["InstanceId"]
    assert sim.ec2.describe_instance_attribute(
        InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    vid = attached(sim, inst, "/dev/sdf")
    sim.ssh(inst, "sudo shutdown -h now", check=False)
    assert states_until(sim, iid, "stopped")[-2:] == ["stopping", "stopped"]
    assert sim.describe(iid)["StateReason"]["Code"] == INITIATED
    assert sim.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["State"] == "in-use"
    sim.ec2.start_instances(InstanceIds=[iid])
    inst = sim.wait_instance(iid)
    sim.ssh(inst, f"sudo test -b {by_id(vid)}")
    sim.ec2.terminate_instances(InstanceIds=[iid])


def test_reboot_keeps_it_running(sim):
    """reboot: a new boot (fresh /run, sshd again), the same instance, running throughout,
    its volume still there; not a shutdown even with behaviour terminate."""
    inst = sim.launch("t3.nano", InstanceInitiatedShutdownBehavior="terminate")
    iid = inst["InstanceId"]
    vid = attached(sim, inst, "/dev/sdf")
    sim.ssh(inst, "sudo touch /run/before-reboot")
    r = sim.ssh(inst, "sudo reboot", check=False)
    assert r.returncode in (0, 255)
    end = time.time() + 10
    while True:  # the old sshd goes, the new one answers (connections refused meanwhile)
        assert sim.describe(iid)["State"]["Name"] == "running"
        r = sim.ssh(inst, "test -e /run/before-reboot || echo rebooted", check=False)
        if "rebooted" in r.stdout or time.time() > end:
            break
        time.sleep(0.1)
    assert "rebooted" in r.stdout
    sim.ssh(inst, f"sudo test -b {by_id(vid)}")
    assert sim.describe(iid)["StateReason"]["Code"] == ""
    sim.ec2.terminate_instances(InstanceIds=[iid])


def test_watchdog_in_bootcmd_powers_off_when_the_heartbeat_stops(sim):
    """What the tool arms: a bootcmd loop that powers the helper off once a heartbeat file
    under /run is older than N seconds (here 2). Touched, it stays; left alone, it goes."""
    user_data = """#cloud-config
bootcmd:
  - touch /run/heartbeat
  - |
    ( while sleep 0.2; do
        [ $(( $(date +%s) - $(stat -c %Y /run/heartbeat) )) -lt 2 ] || poweroff
      done ) &
"""
    inst = sim.launch("t3.nano", UserData=user_data,
                      InstanceInitiatedShutdownBehavior="terminate")
    iid = inst["InstanceId"]
    end = time.time() + 3
    while time.time() < end:
        sim.ssh(inst, "sudo touch /run/heartbeat")
        time.sleep(0.5)
    assert sim.describe(iid)["State"]["Name"] == "running"
    t = time.time()
    assert states_until(sim, iid, "terminated", timeout=15)[-2:] == ["shutting-down",
                                                                      "terminated"]
    assert time.time() - t < 8
    assert sim.describe(iid)["StateReason"]["Code"] == INITIATED

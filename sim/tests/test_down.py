"""`down` after the daemon was kill -9'd still removes instances, loops and namespaces
(the module fixture then checks that nothing of this simulator is left on the host)."""
import json
import os
import signal
import subprocess


def test_down_after_daemon_crash(sim):
    inst = sim.launch("t3.nano")
    vid = sim.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    sim.wait_volume(vid, "available")
    sim.ec2.attach_volume(VolumeId=vid, InstanceId=inst["InstanceId"], Device="/dev/sdf")
    sim.wait_volume(vid, "in-use")
    sim.ssh(inst, "sudo mkfs.ext4 -q /dev/nvme1n1 && sudo mount /dev/nvme1n1 /mnt")
    assert sim.state_dir in subprocess.run(["losetup", "-a"], capture_output=True,
                                           text=True).stdout
    entries = [json.loads(l) for l in open(os.path.join(sim.state_dir, "ledger.jsonl"))]
    daemon = next(e["pid"] for e in entries if e.get("role") == "daemon")
    os.kill(daemon, signal.SIGKILL)
    # status fails with one sentence; down (in the fixture) must still clean up.
    r = sim.run("status", check=False)
    assert r.returncode == 1 and r.stderr.strip()

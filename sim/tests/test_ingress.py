"""Security-group ingress on the helpers' port 22, enforced as on EC2: a source the
instance's groups do not admit gets no answer at all (dropped: a connect hangs, never
refused); authorizing it lets it in within a second; revoking it keeps out new connections
while an established session goes on (security groups track connections)."""
import ipaddress
import os
import socket
import subprocess
import time

from conftest import EC2SIM


def port22(addr, timeout=1.5):
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


def until(pred, timeout=5, step=0.05):
    t, end = time.time(), time.time() + timeout
    while not pred():
        assert time.time() < end, "timed out"
        time.sleep(step)
    return time.time() - t


def ssh22(src):
    return [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
             "IpRanges": [{"CidrIp": src}]}]


def admits(sim, iid):
    return next(i for i in sim.status()["instances"] if i["id"] == iid)["ssh_admits"]


def test_port_22_admits_only_what_the_groups_say_and_tracks_sessions(sim):
    gid = sim.ec2.create_security_group(GroupName="closed-" + sim.name,
                                        Description="no ingress yet")["GroupId"]
    inst = sim.launch("t3.nano", SecurityGroupIds=[gid], admit=False)
    addr, iid = inst["PublicIpAddress"], inst["InstanceId"]
    src = sim.ssh_source(addr)
    assert admits(sim, iid) == []
    time.sleep(1)  # sshd answers a moment after `running`: what follows is the group's doing
    # Not admitted: dropped, so the connect hangs until its timeout (never refused).
    t = time.time()
    assert port22(addr) == "hang"
    assert time.time() - t >= 1.4
    r = subprocess.run(["ssh", "-i", sim.key, "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        f"ec2-user@{addr}", "true"], capture_output=True, text=True)
    assert r.returncode == 255 and "timed out" in r.stderr, r.stderr
    # Admitted: reachable within a second of the call (here, before it answers).
    sim.ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=ssh22(f"{src}/32"))
    assert until(lambda: port22(addr, 0.5) == "open", timeout=2) < 1.0
    assert admits(sim, iid) == [f"{src}/32"]
    known = sim.known_hosts(iid, addr)
    session = subprocess.Popen(
        ["ssh", "-i", sim.key, "-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes",
         f"ec2-user@{addr}", "echo ready; read x; echo got-$x"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert session.stdout.readline().strip() == "ready"
        # Revoked: new connections are dropped again; the established session goes on.
        sim.ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=ssh22(f"{src}/32"))
        assert admits(sim, iid) == []
        assert port22(addr) == "hang"
        session.stdin.write("ping\n")
        session.stdin.flush()
        out, err = session.communicate(timeout=10)
    finally:
        session.kill()
    assert (session.returncode, out.strip()) == (0, "got-ping"), err
    sim.ec2.terminate_instances(InstanceIds=[iid])


def test_which_rules_admit_port_22(sim):
    """tcp with a range covering 22, or all protocols (-1), from IpRanges CIDRs or from a
    source group's instances; other ports and protocols admit nothing; groups named at
    launch count, and so does ModifyInstanceAttribute Groups."""
    ec2 = sim.ec2
    name = "rules-" + sim.name
    gid = ec2.create_security_group(GroupName=name, Description="d")["GroupId"]
    peers = ec2.create_security_group(GroupName="peers-" + sim.name,
                                      Description="d")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 20, "ToPort": 21, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 23, "ToPort": 443,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "udp", "FromPort": 0, "ToPort": 65535,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 1024,
         "IpRanges": [{"CidrIp": "10.1.0.0/16"}, {"CidrIp": "10.0.0.0/8"}]}])
    inst = sim.launch("t3.nano", SecurityGroups=[name], admit=False)  # by name
    addr, iid = inst["PublicIpAddress"], inst["InstanceId"]
    assert admits(sim, iid) == ["10.0.0.0/8"]  # merged
    assert port22(addr) == "hang"
    # A source group: the addresses of the instances in it, as they come and go.
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "UserIdGroupPairs": [{"GroupId": peers}]}])
    peer = sim.launch("t3.nano", SecurityGroupIds=[peers], admit=False)
    until(lambda: admits(sim, iid) == ["10.0.0.0/8", peer["PublicIpAddress"] + "/32"])
    ec2.terminate_instances(InstanceIds=[peer["InstanceId"]])
    until(lambda: admits(sim, iid) == ["10.0.0.0/8"])
    # All protocols from a network holding this host.
    net = str(ipaddress.ip_network(sim.ssh_source(addr) + "/24", strict=False))
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": net}]}])
    assert sorted(admits(sim, iid)) == sorted(["10.0.0.0/8", net])
    until(lambda: port22(addr, 0.5) == "open")
    # Another set of groups for the instance: only theirs count from then on.
    ec2.modify_instance_attribute(InstanceId=iid, Groups=[peers])
    assert admits(sim, iid) == []
    assert port22(addr) == "hang"
    ec2.terminate_instances(InstanceIds=[iid])


def test_up_without_nft_fails_in_one_sentence(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin", EC2SIM_NAME="no-nft",
               EC2SIM_STATE_DIR=str(tmp_path / "state"))
    assert not any(os.path.exists(os.path.join(d, "nft")) for d in ("/usr/bin", "/bin"))
    r = subprocess.run([EC2SIM, "up"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("ec2sim: nft is missing: install the Debian package nftables "
                        "(scripts/setup does).\n"), r.stderr
    assert not (tmp_path / "state" / "no-nft").exists()

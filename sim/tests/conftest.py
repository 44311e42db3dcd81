"""Each test module gets its own simulator (unique EC2SIM_NAME), torn down at the end
with a check that nothing of it is left on the host."""
import base64
import ipaddress
import json
import os
import socket
import subprocess
import time
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EC2SIM = os.path.join(REPO, "scripts", "ec2sim")
AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-"


class Sim:
    def __init__(self, name, tmp, extra_env=None):
        self.name, self.tmp = name, tmp
        self.env = dict(os.environ, EC2SIM_NAME=name, EC2SIM_BOOT_DELAY="0.2",
                        EC2SIM_STATE_DELAY="0.1", **(extra_env or {}))
        t = time.time()
        out = self.run("up")
        self.up_seconds = time.time() - t
        self.exports = {}
        for line in out.splitlines():
            assert line.startswith("export "), line
            k, v = line[7:].split("=", 1)
            self.exports[k] = v
        kw = dict(endpoint_url=self.exports["AWS_ENDPOINT_URL"],
                  region_name=self.exports["AWS_REGION"],
                  aws_access_key_id=self.exports["AWS_ACCESS_KEY_ID"],
                  aws_secret_access_key=self.exports["AWS_SECRET_ACCESS_KEY"])
        from botocore.config import Config
        cfg = Config(retries={"mode": "standard", "total_max_attempts": 1})
        self.ec2 = boto3.client("ec2", config=cfg, **kw)
        self.ssm = boto3.client("ssm", **kw)
        self.state_dir = json.loads(json.dumps(self.status_path()))
        self.key = None
        self.admitted = set()  # (group id, source address) rules this Sim authorized

    def status_path(self):
        root = os.environ.get("EC2SIM_STATE_DIR") or os.path.join(REPO, ".sim")
        return os.path.join(root, self.name)

    def run(self, *args, check=True):
        r = subprocess.run([EC2SIM, *args], capture_output=True, text=True, env=self.env)
        if check and r.returncode != 0:
            raise AssertionError(f"ec2sim {' '.join(args)}: rc={r.returncode} {r.stderr}")
        return r.stdout if check else r

    def status(self):
        return json.loads(self.run("status"))

    def ami(self, arch="x86_64"):
        return self.ssm.get_parameter(Name=AL2023 + arch)["Parameter"]["Value"]

    def keypair(self):
        if self.key is None:
            kp = self.ec2.create_key_pair(KeyName="test-" + self.name)
            self.key = os.path.join(self.tmp, "key.pem")
            with open(self.key, "w") as f:
                f.write(kp["KeyMaterial"])
            os.chmod(self.key, 0o600)
        return "test-" + self.name

    def launch(self, itype="t3.micro", wait=True, admit=True, **kw):
        """admit: let this host in on its port 22 (admit()) right after RunInstances, as a
        user does: the simulator enforces security-group ingress."""
        kw.setdefault("KeyName", self.keypair())
        r = self.ec2.run_instances(ImageId=kw.pop("ImageId", None) or self.ami(
            "arm64" if itype.split(".")[0].endswith("g") else "x86_64"),
            InstanceType=itype, MinCount=1, MaxCount=1, **kw)
        inst = r["Instances"][0]
        if admit:
            self.admit(inst)
        return self.wait_instance(inst["InstanceId"]) if wait else inst

    def ssh_source(self, addr, timeout=10):
        """This host's address on the route to addr (what the instance sees connections
        come from), found with a UDP connect; waits for the instance's network to exist
        (until then the route is the default one, not the instance's /30)."""
        end = time.time() + timeout
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.connect((addr, 22))
                src = s.getsockname()[0]
            finally:
                s.close()
            if ipaddress.ip_address(addr) in ipaddress.ip_network(f"{src}/30", strict=False):
                return src
            assert time.time() < end, f"no route to {addr} from its host side ({src})"
            time.sleep(0.02)

    @staticmethod
    def groups(inst):
        """The instance's group ids (its primary interface's when it named none)."""
        ids = [g["GroupId"] for g in inst.get("SecurityGroups") or []]
        for nic in inst.get("NetworkInterfaces") or []:
            ids += [g["GroupId"] for g in nic.get("Groups") or [] if g["GroupId"] not in ids]
        return ids

    def admit(self, inst):
        """Authorizes tcp/22 from this host's address /32 on the instance's first group (the
        VPC's default group when it was launched into none): once per group and address."""
        src = self.ssh_source(inst["PublicIpAddress"])
        gid = self.groups(inst)[0]
        if (gid, src) not in self.admitted:
            try:
                self.ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
                    {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                     "IpRanges": [{"CidrIp": f"{src}/32", "Description": "sim tests"}]}])
            except ClientError as e:
                if e.response["Error"]["Code"] != "InvalidPermission.Duplicate":
                    raise
            self.admitted.add((gid, src))
        return src

    def describe(self, iid):
        return self.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]

    def wait_instance(self, iid, state="running", timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            d = self.describe(iid)
            if d["State"]["Name"] == state:
                return d
            time.sleep(0.05)
        raise AssertionError(f"{iid} not {state}: {d['State']}")

    def wait_volume(self, vid, state, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            v = self.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
            if v["State"] == state and all(a["State"] in ("attached",)
                                           for a in v.get("Attachments", [])):
                return v
            time.sleep(0.05)
        raise AssertionError(f"{vid} not {state}: {v}")

    def known_hosts(self, iid, addr):
        """Host key from GetConsoleOutput, as the real tool pins it."""
        # botocore base64-decodes Output itself (EC2 sends it base64, as the simulator does).
        out = self.ec2.get_console_output(InstanceId=iid)["Output"]
        block = out.split("-----BEGIN SSH HOST KEY KEYS-----")[1].split("-----END")[0]
        path = os.path.join(self.tmp, f"known_hosts_{iid}")
        with open(path, "w") as f:
            for line in block.strip().splitlines():
                t, k = line.split()[:2]
                f.write(f"{addr} {t} {k}\n")
        return path

    def ssh(self, inst, cmd, key=None, check=True, timeout=30, known=None):
        """Runs cmd on the instance; a refused connection is retried for 10 s (a running
        instance's sshd answers a moment after `running`, as on EC2)."""
        addr = inst["PublicIpAddress"]
        known = known or self.known_hosts(inst["InstanceId"], addr)
        refused_until = time.time() + 10
        while True:
            r = subprocess.run(
                ["ssh", "-i", key or self.key, "-o", f"UserKnownHostsFile={known}",
                 "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                 "-o", "ConnectTimeout=5", f"ec2-user@{addr}", cmd],
                capture_output=True, text=True, timeout=timeout)
            if r.returncode != 255 or "Connection refused" not in r.stderr \
                    or time.time() > refused_until:
                break
            time.sleep(0.1)
        if check:
            assert r.returncode == 0, f"ssh {cmd!r}: {r.returncode} {r.stderr}"
        return r


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes tens of seconds (real EC2 timing); in the normal suite, "
        "deselect with -m 'not slow'")


def host_snapshot():
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with open("/proc/mounts") as f:
        mounts = f.read()
    return netns, loops, links, mounts


@pytest.fixture(scope="module")
def sim(request, tmp_path_factory):
    name = f"t{uuid.uuid4().hex[:8]}"
    extra = getattr(request.module, "SIM_ENV", None)
    s = Sim(name, str(tmp_path_factory.mktemp(name)), extra)
    ledger_path = os.path.join(s.state_dir, "ledger.jsonl")
    try:
        yield s
    finally:
        tag = json.load(open(os.path.join(s.state_dir, "config.json")))["tag"]
        entries = [json.loads(l) for l in open(ledger_path)]
        s.run("down")
        netns, loops, links, mounts = host_snapshot()
        assert f"es{tag}" not in netns
        assert f"es{tag}" not in links
        assert s.state_dir not in loops
        assert s.state_dir not in mounts
        # The port-22 filters live in the instances' namespaces, never in the host's ruleset.
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        assert tables.returncode == 0 and "ec2sim" not in tables.stdout, tables
        for e in entries:
            if e["kind"] == "pid" and e.get("start"):
                try:
                    with open(f"/proc/{e['pid']}/stat") as f:
                        start = int(f.read().rsplit(")", 1)[1].split()[19])
                    assert start != e["start"], f"pid {e['pid']} ({e['role']}) survived down"
                except FileNotFoundError:
                    pass
        assert not os.path.exists(s.state_dir)

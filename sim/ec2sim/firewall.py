"""Security-group ingress on each helper's port 22, enforced with nftables inside the
instance's network namespace (nothing on the host's own ruleset).

As on EC2: stateful (a connection already established stays up when the rule that let it
in is revoked: AWS documents that changing a rule does not interrupt its tracked
connections, which go on until they time out); new connections to tcp/22 are admitted only
from the sources the instance's groups admit, every other one dropped silently (a connect
hangs until its timeout, never refused); the rest of the instance's traffic is untouched.

A group's ingress rule admits port 22 if its protocol is tcp with a port range covering
22, or -1 (all). Sources: IpRanges CIDRs, and UserIdGroupPairs (a source group: the
addresses of the live instances in that group). Not modelled: Ipv6Ranges (the simulator
is IPv4; IPv6 to port 22 is dropped), prefix lists, egress rules, and EC2's untracked
flows (a rule open to 0.0.0.0/0 in both directions is not tracked on EC2, so revoking it
cuts its connections at once; here every connection is tracked).

The rules are in place before sshd first answers (apply() at launch, right after the
network is made) and follow AuthorizeSecurityGroupIngress, RevokeSecurityGroupIngress,
ModifySecurityGroupRules and ModifyInstanceAttribute Groups before those calls answer;
a poller catches every other change (a new or terminated instance of a source group, a
deleted group, ModifyNetworkInterfaceAttribute) within POLL_S."""
import ipaddress
import subprocess
import threading
import time
import traceback

TABLE = "inet ec2sim"
SET = "ssh_admit"
POLL_S = 0.5
RULESET = f"""\
table {TABLE} {{
  set {SET} {{ type ipv4_addr; flags interval; }}
  chain input {{
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    iif "lo" accept
    tcp dport 22 ip saddr @{SET} accept
    tcp dport 22 drop
  }}
}}
"""
GONE = ("shutting-down", "terminated")


def _nft(ns, script):
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "nft", "-f", "-"],
                       input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nft in {ns} failed: {r.stderr.strip()}")


def _group_id(g):
    return g if isinstance(g, str) else g.id


def instance_groups(backend, mi):
    """Ids of the groups the instance's network interfaces use: its own (RunInstances
    SecurityGroups/SecurityGroupIds, ModifyInstanceAttribute Groups) or, with none given,
    those moto put on its primary interface (the VPC's default group); plus those of
    any other interface."""
    ids = [_group_id(g) for g in list(mi.security_groups or [])]
    nics = dict(getattr(mi, "nics", None) or {})
    for i, nic in sorted(nics.items()):
        if i == 0 and ids:
            continue
        ids += [_group_id(g) for g in list(getattr(nic, "_group_set", None) or [])]
    if not ids:
        g = backend.get_default_security_group(getattr(mi, "vpc_id", None))
        if g is not None:
            ids.append(g.id)
    return list(dict.fromkeys(ids))


def _covers_22(rule):
    if rule.ip_protocol == "-1":
        return True
    return (rule.ip_protocol == "tcp" and rule.from_port is not None and
            rule.to_port is not None and int(rule.from_port) <= 22 <= int(rule.to_port))


def _members(backend, gid):
    """Addresses of the live simulated instances that use group gid (a source group)."""
    out = []
    for res in list(backend.reservations.values()):
        for mi in list(res.instances):
            addr = getattr(mi, "_sim_addr", None)
            if addr and mi._state.name not in GONE and gid in instance_groups(backend, mi):
                out.append(addr + "/32")
    return out


def admits(backend, mi):
    """The IPv4 networks the instance's groups admit to tcp/22, merged (sorted strings)."""
    nets = []
    for gid in instance_groups(backend, mi):
        g = backend.get_security_group_from_id(gid)
        if g is None:
            continue
        for rule in list(g.ingress_rules):
            if not _covers_22(rule):
                continue
            cidr = (rule.ip_range or {}).get("CidrIp")
            if cidr:
                nets.append(cidr)
            src = (rule.source_group or {}).get("GroupId")
            if src:
                nets += _members(backend, src)
    out = []
    for n in nets:
        try:
            out.append(ipaddress.IPv4Network(n, strict=False))
        except ValueError:
            pass
    return [str(n) for n in ipaddress.collapse_addresses(out)]


def _compute(backend, mi):
    # Request threads change moto's dicts while we read them: retry on a torn read.
    for _ in range(20):
        try:
            return admits(backend, mi)
        except RuntimeError:  # "dictionary changed size during iteration"
            pass
    return admits(backend, mi)


def apply(inst, create=False):
    """Brings the instance's port-22 set in line with its groups (create: make the table
    first, at launch). The element list is replaced in one nft transaction, so a
    connection attempt sees either the old set or the new one."""
    with inst.fw_lock:  # a refresh waits for the launch's apply, then sees its rules
        if inst.gone or not inst.ns or (inst.admits is None and not create):
            return
        want = _compute(inst.backend, inst.mi)
        if not create and want == inst.admits:
            return
        script = RULESET if create else ""
        script += f"flush set {TABLE} {SET}\n"
        if want:
            script += f"add element {TABLE} {SET} {{ {', '.join(want)} }}\n"
        _nft(inst.ns, script)
        inst.admits = want
        inst.mi._sim_ssh_admits = want  # for `status` (statusview)


def refresh(sim):
    for inst in list(sim.insts.values()):
        if inst.gone:
            inst.mi._sim_ssh_admits = []
            continue
        try:
            apply(inst)
        except Exception:
            if not inst.gone:  # its namespace may have gone under us: that is no error
                traceback.print_exc()


def install(sim):
    """Wraps the API calls that change what an instance admits (refreshing before they
    answer) and starts the poller for the rest."""
    from moto.ec2.models import EC2Backend

    def after(name):
        orig = getattr(EC2Backend, name)

        def wrapped(self, *a, **kw):
            res = orig(self, *a, **kw)
            refresh(sim)
            return res
        wrapped.__name__ = name
        setattr(EC2Backend, name, wrapped)

    for name in ("authorize_security_group_ingress", "revoke_security_group_ingress",
                 "modify_security_group_rules", "modify_instance_security_groups"):
        after(name)

    def poll():
        while True:
            time.sleep(POLL_S)
            try:
                refresh(sim)
            except Exception:
                traceback.print_exc()
    threading.Thread(target=poll, name="firewall", daemon=True).start()

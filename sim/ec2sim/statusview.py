"""The `status` JSON, built in the daemon straight from moto's backend models and served on
GET /_ec2sim/status. The CLI then needs no boto3 and no API calls (it was ~2 s per call;
this is a few ms), and armed API faults are never consumed since no EC2 action runs."""
import json
import os
import time

from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

PATH = "/_ec2sim/status"
TIMING = "fast"  # the daemon's timing profile (timing.py), set by daemon.main
REGION = "us-east-1"  # the region the exports name; the only one status ever reported
# An instance's "shutdown": who stopped or terminated it, from EC2's StateReason code.
SHUTDOWN = {"Client.InstanceInitiatedShutdown": "instance-initiated",
            "Client.UserInitiatedShutdown": "user-initiated"}


def _tags(backend, rid):
    # backend.tags is a defaultdict: .get, so that reading never adds an entry.
    return dict(backend.tags.get(rid) or {})


def _snapshot(backend, sdir):
    out = {"timing": TIMING, "instances": [], "volumes": [], "snapshots": [],
           "security_groups": [], "key_pairs": []}
    for res in list(backend.reservations.values()):
        for mi in list(res.instances):
            reason = getattr(mi.state_reason, "code", None) or None
            out["instances"].append({
                "id": mi.id, "state": mi._state.name, "type": mi.instance_type,
                "zone": mi._placement.zone, "address": mi.public_ip or None,
                "image": mi.image_id, "key_name": mi.key_name or None,
                "tags": _tags(backend, mi.id),
                "security_groups": [g if isinstance(g, str) else g.id
                                    for g in list(mi.security_groups or [])],
                # The sources its port 22 admits now, as enforced (firewall.py).
                "ssh_admits": list(getattr(mi, "_sim_ssh_admits", None) or []),
                "state_reason": reason, "shutdown": SHUTDOWN.get(reason)})
    for v in list(backend.volumes.values()):
        f = os.path.join(sdir, "volumes", v.id + ".img")
        att = v.attachment
        out["volumes"].append({
            "id": v.id, "state": v.status, "size": v.size, "zone": v.zone.name,
            "encrypted": bool(v.encrypted), "file": f if os.path.exists(f) else None,
            "tags": _tags(backend, v.id),
            "attachments": [{"instance": att.instance.id, "device": att.device,
                             "state": att.status,
                             "delete_on_termination": att.delete_on_termination}]
            if att else []})
    for s in list(backend.snapshots.values()):
        if getattr(s, "from_ami", None):
            continue  # moto's ~1300 snapshots behind its AMIs: not the user's
        vol = s.volume
        f = os.path.join(sdir, "snapshots", s.id + ".img")
        out["snapshots"].append({"id": s.id, "state": s.status, "progress": s.progress,
                                 "volume": vol.id if vol else None,
                                 "size": vol.size if vol else None,
                                 "tags": _tags(backend, s.id),
                                 "encrypted": bool(s.encrypted),
                                 "kms_key_id": s.kms_key_id or None,
                                 "start_time": getattr(s.start_time, "isoformat",
                                                       lambda: None)(),
                                 # DeleteSnapshot accepted while pending: goes once it ends
                                 "deleting": bool(getattr(s, "_sim_delete", False)),
                                 "file": f if os.path.exists(f) else None})
    for groups in list(backend.groups.values()):
        for g in list(groups.values()):
            out["security_groups"].append({"id": g.id, "name": g.name,
                                           "tags": _tags(backend, g.id)})
    out["key_pairs"] = [k.key_name for k in list(backend.key_pairs.values())]
    return out


def build(sdir):
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    # Request threads mutate these dicts while we read: a copy can still race, so retry.
    for _ in range(20):
        try:
            return _snapshot(backend, sdir)
        except RuntimeError:  # "dictionary changed size during iteration"
            time.sleep(0.005)
    return _snapshot(backend, sdir)


def app_route(sdir, start_response):
    body = json.dumps(build(sdir), indent=1, default=str).encode() + b"\n"
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

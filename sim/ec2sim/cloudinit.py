"""The part of cloud-init the simulator honours: `#cloud-config` user-data with
ssh_authorized_keys, ssh_keys and bootcmd, and the host-key block it prints on the console."""
import base64
import subprocess
import tempfile

import yaml

KEY_TYPES = ("rsa", "ecdsa", "ed25519")


def parse_user_data(raw):
    """raw: the decoded user-data text (or None). Returns the cloud-config dict or {}."""
    if not raw:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not raw.lstrip().startswith("#cloud-config"):
        return {}
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def decode_user_data(user_data):
    """moto keeps user-data as a Base64EncodedString (or a list of them, or a str)."""
    if user_data is None:
        return None
    if isinstance(user_data, list):
        user_data = user_data[0] if user_data else None
        if user_data is None:
            return None
    if hasattr(user_data, "decode"):
        try:
            return user_data.decode()
        except Exception:
            pass
    s = str(user_data)
    try:
        return base64.b64decode(s, validate=True).decode("utf-8", "replace")
    except Exception:
        return s


def authorized_keys(cfg):
    keys = cfg.get("ssh_authorized_keys") or []
    if isinstance(keys, str):
        keys = [keys]
    return [str(k).strip() for k in keys if str(k).strip()]


def host_keys(cfg):
    """{type: (private, public-or-None)} from ssh_keys, e.g. ed25519_private/ed25519_public."""
    given = cfg.get("ssh_keys") or {}
    out = {}
    if not isinstance(given, dict):
        return out
    for t in KEY_TYPES:
        priv = given.get(f"{t}_private")
        if priv:
            out[t] = (str(priv), given.get(f"{t}_public"))
    return out


def bootcmd_script(cfg):
    """The /bin/sh script cloud-init's cc_bootcmd writes and runs (util.shellify): a string
    entry is one line of shell, a list entry is argv, each word single-quoted. None if the
    cloud-config has no bootcmd; entries of another type are skipped (cloud-init fails them)."""
    cmds = cfg.get("bootcmd")
    if not isinstance(cmds, list) or not cmds:
        return None
    lines = ["#!/bin/sh"]
    for c in cmds:
        if isinstance(c, (list, tuple)):
            lines.append(" ".join("'" + str(a).replace("'", "'\\''") + "'" for a in c))
        elif isinstance(c, str):
            lines.append(c)
    return "\n".join(lines) + "\n"


def fingerprint(pub):
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as f:
        f.write(pub + "\n")
        f.flush()
        r = subprocess.run(["ssh-keygen", "-l", "-f", f.name], capture_output=True, text=True)
    return r.stdout.strip()


def console_text(instance_id, hostname, pubkeys):
    """What GetConsoleOutput returns once cloud-init ran: the blocks ec2 tools parse."""
    lines = [f"[    0.000000] Linux version 6.1.0 (ec2sim) #1 SMP",
             f"[    1.000000] cloud-init[100]: Cloud-init v. 23.4 running 'init' ({instance_id})"]
    if pubkeys:
        # cloud-init prints user keys without the comment; keep "root@host" like AL2023 does.
        lines.append("-----BEGIN SSH HOST KEY FINGERPRINTS-----")
        lines += [fingerprint(k) for k in pubkeys]
        lines.append("-----END SSH HOST KEY FINGERPRINTS-----")
        lines.append("-----BEGIN SSH HOST KEY KEYS-----")
        for k in pubkeys:
            parts = k.split()
            lines.append(f"{parts[0]} {parts[1]} root@{hostname}")
        lines.append("-----END SSH HOST KEY KEYS-----")
    lines.append(f"[    2.000000] cloud-init[200]: Cloud-init v. 23.4 finished. Datasource DataSourceEc2.")
    return "\n".join(lines) + "\n"

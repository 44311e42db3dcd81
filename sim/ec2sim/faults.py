"""Fault switches: a JSON file in the state dir, written by the CLI and re-read (and, for
counted faults, consumed) by the daemon, both under the same flock."""
import os

from .config import locked, read_json, write_json

# HTTP status EC2 uses for an error code; everything else is a 400 client error.
HTTP_STATUS = {"InternalError": 500, "InternalFailure": 500, "ServiceUnavailable": 503,
               "Unavailable": 503}


def _paths(sdir):
    return os.path.join(sdir, "faults.json"), os.path.join(sdir, "faults.lock")


def load(sdir):
    path, _ = _paths(sdir)
    return read_json(path, {}) or {}


def update(sdir, fn):
    path, lock = _paths(sdir)
    with locked(lock):
        data = read_json(path, {}) or {}
        result = fn(data)
        write_json(path, data)
    return result


def clear(sdir):
    update(sdir, lambda d: d.clear())


def take_api(sdir, action):
    """Consume one armed failure for action; returns the error code or None."""
    path, _ = _paths(sdir)
    if not os.path.exists(path):
        return None  # the common case: no lock, no parse

    def fn(d):
        api = d.get("api") or {}
        ent = api.get(action)
        if not ent or ent.get("count", 0) <= 0:
            return None
        ent["count"] -= 1
        if ent["count"] <= 0:
            del api[action]
        return ent["code"]

    return update(sdir, fn)


def take_never_boot(sdir):
    return _take_one(sdir, "never_boot")


def take_no_python(sdir):
    return _take_one(sdir, "no_python")


def take_tools(sdir, key):
    """Uses up one boot of each program armed under key ("missing_tools" or
    "broken_tools": {program: boots left}); returns those programs, sorted."""
    def fn(d):
        armed = d.get(key) or {}
        taken = sorted(p for p, n in armed.items() if n > 0)
        for p in taken:
            armed[p] -= 1
            if armed[p] <= 0:
                del armed[p]
        return taken

    return update(sdir, fn)


def _take_one(sdir, key):
    """Uses up one of a counted fault; True if there was one left."""
    def fn(d):
        n = d.get(key, 0)
        if n > 0:
            d[key] = n - 1
            return True
        return False

    return update(sdir, fn)

"""Fault switches: a JSON file in the state dir, written by the CLI and re-read (and, for
counted faults, consumed) by the daemon, both under the same flock."""
import os

from .config import locked, read_json, write_json

# HTTP status EC2 uses for an error code; everything else is a 400 client error.
HTTP_STATUS = {"InternalError": 500, "InternalFailure": 500, "ServiceUnavailable": 503,
               "Unavailable": 503}

# The EBS direct APIs (restJson1): their actions, and the HTTP status AWS answers each error
# code with ("Error retries for EBS direct APIs", EBS User Guide: InternalServerException
# 500; ThrottlingException and RequestThrottledException 400; ValidationException 400;
# ResourceNotFoundException 404; ConflictException 409; AccessDeniedException 403;
# ServiceQuotaExceededException 402; InvalidSignatureException 403). Unknown codes: 400.
EBS_ACTIONS = ("StartSnapshot", "PutSnapshotBlock", "CompleteSnapshot", "ListSnapshotBlocks",
               "ListChangedBlocks", "GetSnapshotBlock")
EBS_STATUS = {"InternalServerException": 500, "InternalFailure": 500,
              "ServiceUnavailable": 503, "ServiceUnavailableException": 503,
              "ThrottlingException": 400, "RequestThrottledException": 400,
              "ConcurrentLimitExceededException": 400, "ValidationException": 400,
              "ResourceNotFoundException": 404, "ConflictException": 409,
              "AccessDeniedException": 403, "InvalidSignatureException": 403,
              "ServiceQuotaExceededException": 402}
# The Reason a modelled EBS error carries (botocore's ebs service model enums).
EBS_REASON = {"ResourceNotFoundException": "SNAPSHOT_NOT_FOUND",
              "AccessDeniedException": "UNAUTHORIZED_ACCOUNT",
              "RequestThrottledException": "ACCOUNT_THROTTLED",
              "ValidationException": "INVALID_PARAMETER_VALUE",
              "ServiceQuotaExceededException": "DEPENDENCY_SERVICE_QUOTA_EXCEEDED"}
EBS_RATE_DEFAULT = 1000  # PutSnapshotBlock (and GetSnapshotBlock) per snapshot per second


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


class Cache:
    """The faults file as last read, re-read only when it changed (write_json replaces it:
    a new inode): a stat per request on the EBS direct hot path, no lock, no parse."""

    def __init__(self, sdir):
        self.sdir = sdir
        self.path = _paths(sdir)[0]
        self._key, self._data = None, {}

    def get(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._data, self._key = read_json(self.path, {}) or {}, key
        return self._data

    def take_api(self, action):
        """take_api, skipping the locked read-modify-write unless action looks armed."""
        if action not in (self.get().get("api") or {}):
            return None
        return take_api(self.sdir, action)


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

"""The EBS direct APIs (StartSnapshot, PutSnapshotBlock, CompleteSnapshot, ListSnapshotBlocks,
ListChangedBlocks, GetSnapshotBlock), checked as AWS checks them, with the data in the
snapshot's file, answered on the wire as AWS answers them (restJson1).

moto 5.2.5 reports BlockSize 512, validates nothing, keeps block bytes in memory, leaves a
phantom volume behind StartSnapshot and compares the wrong blocks in ListChangedBlocks; none
of its EBS code is used. Here: 524288-byte blocks, SHA-256 per block, index within the
volume, LINEAR aggregate at CompleteSnapshot, StartSnapshot's Timeout, ClientToken
idempotency, and the bytes go into STATE/snapshots/SNAP.img, which CreateVolume copies
(runtime.created), so a volume made from the snapshot holds them. The snapshot itself is
moto's EC2 Snapshot (DescribeSnapshots, CreateVolume, DeleteSnapshot see it, rules.py);
the blocks' digests and tokens are kept here.

`Api.handle` is the whole wire protocol: ebsserver.py (the lean endpoint,
AWS_ENDPOINT_URL_EBS) and the moto port's /snapshots routes (daemon.py) both call it. On the
way it applies the fault switches: `fault api ACTION CODE COUNT`, `fault ebs-latency MS`,
`fault ebs-rate N` (faults.py).

Wire format (botocore's ebs service model, aws-sdk-ebs):
  POST /snapshots                          StartSnapshot, JSON in and out, 201
  PUT  /snapshots/ID/blocks/IDX            PutSnapshotBlock: the raw 524288 bytes, headers
       x-amz-Data-Length, x-amz-Checksum, x-amz-Checksum-Algorithm, x-amz-Progress; 201
       with x-amz-Checksum, x-amz-Checksum-Algorithm
  POST /snapshots/completion/ID            CompleteSnapshot: headers x-amz-ChangedBlocksCount,
       x-amz-Checksum, x-amz-Checksum-Algorithm, x-amz-Checksum-Aggregation-Method; 202
       {"Status": "pending"}
  GET  /snapshots/ID/blocks?pageToken&maxResults&startingBlockIndex    ListSnapshotBlocks
  GET  /snapshots/ID/changedblocks?firstSnapshotId&pageToken&...       ListChangedBlocks
  GET  /snapshots/ID/blocks/IDX?blockToken=T  GetSnapshotBlock: the raw bytes, headers
       x-amz-Data-Length, x-amz-Checksum, x-amz-Checksum-Algorithm
  Errors: HTTP status per code (faults.EBS_STATUS), header
  `x-amzn-ErrorType: CODE:http://internal.amazon.com/coral/com.amazon.zeppelindataservice/`
  (as in aws-sdk-ebs's own protocol tests) and body {"message": ..., "Reason": ...}: what
  aws-smithy-json and botocore parse the code and message from."""
import base64
import hashlib
import json
import mmap
import os
import re
import threading
import time
import traceback
import uuid
from email.utils import formatdate
from urllib.parse import parse_qs, unquote

from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from . import faults, hostops, rules, runtime

BLOCK = 524288
BLOCKS_PER_GIB = (1 << 30) // BLOCK
MAX_GIB = 65536  # StartSnapshot VolumeSize limit (64 TiB)
TIMEOUT_MIN = (10, 4320, 60)  # StartSnapshot Timeout, minutes: range and default (API ref.)
TOKEN_TTL = 7 * 86400  # ExpiryTime of the block tokens listed (not enforced)
ERROR_NS = "http://internal.amazon.com/coral/com.amazon.zeppelindataservice/"
REGION = "us-east-1"
SNAP_ID = re.compile(r"^snap-[0-9a-f]+$")


class EbsError(Exception):
    def __init__(self, code, status, msg, reason=None):
        super().__init__(msg)
        self.code, self.status, self.msg, self.reason = code, status, msg, reason


def invalid(msg, reason="INVALID_PARAMETER_VALUE"):
    return EbsError("ValidationException", 400, msg, reason)


def not_found(sid):
    return EbsError("ResourceNotFoundException", 404,
                    f"The snapshot '{sid}' does not exist.", "SNAPSHOT_NOT_FOUND")


def throttled(sid, action, rate):
    # Per snapshot: RequestThrottledException ("the maximum allowed API request throttling
    # limit for the snapshot", thrown by GetSnapshotBlock and PutSnapshotBlock: "Error
    # retries for EBS direct APIs"); Reason RESOURCE_LEVEL_THROTTLE (the service model).
    return EbsError("RequestThrottledException", 400,
                    f"Rate exceeded: {action} on {sid} is limited to {rate} requests per "
                    "second.", "RESOURCE_LEVEL_THROTTLE")


def _b64(data):
    return base64.b64encode(data).decode()


class Block:
    """A written block: its digest (for the LINEAR aggregate and ListChangedBlocks) and its
    token (base64, as the model's pattern ^[A-Za-z0-9+/=]+$ says). A child snapshot shares
    its parent's Block objects for the blocks it did not write: same tokens, unchanged."""
    __slots__ = ("digest", "token")

    def __init__(self, digest):
        self.digest = digest
        self.token = _b64(os.urandom(24))


class Direct:
    """A StartSnapshot snapshot, beside moto's EC2 Snapshot `es` of the same ID."""

    def __init__(self, es, size, parent, base, encrypted):
        self.es = es
        self.id = es.id
        self.status = "pending"
        self.start_time = time.time()
        self.volume_size = size
        self.parent = parent  # ParentSnapshotId or None
        self.base = base  # leading blocks a CreateSnapshot parent covers (its volume)
        self.encrypted = encrypted
        self.blocks = {}  # index -> Block, inherited ones included
        self.written = {}  # index -> digest, this snapshot's own PutSnapshotBlocks
        self.deadline = self.span = 0.0
        self.fd = self.dfd = None  # the snapshot file, open while it takes blocks
        self.users = 0  # puts using fd now
        self.closing = False  # no more puts: fd closes with the last user
        self.lock = threading.Lock()


def _int(v, what, lo=None, hi=None, reason="INVALID_PARAMETER_VALUE"):
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise invalid(f"Invalid {what} {v!r}.", reason)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise invalid(f"{what} {n} is out of range {lo}-{hi}.", reason)
    return n


class Api:
    def __init__(self, sim):
        self.sim = sim
        self.faults = faults.Cache(sim.sdir)
        self.snaps = {}  # id -> Direct
        self.tokens = {}  # ClientToken -> (request parameters, snapshot id)
        self.lock = threading.Lock()
        self.buckets = {}  # (action, snapshot id) -> [tokens, last refill time]
        self.bucket_lock = threading.Lock()
        self._ec2 = None
        sim.fill_unwritten = self.fill_unwritten  # runtime.created calls it

    # ---- state ---------------------------------------------------------------------
    def ec2(self):
        b = self._ec2
        if b is None:  # moto's BackendDict lookup costs ~45 us: once
            b = self._ec2 = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
        return b

    def _acquire(self, s):
        """The snapshot file's descriptors for one put, (buffered, O_DIRECT or None): opened
        once, closed (_close) when the snapshot stops taking blocks and no put still uses
        them (never a stale number). O_DIRECT, as the loop devices use it: a block costs
        the host no copy into the page cache (~0.07 ms of CPU less a put)."""
        with s.lock:
            if s.closing:
                raise invalid(f"The snapshot '{s.id}' is not in the pending state.",
                              "INVALID_SNAPSHOT_ID")
            if s.fd is None:
                path = self.sim.snap_file(s.id)
                s.fd = os.open(path, os.O_WRONLY)
                try:
                    s.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
                except (OSError, AttributeError):  # a filesystem without it (tmpfs)
                    s.dfd = None
            s.users += 1
            return s.fd, s.dfd

    @staticmethod
    def _release(s):
        with s.lock:
            s.users -= 1
            if s.closing and not s.users:
                Api._close_fds(s)

    @staticmethod
    def _close(s):
        with s.lock:
            s.closing = True
            if not s.users:
                Api._close_fds(s)

    @staticmethod
    def _close_fds(s):
        for fd in (s.fd, s.dfd):
            if fd is not None:
                os.close(fd)
        s.fd = s.dfd = None

    def snap(self, sid):
        s = self.snaps.get(sid)
        if s is None or sid not in self.ec2().snapshots:  # deleted (rules.py, runtime.py)
            raise not_found(sid)
        return s

    def start_snapshot(self, p):
        size = p.get("VolumeSize")
        parent, encrypted = p.get("ParentSnapshotId"), bool(p.get("Encrypted"))
        kms_key, token, timeout = p.get("KmsKeyArn"), p.get("ClientToken"), p.get("Timeout")
        ident = json.dumps({k: v for k, v in p.items() if k != "ClientToken"}, sort_keys=True)
        with self.lock:
            if token and token in self.tokens:
                same, sid = self.tokens[token]
                if sid in self.snaps and sid in self.ec2().snapshots:  # not if deleted since
                    if same != ident:  # "Ensuring idempotency in StartSnapshot" (EBS guide)
                        raise EbsError("ConflictException", 409,
                                       "The request uses the same client token as a "
                                       "previous, but non-identical request.")
                    return self.snaps[sid]
        if size is None:
            raise invalid("VolumeSize is required.", "INVALID_VOLUME_SIZE")
        size = _int(size, "VolumeSize", reason="INVALID_VOLUME_SIZE")
        if not 1 <= size <= MAX_GIB:
            raise invalid(f"Volume size {size} GiB is out of range 1-{MAX_GIB}.",
                          "INVALID_VOLUME_SIZE")
        ec2 = self.ec2()
        psnap = None
        if parent:
            if encrypted:
                raise invalid("ParentSnapshotId cannot be used with Encrypted.")
            try:
                psnap = ec2.get_snapshot(parent)
            except Exception:
                raise EbsError("ResourceNotFoundException", 404,
                               f"The parent snapshot '{parent}' does not exist.",
                               "DEPENDENCY_RESOURCE_NOT_FOUND")
            if psnap.status != "completed":
                raise invalid(f"The parent snapshot '{parent}' is not completed.",
                              "INVALID_DEPENDENCY_REQUEST")
            if size < psnap.volume.size:
                raise invalid(f"Volume size {size} GiB is smaller than the parent "
                              f"snapshot's {psnap.volume.size} GiB.", "INVALID_VOLUME_SIZE")
            if kms_key and psnap.encrypted:  # EBS User Guide, "Encryption outcomes for EBS
                # direct APIs": an encrypted parent's key is the snapshot's
                raise invalid("KmsKeyArn cannot be used with an encrypted ParentSnapshotId.")
        if kms_key and not encrypted and not (psnap and psnap.encrypted):
            raise invalid("KmsKeyArn requires Encrypted.")
        minutes = _int(TIMEOUT_MIN[2] if timeout is None else timeout, "Timeout",
                       TIMEOUT_MIN[0], TIMEOUT_MIN[1])
        with rules.internal():  # no volume file and no copy job for this bookkeeping volume
            vol = ec2.create_volume(size=size, zone_name=f"{REGION}a")
            es = ec2.create_snapshot(volume_id=vol.id, description=p.get("Description") or "")
        ec2.volumes.pop(vol.id, None)  # EC2 shows no volume for a StartSnapshot snapshot
        tags = p.get("Tags")
        if tags:
            es.add_tags({t["Key"]: t.get("Value", "") for t in tags})
        es.status = "pending"
        # Encryption outcomes for EBS direct APIs (EBS User Guide): an encrypted parent's
        # key; else Encrypted with KmsKeyArn, or the account's default EBS key without.
        if psnap is not None and psnap.encrypted:
            es.encrypted, es.kms_key_id = True, psnap.kms_key_id
        elif encrypted:
            es.encrypted = True
            es.kms_key_id = (rules.kms_arn(ec2, kms_key) if kms_key else
                             ec2.default_kms_key_id or ec2._create_default_encryption_key())
        else:
            es.encrypted = False
        pdirect = self.snaps.get(parent) if parent else None
        if pdirect is not None:
            base = pdirect.base
        elif psnap is not None:  # a CreateSnapshot snapshot: its whole volume, as it was
            base = psnap.volume.size * BLOCKS_PER_GIB
        else:
            base = 0
        s = Direct(es, size, parent, base, es.encrypted)
        path = self.sim.snap_file(es.id)
        pfile = self.sim.snap_file(parent) if parent else None
        if pfile and os.path.exists(pfile):
            hostops.copy_sparse(pfile, path)
        with open(path, "ab") as f:
            f.truncate(size << 30)
        if pdirect is not None:
            s.blocks = dict(pdirect.blocks)  # same tokens: unchanged blocks
        with self.lock:
            self.snaps[es.id] = s
            if token:
                self.tokens[token] = (ident, es.id)
        self.cancel_at_timeout(s, minutes)
        return s

    def cancel_at_timeout(self, s, minutes):
        """StartSnapshot Timeout: "The amount of time (in minutes) after which the snapshot
        is automatically cancelled if: No blocks are written to the snapshot. The snapshot
        is not completed after writing the last block of data." (EBS direct API reference).
        Cancelled is EC2's `error` state (coldsnap#332: an interrupted upload "leaves a
        pending / error snapshot"); a DeleteSnapshot accepted while pending takes effect
        then (rules.py). Minutes are scaled by EC2SIM_TIMING_SCALE."""
        s.span = minutes * 60 * self.sim.timing.scale
        s.deadline = time.time() + s.span
        es = s.es

        def run():
            while True:
                with runtime.SNAP_LOCK:
                    if s.status != "pending" or es.status != "pending":
                        return  # completed (CompleteSnapshot) or deleted
                    left = s.deadline - time.time()
                    if left <= 0:
                        s.status = es.status = "error"
                        gone = getattr(es, "_sim_delete", False)
                        break
                time.sleep(min(left, 1.0))
            self._close(s)
            if gone:
                self.sim.forget_snapshot(es)
        self.sim.later(run)

    def put_snapshot_block(self, sid, index, data, headers):
        s = self.snap(sid)
        if s.status != "pending":
            raise invalid(f"The snapshot '{sid}' is not in the pending state.",
                          "INVALID_SNAPSHOT_ID")
        idx = _int(index, "block index", reason="INVALID_BLOCK")
        if not 0 <= idx < s.volume_size * BLOCKS_PER_GIB:
            raise invalid(f"Block index {idx} is outside the {s.volume_size} GiB volume "
                          f"(0-{s.volume_size * BLOCKS_PER_GIB - 1}).", "INVALID_BLOCK")
        length = headers.get("x-amz-data-length")
        if length != str(BLOCK) or len(data) != BLOCK:
            raise invalid(f"DataLength must be {BLOCK} and the body that long (got "
                          f"{length}, {len(data)} bytes).", "INVALID_BLOCK")
        progress = headers.get("x-amz-progress")
        if progress is not None:
            _int(progress, "Progress", 0, 100)
        if headers.get("x-amz-checksum-algorithm") != "SHA256":
            raise invalid("ChecksumAlgorithm must be SHA256.")
        checksum = headers.get("x-amz-checksum")
        digest = hashlib.sha256(data).digest()  # releases the GIL: requests hash in parallel
        if checksum != _b64(digest):
            raise invalid("The checksum does not match the block data.", "INVALID_BLOCK")
        fd, dfd = self._acquire(s)
        try:
            # A page-aligned buffer (ebsserver's mmap) goes by O_DIRECT; anything else, or a
            # refusal (EINVAL), buffered.
            if dfd is not None and isinstance(data, memoryview) and \
                    isinstance(data.obj, mmap.mmap):
                try:
                    os.pwrite(dfd, data, idx * BLOCK)
                except OSError:
                    os.pwrite(fd, data, idx * BLOCK)
            else:
                os.pwrite(fd, data, idx * BLOCK)
        finally:
            self._release(s)
        with s.lock:
            s.blocks[idx] = Block(digest)
            s.written[idx] = digest
            s.deadline = time.time() + s.span  # Timeout counts anew
        return checksum

    def complete_snapshot(self, sid, headers):
        s = self.snap(sid)
        if s.status != "pending":
            raise invalid(f"The snapshot '{sid}' is not in the pending state.",
                          "INVALID_SNAPSHOT_ID")
        changed = headers.get("x-amz-changedblockscount")
        if changed is None:
            raise invalid("ChangedBlocksCount is required.")
        with s.lock:
            written = dict(s.written)
        if _int(changed, "ChangedBlocksCount", 0) != len(written):
            raise invalid(f"ChangedBlocksCount {changed} does not match the {len(written)} "
                          "blocks written.")
        checksum = headers.get("x-amz-checksum")
        if checksum:
            if headers.get("x-amz-checksum-algorithm") != "SHA256" or \
                    headers.get("x-amz-checksum-aggregation-method") != "LINEAR":
                raise invalid("Checksum needs ChecksumAlgorithm SHA256 and "
                              "ChecksumAggregationMethod LINEAR.")
            agg = hashlib.sha256(b"".join(written[i] for i in sorted(written))).digest()
            if checksum != _b64(agg):
                raise invalid("The aggregated checksum does not match the blocks written.")
        with runtime.SNAP_LOCK:
            if s.status != "pending":  # cancelled at its Timeout meanwhile
                raise invalid(f"The snapshot '{sid}' is not in the pending state.",
                              "INVALID_SNAPSHOT_ID")
            s.status = "completed"
        self._close(s)
        # As on AWS: CompleteSnapshot answers pending, the seal is asynchronous; its
        # Progress moves meanwhile, and a DeleteSnapshot accepted before takes effect at
        # its end (runtime.Sim.seal).
        self.sim.seal(s.es, self.sim.timing.snapshot(len(written) * BLOCK))
        return "pending"

    def get_snapshot_block(self, sid, index, token):
        """GetSnapshotBlock needs the BlockToken that ListSnapshotBlocks/ListChangedBlocks
        gave for that index (a required parameter); those list written blocks only, so a
        never-written block has no token and cannot be read: ValidationException, as for
        any token that is not that block's."""
        s = self.snap(sid)
        idx = _int(index, "block index", reason="INVALID_BLOCK")
        if not token:
            raise invalid("BlockToken is required.", "INVALID_BLOCK_TOKEN")
        b = s.blocks.get(idx)
        if b is None or token != b.token:
            raise invalid(f"Invalid block token for block {idx}.", "INVALID_BLOCK_TOKEN")
        fd = os.open(self.sim.snap_file(sid), os.O_RDONLY)
        try:
            return os.pread(fd, BLOCK, idx * BLOCK)
        finally:
            os.close(fd)

    @staticmethod
    def _page(q, sid, idxs):
        maxr = _int(q.get("maxResults") or 10000, "MaxResults", 100, 10000)
        start = _int(q.get("startingBlockIndex") or 0, "StartingBlockIndex", 0)
        tok = q.get("pageToken")
        if tok:  # "If you specify NextToken, then StartingBlockIndex is ignored."
            try:
                tsid, at = base64.b64decode(tok, validate=True).decode().split(":")
                start = int(at)
            except ValueError:
                raise invalid("Invalid NextToken.", "INVALID_PAGE_TOKEN")
            if tsid != sid:
                raise invalid("The NextToken is not of this request.", "INVALID_PAGE_TOKEN")
        idxs = sorted(i for i in idxs if i >= start)
        page, rest = idxs[:maxr], idxs[maxr:]
        nxt = _b64(f"{sid}:{rest[0]}".encode()) if rest else None
        return page, nxt

    def list_snapshot_blocks(self, sid, q):
        s = self.snap(sid)
        with s.lock:
            blocks = dict(s.blocks)
        page, nxt = self._page(q, sid, blocks)
        out = {"Blocks": [{"BlockIndex": i, "BlockToken": blocks[i].token} for i in page],
               "ExpiryTime": time.time() + TOKEN_TTL, "VolumeSize": s.volume_size,
               "BlockSize": BLOCK}
        if nxt:
            out["NextToken"] = nxt
        return out

    def _lineage(self, s):
        out = []
        while s is not None:
            out.append(s.id)
            s = self.snaps.get(s.parent) if s.parent else None
        return out

    def list_changed_blocks(self, second, q):
        """The blocks that differ between two snapshots of one lineage (one the other's
        ancestor through ParentSnapshotId), with each side's token where it has the block;
        without FirstSnapshotId, every block of the second."""
        s2 = self.snap(second)
        first = q.get("firstSnapshotId")
        s1 = self.snap(first) if first else None
        if s1 is not None and s1.id not in self._lineage(s2) and \
                s2.id not in self._lineage(s1):
            raise invalid(f"The snapshots '{first}' and '{second}' are not of the same "
                          "lineage.", "UNRELATED_SNAPSHOTS")
        with s2.lock:
            b2 = dict(s2.blocks)
        b1 = {}
        if s1 is not None:
            with s1.lock:
                b1 = dict(s1.blocks)
        diff = {i for i in set(b1) | set(b2) if b1.get(i) is not b2.get(i)}
        page, nxt = self._page(q, second, diff)
        rows = []
        for i in page:
            row = {"BlockIndex": i}
            if i in b1:
                row["FirstBlockToken"] = b1[i].token
            if i in b2:
                row["SecondBlockToken"] = b2[i].token
            rows.append(row)
        out = {"ChangedBlocks": rows, "ExpiryTime": time.time() + TOKEN_TTL,
               "VolumeSize": s2.volume_size, "BlockSize": BLOCK}
        if nxt:
            out["NextToken"] = nxt
        return out

    # ---- volumes from an encrypted StartSnapshot snapshot ----------------------------
    def fill_unwritten(self, sid, vfile):
        """Called by CreateVolume (runtime.created) after the snapshot's bytes are copied.
        The blocks of an encrypted StartSnapshot snapshot that no PutSnapshotBlock wrote
        (in it or in its StartSnapshot ancestors, and not covered by a CreateSnapshot
        parent) read back as garbage, not zeros (SPEC 8.4; EBS decrypts what was never
        encrypted). Each volume gets fresh random bytes there: a window into a 16 MiB
        pool of os.urandom per volume, moving with the block index. Past the snapshot's
        size (a larger volume) the new space reads zeros, as EBS's does."""
        s = self.snaps.get(sid)
        if s is None or not s.encrypted:
            return
        with s.lock:
            have = set(s.blocks)
        n = s.volume_size * BLOCKS_PER_GIB
        pool = os.urandom(16 << 20)
        chunk = 8  # blocks per pwrite, contiguous unwritten ones
        fd = os.open(vfile, os.O_WRONLY)
        try:
            i = s.base
            while i < n:
                if i in have:
                    i += 1
                    continue
                j = i
                while j < n and j - i < chunk and j not in have:
                    j += 1
                off = (i * 40503 * 4096) % (len(pool) - chunk * BLOCK)
                os.pwrite(fd, memoryview(pool)[off:off + (j - i) * BLOCK], i * BLOCK)
                i = j
        finally:
            os.close(fd)

    # ---- faults ----------------------------------------------------------------------
    def _rate_ok(self, action, sid, rate):
        """A token bucket per snapshot and action: `rate` a second, bursts of `rate`."""
        now = time.monotonic()
        with self.bucket_lock:
            b = self.buckets.get((action, sid))
            if b is None:
                b = self.buckets[(action, sid)] = [float(rate), now]
            b[0] = min(float(rate), b[0] + (now - b[1]) * rate)
            b[1] = now
            if b[0] >= 1.0:
                b[0] -= 1.0
                return True
            return False

    # ---- the wire ----------------------------------------------------------------------
    @staticmethod
    def route(method, path):
        """(action, snapshot id, block index) for a request line, or None."""
        parts = [unquote(p) for p in path.split("/")]
        if len(parts) < 2 or parts[0] != "" or parts[1] != "snapshots":
            return None
        rest = parts[2:]
        if method == "POST" and rest in ([], [""]):
            return "StartSnapshot", None, None
        if method == "POST" and len(rest) == 2 and rest[0] == "completion":
            return "CompleteSnapshot", rest[1], None
        if len(rest) == 2 and rest[1] == "changedblocks" and method == "GET":
            return "ListChangedBlocks", rest[0], None
        if len(rest) == 2 and rest[1] == "blocks" and method == "GET":
            return "ListSnapshotBlocks", rest[0], None
        if len(rest) == 3 and rest[1] == "blocks":
            if method == "PUT":
                return "PutSnapshotBlock", rest[0], rest[2]
            if method == "GET":
                return "GetSnapshotBlock", rest[0], rest[2]
        return None

    def handle(self, method, target, headers, body):
        """One request: method, target (path?query), headers (lower-case names), body
        (bytes-like). Returns (status, [(header, value)], body bytes)."""
        rid = str(uuid.uuid4())
        path, _, qs = target.partition("?")
        try:
            r = self.route(method, path)
            if r is None:
                raise EbsError("UnknownOperationException", 404,
                               f"No EBS direct operation at {method} {path}.")
            action, sid, index = r
            fl = self.faults.get()
            ms = fl.get("ebs_latency_ms")
            if ms:
                time.sleep(float(ms) / 1000.0)  # this request's thread only: in parallel
            code = self.faults.take_api(action)
            if code:
                raise EbsError(code, faults.EBS_STATUS.get(code, 400),
                               f"Simulated fault: {code} for {action}.",
                               faults.EBS_REASON.get(code))
            if sid is not None and not SNAP_ID.match(sid):
                raise invalid(f"Invalid snapshot ID '{sid}'.", "INVALID_SNAPSHOT_ID")
            if action in ("PutSnapshotBlock", "GetSnapshotBlock"):
                rate = fl.get("ebs_rate", faults.EBS_RATE_DEFAULT)
                if rate and not self._rate_ok(action, sid, rate):
                    raise throttled(sid, action, rate)
            q = {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}
            return self._do(action, sid, index, q, headers, body, rid)
        except EbsError as e:
            return self.error(e, rid)
        except Exception as e:  # a bug here: answered as AWS answers its own
            traceback.print_exc()
            return self.error(EbsError("InternalServerException", 500,
                                       f"Internal error: {type(e).__name__}"), rid)

    def _do(self, action, sid, index, q, headers, body, rid):
        if action == "PutSnapshotBlock":
            checksum = self.put_snapshot_block(sid, index, body, headers)
            return 201, self._hdrs(rid, [("x-amz-Checksum", checksum),
                                         ("x-amz-Checksum-Algorithm", "SHA256")]), b"{}"
        if action == "GetSnapshotBlock":
            data = self.get_snapshot_block(sid, index, q.get("blockToken"))
            return 200, self._hdrs(rid, [
                ("Content-Type", "application/octet-stream"),
                ("x-amz-Data-Length", str(len(data))),
                ("x-amz-Checksum", _b64(hashlib.sha256(data).digest())),
                ("x-amz-Checksum-Algorithm", "SHA256")], json_type=False), data
        if action == "StartSnapshot":
            try:
                p = json.loads(bytes(body) or b"{}")
                if not isinstance(p, dict):
                    raise ValueError
            except ValueError:
                raise invalid("The request body is not a JSON object.")
            s = self.start_snapshot(p)
            es = s.es
            out = {"SnapshotId": s.id, "OwnerId": DEFAULT_ACCOUNT_ID, "Status": s.status,
                   "StartTime": s.start_time, "VolumeSize": s.volume_size,
                   "BlockSize": BLOCK, "Description": es.description or "",
                   "Tags": [{"Key": t["key"], "Value": t["value"]} for t in es.get_tags()],
                   "SseType": "sse-kms" if es.encrypted else "none"}
            if s.parent:
                out["ParentSnapshotId"] = s.parent
            if es.encrypted:
                out["KmsKeyArn"] = es.kms_key_id
            return 201, self._hdrs(rid), json.dumps(out).encode()
        if action == "CompleteSnapshot":
            return 202, self._hdrs(rid), json.dumps(
                {"Status": self.complete_snapshot(sid, headers)}).encode()
        if action == "ListSnapshotBlocks":
            return 200, self._hdrs(rid), json.dumps(self.list_snapshot_blocks(sid, q)).encode()
        return 200, self._hdrs(rid), json.dumps(self.list_changed_blocks(sid, q)).encode()

    @staticmethod
    def _hdrs(rid, extra=(), json_type=True):
        h = [("x-amzn-RequestId", rid), ("Date", formatdate(usegmt=True))]
        if json_type:
            h.append(("Content-Type", "application/json"))
        return h + list(extra)

    def error(self, e, rid):
        body = {"message": e.msg}
        if e.reason:
            body["Reason"] = e.reason
        return e.status, self._hdrs(rid, [("x-amzn-ErrorType", f"{e.code}:{ERROR_NS}")]), \
            json.dumps(body).encode()


def install(sim):
    """The daemon's one Api (state, tokens, rate buckets)."""
    return Api(sim)

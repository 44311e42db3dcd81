"""EBS direct APIs checked as AWS checks them, with the data in the snapshot's file.

moto 5.2.5 reports BlockSize 512, validates nothing, keeps block bytes in memory and leaves
a phantom volume behind StartSnapshot. Here: 524288-byte blocks, SHA-256 per block, index
within the volume, LINEAR aggregate at CompleteSnapshot, and the bytes go into
STATE/snapshots/SNAP.img, which CreateVolume copies (runtime.created), so a volume made
from the snapshot holds them. moto's Block objects keep only the digest (for tokens and
ListChangedBlocks)."""
import base64
import hashlib
import json
import os
import time

from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult
from moto.ebs.models import Block, EBSBackend, EBSSnapshot
from moto.ebs.responses import EBSResponse

from . import hostops, rules, runtime

BLOCK = 524288
BLOCKS_PER_GIB = (1 << 30) // BLOCK
MAX_GIB = 65536  # StartSnapshot VolumeSize limit (64 TiB)
TIMEOUT_MIN = (10, 4320, 60)  # StartSnapshot Timeout, minutes: range and default (API ref.)


class EbsError(JsonRESTError):
    def __init__(self, code, status, msg, reason=None):
        super().__init__(code, msg)
        self.code = status
        body = {"__type": code, "message": msg, "Message": msg}
        if reason:
            body["Reason"] = reason
        self.description = json.dumps(body)


def invalid(msg, reason="INVALID_PARAMETER_VALUE"):
    return EbsError("ValidationException", 400, msg, reason)


def not_found(sid):
    return EbsError("ResourceNotFoundException", 404,
                    f"The snapshot '{sid}' does not exist.", "SNAPSHOT_NOT_FOUND")


def _b64sha(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def install(sim):
    tokens = {}  # ClientToken -> snapshot id (StartSnapshot is idempotent on it)

    def snap(backend, sid):
        s = backend.snapshots.get(sid)
        if s is None or sid not in backend.ec2_backend.snapshots:  # deleted (rules.py)
            raise not_found(sid)
        return s

    def start_snapshot(self, volume_size, tags, description, parent=None, encrypted=False,
                       token=None, kms_key=None, timeout=None):
        if token and token in tokens and tokens[token] in self.snapshots \
                and tokens[token] in self.ec2_backend.snapshots:  # not if deleted since
            return self.snapshots[tokens[token]]
        try:
            size = int(volume_size)
        except (TypeError, ValueError):
            raise invalid("VolumeSize is required.", "INVALID_VOLUME_SIZE")
        if not 1 <= size <= MAX_GIB:
            raise invalid(f"Volume size {size} GiB is out of range 1-{MAX_GIB}.",
                          "INVALID_VOLUME_SIZE")
        psnap = None
        if parent:
            if encrypted:
                raise invalid("ParentSnapshotId cannot be used with Encrypted.")
            try:
                psnap = self.ec2_backend.get_snapshot(parent)
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
        try:
            minutes = int(TIMEOUT_MIN[2] if timeout is None else timeout)
        except (TypeError, ValueError):
            raise invalid(f"Invalid Timeout {timeout!r}.")
        if not TIMEOUT_MIN[0] <= minutes <= TIMEOUT_MIN[1]:
            raise invalid(f"Timeout {minutes} must be {TIMEOUT_MIN[0]}-{TIMEOUT_MIN[1]} "
                          "minutes.")
        ec2 = self.ec2_backend
        with rules.internal():  # no volume file and no copy job for this bookkeeping volume
            vol = ec2.create_volume(size=size, zone_name=f"{self.region_name}a")
            es = ec2.create_snapshot(volume_id=vol.id, description=description or "")
        ec2.volumes.pop(vol.id, None)  # EC2 shows no volume for a StartSnapshot snapshot
        if tags:
            es.add_tags({t["Key"]: t["Value"] for t in tags})
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
        s = EBSSnapshot(account_id=self.account_id, snapshot=es)
        s.block_size = BLOCK
        path = sim.snap_file(es.id)
        pfile = sim.snap_file(parent) if parent else None
        if pfile and os.path.exists(pfile):
            hostops.copy_sparse(pfile, path)
        with open(path, "ab") as f:
            f.truncate(size << 30)
        if parent and parent in self.snapshots:
            s.blocks = dict(self.snapshots[parent].blocks)  # same tokens: unchanged blocks
        s._sim_written = {}
        self.snapshots[es.id] = s
        if token:
            tokens[token] = es.id
        cancel_at_timeout(es, s, minutes)
        return s

    def cancel_at_timeout(es, s, minutes):
        """StartSnapshot Timeout: "The amount of time (in minutes) after which the snapshot
        is automatically cancelled if: No blocks are written to the snapshot. The snapshot
        is not completed after writing the last block of data." (EBS direct API reference).
        Cancelled is EC2's `error` state (coldsnap#332: an interrupted upload "leaves a
        pending / error snapshot"); a DeleteSnapshot accepted while pending takes effect
        then (rules.py). Minutes are scaled by EC2SIM_TIMING_SCALE."""
        span = minutes * 60 * sim.timing.scale
        s._sim_deadline = time.time() + span
        s._sim_span = span

        def run():
            while True:
                with runtime.SNAP_LOCK:
                    if s.status != "pending" or es.status != "pending":
                        return  # completed (CompleteSnapshot) or deleted
                    left = s._sim_deadline - time.time()
                    if left <= 0:
                        s.status = es.status = "error"
                        gone = getattr(es, "_sim_delete", False)
                        break
                time.sleep(min(left, 1.0))
            if gone:
                sim.forget_snapshot(es)
        sim.later(run)

    def put_snapshot_block(self, snapshot_id, block_index, block_data, checksum,
                           checksum_algorithm, data_length):
        s = snap(self, snapshot_id)
        if s.status != "pending":
            raise invalid(f"The snapshot '{snapshot_id}' is not in the pending state.",
                          "INVALID_SNAPSHOT_ID")
        try:
            idx = int(block_index)
        except (TypeError, ValueError):
            raise invalid(f"Invalid block index {block_index!r}.", "INVALID_BLOCK")
        if not 0 <= idx < s.volume_size * BLOCKS_PER_GIB:
            raise invalid(f"Block index {idx} is outside the {s.volume_size} GiB volume "
                          f"(0-{s.volume_size * BLOCKS_PER_GIB - 1}).", "INVALID_BLOCK")
        data = block_data if isinstance(block_data, bytes) else (block_data or b"")
        if isinstance(data, str):
            data = data.encode("latin-1")
        if str(data_length) != str(BLOCK) or len(data) != BLOCK:
            raise invalid(f"DataLength must be {BLOCK} and the body that long (got "
                          f"{data_length}, {len(data)} bytes).", "INVALID_BLOCK")
        if checksum_algorithm != "SHA256":
            raise invalid("ChecksumAlgorithm must be SHA256.")
        digest = hashlib.sha256(data).digest()
        if checksum != base64.b64encode(digest).decode():
            raise invalid("The checksum does not match the block data.", "INVALID_BLOCK")
        fd = os.open(sim.snap_file(snapshot_id), os.O_WRONLY)
        try:
            os.pwrite(fd, data, idx * BLOCK)
        finally:
            os.close(fd)
        s.blocks[idx] = Block(digest, checksum, "SHA256", BLOCK)
        s._sim_written[idx] = digest
        s._sim_deadline = time.time() + getattr(s, "_sim_span", 0)  # Timeout counts anew
        return checksum, "SHA256"

    def complete_snapshot(self, snapshot_id, changed=None, checksum=None, algorithm=None,
                          method=None):
        s = snap(self, snapshot_id)
        if s.status != "pending":
            raise invalid(f"The snapshot '{snapshot_id}' is not in the pending state.",
                          "INVALID_SNAPSHOT_ID")
        written = getattr(s, "_sim_written", {})
        if changed is None or int(changed) != len(written):
            raise invalid(f"ChangedBlocksCount {changed} does not match the {len(written)} "
                          "blocks written.")
        if checksum:
            if algorithm != "SHA256" or method != "LINEAR":
                raise invalid("Checksum needs ChecksumAlgorithm SHA256 and "
                              "ChecksumAggregationMethod LINEAR.")
            agg = hashlib.sha256(b"".join(written[i] for i in sorted(written))).digest()
            if checksum != base64.b64encode(agg).decode():
                raise invalid("The aggregated checksum does not match the blocks written.")
        with runtime.SNAP_LOCK:
            if s.status != "pending":  # cancelled at its Timeout meanwhile
                raise invalid(f"The snapshot '{snapshot_id}' is not in the pending state.",
                              "INVALID_SNAPSHOT_ID")
            s.status = "completed"
        es = self.ec2_backend.snapshots.get(snapshot_id)
        # As on AWS: CompleteSnapshot answers pending, the seal is asynchronous; its
        # Progress moves meanwhile, and a DeleteSnapshot accepted before takes effect at
        # its end (runtime.Sim.seal).
        if es is not None:
            sim.seal(es, sim.timing.snapshot(len(written) * BLOCK))
        return "pending"

    def get_snapshot_block(self, snapshot_id, block_index, block_token=None):
        s = snap(self, snapshot_id)
        b = s.blocks.get(int(block_index))
        if b is None or (block_token and block_token != b.block_token):
            raise invalid(f"Invalid block token for block {block_index}.",
                          "INVALID_BLOCK_TOKEN")
        with open(sim.snap_file(snapshot_id), "rb") as f:
            f.seek(int(block_index) * BLOCK)
            data = f.read(BLOCK)
        return data

    for name, fn in (("start_snapshot", start_snapshot),
                     ("put_snapshot_block", put_snapshot_block),
                     ("complete_snapshot", complete_snapshot),
                     ("get_snapshot_block", get_snapshot_block)):
        setattr(EBSBackend, name, fn)
    _install_responses()


def _install_responses():
    """moto's handlers drop ParentSnapshotId, ClientToken, Encrypted, the CompleteSnapshot
    checksum headers, BlockToken and the ListSnapshotBlocks paging: read them here."""

    def start_snapshot(self):
        s = self.ebs_backend.start_snapshot(
            self._get_param("VolumeSize"), self._get_param("Tags"),
            self._get_param("Description"), parent=self._get_param("ParentSnapshotId"),
            encrypted=bool(self._get_param("Encrypted")), token=self._get_param("ClientToken"),
            kms_key=self._get_param("KmsKeyArn"), timeout=self._get_param("Timeout"))
        es = self.ebs_backend.ec2_backend.snapshots.get(s.snapshot_id)
        result = {"SnapshotId": s.snapshot_id, "OwnerId": s.account_id,
                  "Status": s.status, "StartTime": s.start_time,
                  "VolumeSize": s.volume_size, "BlockSize": s.block_size,
                  "Tags": s.tags, "Description": s.description,
                  "ParentSnapshotId": self._get_param("ParentSnapshotId")}
        if es is not None and es.encrypted:
            result["KmsKeyArn"] = es.kms_key_id
        return ActionResult(result)

    def complete_snapshot(self):
        status = self.ebs_backend.complete_snapshot(
            self._get_param("SnapshotId"), self._get_param("ChangedBlocksCount"),
            self._get_param("Checksum"), self._get_param("ChecksumAlgorithm"),
            self._get_param("ChecksumAggregationMethod"))
        return ActionResult({"Status": status})

    def get_snapshot_block(self):
        data = self.ebs_backend.get_snapshot_block(
            self._get_param("SnapshotId"), self._get_param("BlockIndex"),
            self._get_param("BlockToken"))
        return ActionResult({"DataLength": len(data), "BlockData": data,
                             "Checksum": _b64sha(data), "ChecksumAlgorithm": "SHA256"})

    def list_snapshot_blocks(self):
        sid = self._get_param("SnapshotId")
        s = self.ebs_backend.snapshots.get(sid)
        if s is None or sid not in self.ebs_backend.ec2_backend.snapshots:
            raise not_found(sid)
        maxr = int(self._get_param("MaxResults") or 10000)
        if not 100 <= maxr <= 10000:
            raise invalid("MaxResults must be 100-10000.")
        start = int(self._get_param("StartingBlockIndex") or 0)
        tok = self._get_param("NextToken")
        if tok:
            try:
                start = int(base64.b64decode(tok).decode().split(":")[1])
            except (ValueError, IndexError):
                raise invalid("Invalid NextToken.", "INVALID_PAGE_TOKEN")
        idxs = sorted(i for i in list(s.blocks) if i >= start)
        page, rest = idxs[:maxr], idxs[maxr:]
        result = {"Blocks": [{"BlockIndex": i, "BlockToken": s.blocks[i].block_token}
                             for i in page],
                  "VolumeSize": s.volume_size, "BlockSize": s.block_size}
        if rest:
            result["NextToken"] = base64.b64encode(f"{sid}:{rest[0]}".encode()).decode()
        return ActionResult(result)

    for name, fn in (("start_snapshot", start_snapshot),
                     ("complete_snapshot", complete_snapshot),
                     ("get_snapshot_block", get_snapshot_block),
                     ("list_snapshot_blocks", list_snapshot_blocks)):
        setattr(EBSResponse, name, fn)

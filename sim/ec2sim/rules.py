"""EC2 rules moto 5.2.5 does not enforce, installed as class-level wrappers on the
EC2 backend before the server starts. moto calls attach/detach/create_volume itself inside
run_instances/terminate_instances (root volume): those internal calls pass untouched."""
import copy
import re
import threading
import time
from contextlib import contextmanager

from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import EC2Backend
from moto.ec2.models.elastic_block_store import Volume, VolumeAttachment
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.models.instances import Instance
from moto.ec2.responses.general import General
from moto.ec2.responses.instances import InstanceResponse
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.ec2.utils import Base64EncodedString

_tl = threading.local()
DEVICE_RE = re.compile(r"^/dev/(sd[a-z]{1,2}|xvd[a-z]{1,2})[0-9]*$")


@contextmanager
def internal():
    _tl.depth = getattr(_tl, "depth", 0) + 1
    try:
        yield
    finally:
        _tl.depth -= 1


def is_internal():
    return getattr(_tl, "depth", 0) > 0


def err(code, msg):
    return EC2ClientError(code, msg)


def kms_arn(backend, key):
    """The ARN of a KMS key named by ID, ARN, alias or alias ARN, as EC2 shows it; as given
    if moto's KMS does not know it (EC2 checks the key asynchronously: the call "can appear
    to complete, but eventually fails", CreateVolume API reference; not simulated)."""
    from moto.kms import kms_backends
    try:
        return kms_backends[backend.account_id][backend.region_name].describe_key(key).arn
    except Exception:
        return key


def install(sim):
    orig = {n: getattr(EC2Backend, n) for n in (
        "run_instances", "terminate_instances", "stop_instances", "start_instances",
        "create_volume", "delete_volume", "attach_volume", "detach_volume",
        "create_snapshot", "delete_snapshot", "delete_security_group")}

    # --- states and addresses moto hardwires -------------------------------
    def vol_status(self):
        s = getattr(self, "_sim_status", None)
        return s or ("in-use" if self.attachment else "available")
    Volume.status = property(vol_status)

    def addr_prop(name):
        base = getattr(Instance, name)

        def get(self):
            a = getattr(self, "_sim_addr", None)
            return a if a else base.fget(self)
        return property(get)
    for name in ("private_ip", "private_ip_address", "public_ip", "public_ip_address"):
        setattr(Instance, name, addr_prop(name))
    # The DNS name must resolve to where sshd listens; the bare address always does.
    base_dns = Instance.public_dns_name
    Instance.public_dns_name = property(
        lambda self: getattr(self, "_sim_addr", None) or base_dns.fget(self))
    Instance.private_dns_name = property(
        lambda self: "ip-" + self.private_ip.replace(".", "-") + ".ec2.internal")

    # --- instances ----------------------------------------------------------
    def run_instances(self, image_id, count, user_data, security_group_names, **kw):
        itype = kw.get("instance_type") or "m1.small"
        if itype not in INSTANCE_TYPES:  # moto says InvalidInstanceType.NotFound; EC2 does not
            raise err("InvalidParameterValue", f"Invalid value '{itype}' for InstanceType.")
        imgs = self.describe_images(ami_ids=[image_id])  # raises InvalidAMIID.NotFound
        arch = imgs[0].architecture if imgs else None
        type_archs = INSTANCE_TYPES.get(itype, {}).get("ProcessorInfo", {}).get(
            "SupportedArchitectures")
        if arch and type_archs and arch not in type_archs:
            raise err("InvalidParameterValue",
                      f"The architecture '{type_archs[0]}' of the specified instance type does "
                      f"not match the architecture '{arch}' of the specified AMI. Specify an "
                      "instance type and an AMI that have matching architectures, and try "
                      "again. You can use 'describe-instance-types' or 'describe-images' to "
                      "discover the architecture of the instance type or AMI.")
        for gname in security_group_names or []:  # moto answers HTTP 500 for an unknown name
            if self.get_security_group_by_name_or_id(gname) is None:
                raise err("InvalidGroup.NotFound", f"The security group '{gname}' does not "
                          f"exist in default VPC '{self.default_vpc.id}'")
        # Unknown SecurityGroupIds: moto itself answers InvalidGroup.NotFound, as EC2 does.
        if int(count) > sim.free_count():
            raise err("InsufficientInstanceCapacity",
                      f"We currently do not have sufficient {itype} capacity in the "
                      "Availability Zone you requested. (simulator limit reached)")
        with internal():
            res = orig["run_instances"](self, image_id, count, user_data,
                                        security_group_names, **kw)
        # The call takes a while on EC2 (timing run_api); the instances exist, pending,
        # meanwhile, and their pending -> running counts from the answer.
        answer = time.time() + sim.timing.draw("run_api")
        for mi in res.instances:
            sim.launch(self, mi, answer)
        time.sleep(max(0.0, answer - time.time()))
        return res

    def terminate_instances(self, instance_ids):
        """moto detaches the instance's volumes at once and deletes those marked
        DeleteOnTermination; the simulator keeps the others `detaching` until its teardown
        is done, then removes the deleted ones' files. An instance already shutting down or
        terminated (by an earlier call, or by itself) is left as it is, as on EC2."""
        plan, going, res = [], [], []
        for iid in instance_ids or []:
            mi = self.get_instance(iid)
            if sim.going(mi.id):
                going.append(mi)
                continue
            keep, drop = [], []
            for v in list(self.volumes.values()):
                att = v.attachment
                if att and att.instance is mi and att.device in mi.block_device_mapping:
                    if mi.block_device_mapping[att.device].delete_on_termination:
                        drop.append(v.id)
                    else:
                        keep.append((v, att))
            plan.append((mi, keep, drop))
        for mi, _, _ in plan:  # moto says terminated at once: the group stays held
            if mi.id in sim.insts:
                mi._sim_groups_free_at = float("inf")
        if plan:
            with internal():
                res = orig["terminate_instances"](self, [mi.id for mi, _, _ in plan])
        for mi, keep, drop in plan:
            sim.terminate(mi, keep, drop)
        return res + [(mi, copy.copy(mi._state)) for mi in going]

    def stop_instances(self, instance_ids):
        for iid in instance_ids:
            mi = self.get_instance(iid)
            if mi._state.name != "running":
                raise err("IncorrectInstanceState",
                          f"The instance '{iid}' is not in a state from which it can be stopped.")
        res = orig["stop_instances"](self, instance_ids)
        for mi, _ in res:
            sim.stop(mi)
        return res

    def start_instances(self, instance_ids):
        for iid in instance_ids:
            mi = self.get_instance(iid)
            if mi._state.name != "stopped":
                raise err("IncorrectInstanceState",
                          f"The instance '{iid}' is not in a state from which it can be started.")
        res = orig["start_instances"](self, instance_ids)
        for mi, _ in res:
            sim.start(mi)
        return res

    # --- volumes ------------------------------------------------------------
    def create_volume(self, size, zone_name, snapshot_id=None, *a, **kw):
        if is_internal():
            return orig["create_volume"](self, size, zone_name, snapshot_id, *a, **kw)
        zones = {z.name for z in self.describe_availability_zones()}
        if zone_name not in zones:
            raise err("InvalidParameterValue", f"Invalid availability zone: [{zone_name}]")
        if kw.get("kms_key_id"):  # DescribeVolumes shows the key's ARN, however it was named
            kw["kms_key_id"] = kms_arn(self, kw["kms_key_id"])
        if snapshot_id:
            snap = self.get_snapshot(snapshot_id)
            if getattr(snap, "status", "completed") != "completed":
                # EC2's answer for a pending snapshot (seen in client code that retries on
                # it, e.g. rexray's EBS driver and boto3 users: "An error occurred
                # (IncorrectState) when calling the CreateVolume operation: Snapshot is in
                # invalid state - pending").
                raise err("IncorrectState", f"Snapshot is in invalid state - {snap.status}")
            if size is not None and int(size) < snap.volume.size:
                raise err("InvalidParameterValue",
                          f"Volume of size {size} is smaller than snapshot '{snapshot_id}', "
                          f"expect size >= {snap.volume.size}")
            if snap.encrypted and (kw.get("encrypted") or not kw.get("kms_key_id")):
                # "All volumes created from those snapshots" are encrypted (EBS User Guide,
                # "How Amazon EBS encryption works"), with the snapshot's own KMS key unless
                # KmsKeyId names another ("Amazon EBS encryption examples", encryption
                # outcomes); moto would give its default key instead. (KmsKeyId without
                # Encrypted stays moto's InvalidParameterDependency, as EC2 refuses it.)
                kw["encrypted"] = True
                kw["kms_key_id"] = kw.get("kms_key_id") or snap.kms_key_id or None
        if size is not None and not 1 <= int(size) <= 16384:
            raise err("InvalidParameterValue",
                      f"Volume of {size}GiB is too large or too small; expected 1-16384.")
        vol = orig["create_volume"](self, size, zone_name, snapshot_id, *a, **kw)
        sim.created(vol, snapshot_id)
        return vol

    def delete_volume(self, volume_id):
        if is_internal():
            return orig["delete_volume"](self, volume_id)
        vol = self.get_volume(volume_id)
        if vol.attachment:
            raise err("VolumeInUse", f"Volume {volume_id} is currently attached to "
                      f"{vol.attachment.instance.id}")
        res = orig["delete_volume"](self, volume_id)
        sim.deleted(volume_id)
        return res

    def attach_volume(self, volume_id, instance_id, device_path, delete_on_termination=False):
        if is_internal():
            return orig["attach_volume"](self, volume_id, instance_id, device_path,
                                         delete_on_termination)
        vol = self.get_volume(volume_id)
        mi = self.get_instance(instance_id)
        if not device_path or not DEVICE_RE.match(device_path):
            raise err("InvalidParameterValue", f"Value ({device_path}) for parameter device is "
                      f"invalid. {device_path} is not a valid EBS device name.")
        if vol.attachment:
            raise err("VolumeInUse", f"{volume_id} is already attached to an instance")
        if vol.status != "available":
            raise err("IncorrectState", f"vol '{volume_id}' is not 'available'.")
        if mi._state.name != "running":
            raise err("IncorrectState", f"Instance '{instance_id}' is not 'running'.")
        if vol.zone.name != mi._placement.zone:
            raise err("InvalidVolume.ZoneMismatch", f"The volume '{volume_id}' is not in the "
                      f"same availability zone as instance '{instance_id}'")
        used = set(mi.block_device_mapping) | {
            v.attachment.device for v in self.volumes.values()
            if v.attachment and v.attachment.instance is mi}
        if device_path in used:
            raise err("InvalidParameterValue", f"Invalid value '{device_path}' for unixDevice. "
                      f"Attachment point {device_path} is already in use")
        att = orig["attach_volume"](self, volume_id, instance_id, device_path,
                                    delete_on_termination)
        sim.attach(vol, mi, att)
        return att

    def detach_volume(self, volume_id, instance_id=None, device_path=None, *a, **kw):
        if is_internal():
            return orig["detach_volume"](self, volume_id, instance_id, device_path)
        vol = self.get_volume(volume_id)
        att = vol.attachment
        if att is None:
            raise err("IncorrectState", f"Volume '{volume_id}' is in the 'available' state.")
        if instance_id and att.instance.id != instance_id:
            raise err("InvalidAttachment.NotFound", f"The volume '{volume_id}' is not "
                      f"attached to instance '{instance_id}'")
        if att.status == "detaching":
            raise err("IncorrectState", f"Volume '{volume_id}' is already detaching.")
        if device_path and device_path != att.device:
            raise err("InvalidAttachment.NotFound", f"The volume '{volume_id}' is not "
                      f"attached at '{device_path}'")
        mi = att.instance
        res = orig["detach_volume"](self, volume_id, mi.id, att.device)
        sim.detach(vol, mi, res)
        return res

    # --- snapshots ----------------------------------------------------------
    from .runtime import SNAP_LOCK
    from moto.ec2.models.elastic_block_store import Snapshot

    def create_snapshot(self, volume_id, description, *a, **kw):
        snap = orig["create_snapshot"](self, volume_id, description, *a, **kw)
        if not is_internal():
            vol = self.get_volume(volume_id)
            if vol.encrypted:  # "A snapshot automatically gets the same encryption status as
                # the volume" (EBS User Guide, "Create Amazon EBS snapshots"): and its key
                snap.kms_key_id = vol.kms_key_id
            sim.snapshot(vol, snap)
        return snap

    def delete_snapshot(self, snapshot_id):
        """"Although you can delete a snapshot that is still in progress, the snapshot must
        complete before the deletion takes effect" (EBS User Guide, "Delete an Amazon EBS
        snapshot"; re:Post "ebs-snapshot-stuck": its progress continues to 100 %). So a
        pending one is accepted and stays, pending, until it ends (runtime.Sim.seal,
        ebsdirect's cancellation), then goes. A volume being created from a snapshot does
        not hold it: that page lists every case DeleteSnapshot refuses (an AMI's, AWS
        Backup's, a shared one) and this is not one; the volume keeps its data (copied at
        CreateVolume, runtime.created)."""
        snap = self.get_snapshot(snapshot_id)  # InvalidSnapshot.NotFound, as EC2
        with SNAP_LOCK:
            if snap.status == "pending":
                snap._sim_delete = True
                return snap
        res = orig["delete_snapshot"](self, snapshot_id)  # an AMI's: InvalidSnapshot.InUse
        sim.forget_snapshot(snap)
        return res

    def snapshot_progress(self):
        """DescribeSnapshots Progress: moto says 100% always. Here it moves from 0% with
        the time since CreateSnapshot (or CompleteSnapshot) over the time to completion
        (runtime.Sim.seal), 99% at most while pending; 0% for a StartSnapshot one still
        taking blocks."""
        if self.status == "completed":
            return "100%"
        t0, secs = getattr(self, "_sim_t0", None), getattr(self, "_sim_seconds", 0)
        if self.status != "pending" or t0 is None:
            return "0%"
        pct = int(100 * (time.time() - t0) / secs) if secs > 0 else 99
        return f"{max(0, min(99, pct))}%"
    Snapshot.progress = property(snapshot_progress)

    # --- security groups ----------------------------------------------------
    def delete_security_group(self, name=None, group_id=None):
        """EC2 refuses while an instance's network interface uses the group: until the
        instance is terminated (shutting-down still holds it) and then until EC2 has
        deleted that interface (timing sg_release after `terminated`); moto deletes at once."""
        g = self.get_security_group_by_name_or_id(group_id or name)
        if g is not None:
            now = time.time()
            for res in list(self.reservations.values()):
                for mi in res.instances:
                    ids = {x if isinstance(x, str) else x.id for x in mi.security_groups or []}
                    if g.id in ids and (mi._state.name != "terminated" or
                                        now < getattr(mi, "_sim_groups_free_at", 0)):
                        raise err("DependencyViolation",
                                  f"resource {g.id} has a dependent object")
        return orig["delete_security_group"](self, name, group_id)

    for name, fn in list(locals().items()):
        if name in orig:
            setattr(EC2Backend, name, fn)

    # The backend's constructor makes volumes and snapshots for its ~1300 AMIs: internal too.
    orig_init = EC2Backend.__init__

    def backend_init(self, *a, **kw):
        with internal():
            orig_init(self, *a, **kw)
    EC2Backend.__init__ = backend_init

    # --- DeleteOnTermination of volumes attached after launch -----------------
    # moto keeps it on the instance's block device mapping only (AttachVolume makes it
    # false, ModifyInstanceAttribute can change it): DescribeVolumes reads it from there.
    def attachment_dot(self):
        bdm = self.instance.block_device_mapping.get(self.device)
        return bool(bdm is not None and bdm.volume_id == self.volume.id
                    and bdm.delete_on_termination)
    VolumeAttachment.delete_on_termination = property(attachment_dot)

    orig_bdm_handler = InstanceResponse._block_device_mapping_handler

    def block_device_mapping_handler(self):
        """moto answers HTTP 500 (KeyError) for a device the instance does not have."""
        mi = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        for m in self._get_param("BlockDeviceMappings", []):
            dev = m.get("DeviceName")
            if dev not in mi.block_device_mapping:
                raise err("InvalidInstanceAttributeValue",
                          f"No device is currently mapped at {dev}")
        return orig_bdm_handler(self)
    InstanceResponse._block_device_mapping_handler = block_device_mapping_handler

    orig_describe_attr = InstanceResponse.describe_instance_attribute

    def describe_instance_attribute(self):
        """blockDeviceMapping: EC2 answers the list DescribeInstances has; moto, nothing."""
        if self._get_param("Attribute") != "blockDeviceMapping":
            return orig_describe_attr(self)
        mi = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        return ActionResult({"InstanceId": mi.id, "BlockDeviceMappings": mi.block_device_mappings})
    InstanceResponse.describe_instance_attribute = describe_instance_attribute

    # --- console: the host-key block cloud-init prints -----------------------
    def get_console_output(self):
        iid = self._get_param("InstanceId")
        self.ec2_backend.get_instance(iid)  # InvalidInstanceID.NotFound as EC2
        text = sim.console(iid)
        return ActionResult({"InstanceId": iid, "Timestamp": utcnow(),
                             "Output": Base64EncodedString.from_raw_string(text)})
    General.get_console_output = get_console_output

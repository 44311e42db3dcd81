"""The daemon's live view of its instances and devices, and the background work that
moves EC2 objects through their transitional states while the host catches up."""
import os
import selectors
import threading
import time
import traceback

from . import cloudinit, config, faults, firewall, hostops, timing


# EC2's StateReason after a shutdown from inside the instance (poweroff on the helper).
INSTANCE_INITIATED = ("Client.InstanceInitiatedShutdown",
                      "Client.InstanceInitiatedShutdown: Instance initiated shutdown")


def _set_state(mi, name, code):
    mi._state.name = name
    mi._state.code = code


class Inst:
    def __init__(self, iid, itype, idx, addr, backend, mi):
        self.id, self.type, self.idx, self.addr = iid, itype, idx, addr
        self.backend, self.mi = backend, mi  # for a shutdown the instance starts itself
        self.lock = threading.Lock()  # serialises boot/attach/detach/teardown of one instance
        self.stop_evt = threading.Event()
        self.init_pid = self.init_start = None
        self.proc = None
        self.ns = self.hv = None
        self.devices = {}  # vol_id -> {dev, node, links, minor, file}
        self.gate = None  # fd of the FIFO boot.sh waits on before bootcmd and sshd (aws)
        self.gone = False
        self.hostname = "ip-" + addr.replace(".", "-")
        self.idir = None
        self.uid = None
        self.fw_lock = threading.Lock()  # its port-22 filter (firewall.py)
        self.admits = None  # the CIDRs that filter admits, once made


class Sim:
    def __init__(self, sdir):
        self.sdir = sdir
        self.cfg = config.read_json(os.path.join(sdir, "config.json"))
        self.ledger = config.Ledger(sdir)
        self.lock = threading.Lock()
        self.insts = {}
        self.free_slots = list(range(config.MAX_INSTANCES))
        # How long each state change takes (timing.py): resolved by `up`, kept in config.json.
        self.timing = timing.Timing(self.cfg.get("timing") or timing.resolve(os.environ))
        self.fill_unwritten = None  # set by ebsdirect.Api: fn(snapshot id, volume file)
        for d in ("volumes", "snapshots", "instances"):
            os.makedirs(os.path.join(sdir, d), exist_ok=True)

    # ---- paths -------------------------------------------------------------
    def vol_file(self, vid):
        return os.path.join(self.sdir, "volumes", f"{vid}.img")

    def snap_file(self, sid):
        return os.path.join(self.sdir, "snapshots", f"{sid}.img")

    def later(self, fn, *args):
        def wrapped():
            try:
                fn(*args)
            except Exception:
                traceback.print_exc()
        threading.Thread(target=wrapped, daemon=True).start()

    def after(self, delay, fn, *args):
        def run():
            time.sleep(delay)
            fn(*args)
        self.later(run)

    # ---- instances ---------------------------------------------------------
    def free_count(self):
        with self.lock:
            return len(self.free_slots)

    def launch(self, backend, mi, t0=None):
        """t0: when RunInstances answers (pending -> running counts from then)."""
        with self.lock:
            idx = self.free_slots.pop(0)
        _, addr = config.addresses(self.cfg["block"], idx)
        inst = Inst(mi.id, mi.instance_type, idx, addr, backend, mi)
        self.insts[mi.id] = inst
        mi._sim_addr = addr
        _set_state(mi, "pending", 0)
        keys = []
        kp = backend.key_pairs.get(mi.key_name) if mi.key_name else None
        if kp is not None:
            keys.append(_public_key(kp))
        cfg = cloudinit.parse_user_data(cloudinit.decode_user_data(mi.user_data))
        keys += cloudinit.authorized_keys(cfg)
        # Its network interface exists from the start, as an EC2 instance's does while it is
        # pending: the address DescribeInstances shows is routed (a client can tell which
        # local address reaches it), it answers nothing yet (aws profile), and its
        # security groups' port-22 filter is in place before sshd can answer.
        with inst.lock:
            inst.ns, inst.hv, _ = hostops.make_net(self.ledger, self.cfg["tag"], self.cfg["block"],
                                                   inst.idx, faults.load(self.sdir).get("link"))
            if self.timing.fig["net_up"] > 0:
                hostops.net_block(inst.ns, self._host_addr(inst))
            firewall.apply(inst, create=True)
        self.later(self._boot, inst, mi, keys, cloudinit.host_keys(cfg),
                   cloudinit.bootcmd_script(cfg), time.time() if t0 is None else t0)

    def _boot(self, inst, mi, keys, given_hostkeys, bootcmd, t0):
        f = faults.load(self.sdir)
        delay = float(f["boot_delay"]) if "boot_delay" in f else self.timing.draw("pending")
        never = faults.take_never_boot(self.sdir)
        missing = faults.take_tools(self.sdir, "missing_tools")
        if faults.take_no_python(self.sdir):
            missing.append("python3*")
        broken = faults.take_tools(self.sdir, "broken_tools")
        with inst.lock:
            if inst.stop_evt.is_set():
                return
            inst.idir = os.path.join(self.sdir, "instances", inst.id)
            os.makedirs(inst.idir, exist_ok=True)
            inst.uid = hostops.write_etc(inst.idir, inst.hostname, inst.addr)
            types = hostops.write_host_keys(inst.idir, given_hostkeys)
            hostops.write_sshd_config(inst.idir, types)
            with open(os.path.join(inst.idir, "authorized_keys"), "w") as fh:
                fh.write("".join(k.strip() + "\n" for k in keys))
            hostops.write_image(inst.idir, missing, broken)
            _write_bootcmd(inst.idir, bootcmd)
            self._write_info(inst)
            if inst.stop_evt.wait(max(0.0, t0 + delay - time.time())):
                return
            # As on EC2, the instance is running once its machine starts; its sshd answers
            # later: in the fast profile ~0.3-0.6 s; in the aws profile once its network is
            # up (net_up; connections hang until then) and its OS has booted (sshd_up;
            # refused meanwhile), ~23 s, as on EC2. So a client must retry after `running`,
            # and a volume can be attached while the OS boots.
            if not never:
                self._start_sshd(inst)
            if not inst.stop_evt.is_set():
                _set_state(mi, "running", 16)

    def _start_sshd(self, inst):
        """Boots the instance's OS (boot.sh, then sshd) and watches it end (_watch). With a
        slow boot (aws profile), boot.sh waits at its gate until _os_boot opens it."""
        slow = self.timing.boots_slowly()
        if slow:
            if self.timing.fig["net_up"] > 0:  # a reboot takes the network down too
                hostops.net_block(inst.ns, self._host_addr(inst))
            try:  # a fresh FIFO each boot: no line left over from an earlier one
                os.unlink(os.path.join(inst.idir, "gate"))
            except FileNotFoundError:
                pass
            inst.gate = hostops.fifo(inst.idir, "gate")
        power = hostops.fifo(inst.idir, "power")
        try:
            inst.proc, inst.init_pid = hostops.start_sshd(self.ledger, inst.idir, inst.ns,
                                                          inst.hostname, inst.uid)
        except BaseException:
            os.close(power)
            self._close_gate(inst)
            raise
        inst.init_start = config.pid_start(inst.init_pid)
        self._write_info(inst)
        self.later(self._watch, inst, inst.proc, power)
        if slow:
            self.later(self._os_boot, inst, inst.proc)

    def _os_boot(self, inst, proc):
        """The OS boot of the aws profile, from the machine's start: the network comes up
        after net_up (hanging connections become refused ones), then after sshd_up boot.sh
        passes its gate: bootcmd, then sshd. Gives up if that boot has ended meanwhile."""
        for step in ("net_up", "sshd_up"):
            if inst.stop_evt.wait(self.timing.draw(step)):
                return
            with inst.lock:
                if inst.proc is not proc or inst.gone:
                    return
                if step == "net_up":
                    hostops.net_unblock(inst.ns, self._host_addr(inst))
                else:
                    os.write(inst.gate, b"go\n")
                    self._close_gate(inst)

    @staticmethod
    def _close_gate(inst):
        if inst.gate is not None:
            os.close(inst.gate)
            inst.gate = None

    def _host_addr(self, inst):
        return config.addresses(self.cfg["block"], inst.idx)[0]

    def _boot_os(self, inst):
        """Starts the instance's OS again (start, reboot), with its volumes: the new mount
        namespace lacks their nodes. The caller holds inst.lock."""
        self._start_sshd(inst)
        for vid, d in inst.devices.items():
            hostops.add_device(inst.init_pid, d["node"], d["minor"], d["links"])

    @staticmethod
    def _os_up(inst):
        """The instance's PID 1 still runs. Once it has ended by itself its pid may be
        reused by a host process: never kill or enter that one."""
        return config.pid_alive(inst.init_pid, inst.init_start)

    def _write_info(self, inst):
        config.write_json(os.path.join(inst.idir, "info.json"), {
            "id": inst.id, "type": inst.type, "ns": inst.ns, "veth": inst.hv,
            "address": inst.addr, "init_pid": inst.init_pid, "init_start": inst.init_start})

    def _kill(self, inst):
        if inst.proc is not None:
            inst.proc.sim_killed = True  # for its watcher: not a shutdown of the instance's own
        if self._os_up(inst):
            hostops.kill_tree([inst.init_pid])  # PID 1 of the pid namespace: takes all with it
        if inst.proc is not None:
            try:
                inst.proc.wait(timeout=10)
            except Exception:
                pass
        inst.init_pid = inst.init_start = inst.proc = None
        self._close_gate(inst)

    # ---- the instance's own shutdown (poweroff on the helper) ------------------
    def _watch(self, inst, proc, power):
        """Waits until the instance's OS ends: its power shim (power.sh) writes `poweroff`
        or `reboot` into the FIFO, or its PID 1 exits by itself (root ran `kill 1`, or a raw
        reboot(2), which in a pid namespace ends only that namespace's init). Both are the
        instance shutting itself down, unless the simulator killed it (_kill)."""
        exited = os.pidfd_open(proc.pid)  # our child, not yet reaped: its pid is not reused
        why = None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(power, selectors.EVENT_READ)
                sel.register(exited, selectors.EVENT_READ)
                while why is None:
                    ready = {key.fd for key, _ in sel.select()}
                    if power in ready:
                        words = os.read(power, 4096).decode("ascii", "replace").split()
                        why = next((w for w in words if w in ("poweroff", "reboot")), None)
                    if why is None and exited in ready:
                        why = "poweroff"
        finally:
            os.close(exited)
            os.close(power)
        self._shut_down(inst, proc, why)

    def _shut_down(self, inst, proc, why):
        """As EC2 does when an instance shuts itself down: with InstanceInitiatedShutdown-
        Behavior terminate, the TerminateInstances path (DeleteOnTermination volumes go);
        with stop (EC2's default), stopped; a reboot keeps it running, volumes attached."""
        with inst.lock:  # after a boot in progress has set `running`
            if getattr(proc, "sim_killed", False) or inst.proc is not proc or inst.gone:
                return
            print(f"{inst.id}: instance-initiated {why}", flush=True)
            if why == "reboot":
                self._kill(inst)
                self._boot_os(inst)
                return
        mi = inst.mi
        if mi.instance_initiated_shutdown_behavior == "terminate":
            # Termination protection guards the API only, not a shutdown from inside.
            protected, mi.disable_api_termination = mi.disable_api_termination, False
            try:
                inst.backend.terminate_instances([inst.id])
            finally:
                mi.disable_api_termination = protected
        else:
            mi.stop()  # moto's model, not StopInstances: that refuses a `pending` instance
            self.stop(mi)
        mi.state_reason.code, mi.state_reason.message = INSTANCE_INITIATED

    def going(self, iid):
        """True once the instance is shutting down or terminated."""
        inst = self.insts.get(iid)
        return inst is not None and inst.gone

    def terminate(self, mi, vols, drop=()):
        """vols: (volume, attachment) pairs kept (detaching, then available); drop: ids of
        the volumes deleted with the instance (DeleteOnTermination), whose files go too."""
        inst = self.insts.get(mi.id)
        if inst is None or inst.gone:
            return
        inst.gone = True
        inst.stop_evt.set()
        _set_state(mi, "shutting-down", 32)
        for v, att in vols:
            att.status = "detaching"
            v.attachment = att
        self.later(self._teardown, inst, mi, vols, drop)

    def _teardown(self, inst, mi, vols, drop):
        with inst.lock:
            for vid, d in list(inst.devices.items()):
                if self._os_up(inst):
                    hostops.remove_device(inst.init_pid, d["node"], d["minor"], d["links"])
            self._kill(inst)
            for vid, d in list(inst.devices.items()):
                hostops.loop_detach(d["dev"], d["file"])
            inst.devices.clear()
            for vid in drop:  # their loop devices are gone: the bytes can go too
                self.deleted(vid)
            if inst.ns:
                hostops.delete_net(inst.ns, inst.hv)
            hostops.remove_tree(inst.idir or "/nonexistent")
        time.sleep(self.timing.draw("terminate"))
        for v, att in vols:
            if v.attachment is att:
                v.attachment = None
        # Its network interface, and so its security groups, go a while later (rules.py).
        mi._sim_groups_free_at = time.time() + self.timing.draw("sg_release")
        _set_state(mi, "terminated", 48)
        with self.lock:
            self.free_slots.append(inst.idx)
            self.free_slots.sort()

    def stop(self, mi):
        inst = self.insts.get(mi.id)
        _set_state(mi, "stopping", 64)

        def work():
            with inst.lock:
                self._kill(inst)
                if self.timing.fig["net_up"] > 0 and inst.ns:  # a stopped one answers nothing
                    hostops.net_block(inst.ns, self._host_addr(inst))
            time.sleep(self.timing.draw("stop"))
            _set_state(mi, "stopped", 80)
        self.later(work)

    def start(self, mi):
        inst = self.insts.get(mi.id)
        _set_state(mi, "pending", 0)

        def work():
            time.sleep(self.timing.draw("start"))
            with inst.lock:
                self._boot_os(inst)
            _set_state(mi, "running", 16)  # sshd answers later, as at launch
        self.later(work)

    # ---- volumes -----------------------------------------------------------
    def attach(self, vol, mi, att):
        inst = self.insts[mi.id]
        att.status = "attaching"
        delay = max(self.timing.draw("attach"),
                    float(faults.load(self.sdir).get("attach_delay", 0)))

        def work():
            time.sleep(delay)
            vfile = self.vol_file(vol.id)
            with inst.lock:
                if inst.gone or not os.path.exists(vfile):
                    att.status = "attached"
                    return
                dev = hostops.loop_attach(self.ledger, vfile)
                used = {d.get("nvme") for d in inst.devices.values()}
                n = next(i for i in range(1, 100) if i not in used)
                node, links = hostops.device_names(inst.type, att.device, vol.id, n)
                d = {"dev": dev, "node": node, "links": links, "minor": hostops.loop_minor(dev),
                     "file": vfile, "nvme": None if hostops.is_xen(inst.type) else n}
                inst.devices[vol.id] = d
                if self._os_up(inst):
                    hostops.add_device(inst.init_pid, node, d["minor"], links)
            if vol.attachment is att:
                att.status = "attached"
        self.later(work)

    def detach(self, vol, mi, att):
        inst = self.insts.get(mi.id)
        att.status = "detaching"
        vol.attachment = att  # moto dropped it already; EC2 keeps it while detaching

        def work():
            if inst is not None:
                with inst.lock:
                    d = inst.devices.pop(vol.id, None)
                    if d:
                        if self._os_up(inst):
                            hostops.remove_device(inst.init_pid, d["node"], d["minor"],
                                                  d["links"])
                        hostops.loop_detach(d["dev"], d["file"])
            time.sleep(self.timing.draw("detach"))
            if vol.attachment is att:
                att.status = "detached"
                vol.attachment = None
        self.later(work)

    def created(self, vol, snapshot_id):
        vfile = self.vol_file(vol.id)
        sfile = self.snap_file(snapshot_id) if snapshot_id else None
        if sfile and os.path.exists(sfile):
            hostops.copy_sparse(sfile, vfile)
        with open(vfile, "ab") as f:
            f.truncate(vol.size * 1024 ** 3)
        vol._sim_status = "creating"
        ready = time.time() + self.timing.draw("volume_create")

        def work():
            # ebsdirect: an encrypted StartSnapshot snapshot's unwritten blocks read as
            # garbage (~1 s a GiB to write): while the volume is `creating`, which lasts
            # until then if that is longer.
            try:
                if snapshot_id and self.fill_unwritten:
                    self.fill_unwritten(snapshot_id, vfile)
            finally:
                time.sleep(max(0.0, ready - time.time()))
                vol._sim_status = None
        self.later(work)

    def deleted(self, vid):
        try:
            os.unlink(self.vol_file(vid))
        except OSError:
            pass

    # ---- snapshots ---------------------------------------------------------
    def snapshot(self, vol, snap):
        """CreateSnapshot. "The snapshot is created immediately, but it remains in the
        pending state until all of data has been transferred to Amazon S3 ... The snapshot
        includes only the data that was written to the volume at the time the snapshot was
        requested" (EBS User Guide, "Create Amazon EBS snapshots"). So the bytes are copied
        here, before CreateSnapshot answers: no write after the call reaches them, and a
        volume deleted meanwhile leaves them whole. The copy is of the sparse file's data
        only (~0.1-0.5 s for 300 MiB written); ext4 has no reflinks to make it free. A write
        racing the call itself may or may not be in, as on EC2 (which does not include what
        the OS still caches either)."""
        vfile = self.vol_file(vol.id)
        if not os.path.exists(vfile):
            return  # moto's own AMI snapshots and root volumes have no bytes behind them
        # Its time grows with the data: the bytes written to the volume (its file's
        # allocated blocks; EBS copies written blocks only). No increments: each
        # snapshot counts them all, as a volume's first snapshot does. It counts from the
        # answer (0%), after the host's copy.
        written = os.stat(vfile).st_blocks * 512
        try:
            hostops.copy_sparse(vfile, self.snap_file(snap.id))
        except BaseException:  # no snapshot without its bytes (the call fails, HTTP 500)
            self.forget_snapshot(snap)
            raise
        snap.status = "pending"
        delay = faults.load(self.sdir).get("snapshot_delay")  # fault snapshot-delay S
        self.seal(snap, float(delay) if delay is not None else self.timing.snapshot(written))

    def seal(self, snap, seconds, t0=None):
        """pending -> completed `seconds` after t0 (default now), its Progress moving from
        0% meanwhile (rules.py reads _sim_t0/_sim_seconds); a DeleteSnapshot accepted
        meanwhile takes effect then (rules.py)."""
        snap._sim_t0 = time.time() if t0 is None else t0
        snap._sim_seconds = seconds

        def done():
            with SNAP_LOCK:
                if snap.status != "pending":
                    return
                snap.status = "completed"
                gone = getattr(snap, "_sim_delete", False)
            if gone:
                self.forget_snapshot(snap)
        self.after(max(0.0, snap._sim_t0 + seconds - time.time()), done)

    def forget_snapshot(self, snap):
        """A deletion takes effect: the snapshot leaves DescribeSnapshots (and with it the
        EBS direct APIs' view, ebsdirect.py), and its bytes go."""
        snap.ec2_backend.snapshots.pop(snap.id, None)
        try:
            os.unlink(self.snap_file(snap.id))
        except OSError:
            pass

    def console(self, iid):
        inst = self.insts.get(iid)
        keys = hostops.host_pubkeys(inst.idir) if inst and inst.idir else []
        return cloudinit.console_text(iid, inst.hostname if inst else "localhost", keys)


# Serialises a snapshot's end (completed, error) with a DeleteSnapshot of it while pending.
SNAP_LOCK = threading.Lock()


def _write_bootcmd(idir, bootcmd):
    """The cloud-config bootcmd script boot.sh runs (root-only, as cloud-init keeps it)."""
    if bootcmd:
        fd = os.open(os.path.join(idir, "bootcmd"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(bootcmd)


def _public_key(kp):
    pub = getattr(kp, "material_public", None)
    if isinstance(pub, bytes):
        pub = pub.decode()
    if pub:
        return pub.strip()
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w") as f:
        f.write(kp.material.decode() if isinstance(kp.material, bytes) else kp.material)
        f.flush()
        return subprocess.run(["ssh-keygen", "-y", "-f", f.name], capture_output=True,
                              text=True).stdout.strip()

"""The daemon's live view of its instances and devices, and the background work that
moves EC2 objects through their transitional states while the host catches up."""
import os
import threading
import time
import traceback

from . import cloudinit, config, faults, hostops


def _set_state(mi, name, code):
    mi._state.name = name
    mi._state.code = code


class Inst:
    def __init__(self, iid, itype, idx, addr):
        self.id, self.type, self.idx, self.addr = iid, itype, idx, addr
        self.lock = threading.Lock()  # serialises boot/attach/detach/teardown of one instance
        self.stop_evt = threading.Event()
        self.init_pid = None
        self.proc = None
        self.ns = self.hv = None
        self.devices = {}  # vol_id -> {dev, node, links, minor, file}
        self.gone = False
        self.hostname = "ip-" + addr.replace(".", "-")
        self.idir = None
        self.uid = None
        self.no_python = False  # boots as an image without python3 (fault no-python)


class Sim:
    def __init__(self, sdir):
        self.sdir = sdir
        self.cfg = config.read_json(os.path.join(sdir, "config.json"))
        self.ledger = config.Ledger(sdir)
        self.lock = threading.Lock()
        self.insts = {}
        self.free_slots = list(range(config.MAX_INSTANCES))
        self.state_delay = float(os.environ.get("EC2SIM_STATE_DELAY", "0.3"))
        self.boot_delay = float(os.environ.get("EC2SIM_BOOT_DELAY", "1"))
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

    def launch(self, backend, mi):
        with self.lock:
            idx = self.free_slots.pop(0)
        _, addr = config.addresses(self.cfg["block"], idx)
        inst = Inst(mi.id, mi.instance_type, idx, addr)
        self.insts[mi.id] = inst
        mi._sim_addr = addr
        _set_state(mi, "pending", 0)
        keys = []
        kp = backend.key_pairs.get(mi.key_name) if mi.key_name else None
        if kp is not None:
            keys.append(_public_key(kp))
        cfg = cloudinit.parse_user_data(cloudinit.decode_user_data(mi.user_data))
        keys += cloudinit.authorized_keys(cfg)
        self.later(self._boot, inst, mi, keys, cloudinit.host_keys(cfg), time.time())

    def _boot(self, inst, mi, keys, given_hostkeys, t0):
        f = faults.load(self.sdir)
        delay = float(f.get("boot_delay", self.boot_delay))
        never = faults.take_never_boot(self.sdir)
        inst.no_python = faults.take_no_python(self.sdir)
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
            inst.ns, inst.hv, _ = hostops.make_net(self.ledger, self.cfg["tag"],
                                                   self.cfg["block"], inst.idx, f.get("link"))
            self._write_info(inst)
            if inst.stop_evt.wait(max(0.0, t0 + delay - time.time())):
                return
            # As on EC2, the instance is running once its machine starts; its sshd answers a
            # moment later (here ~0.3-0.6 s; on EC2 the OS takes 10-30 s), so a client
            # must retry a refused connection after `running`, and a volume can be
            # attached while the OS boots.
            if not never:
                self._start_sshd(inst)
            if not inst.stop_evt.is_set():
                _set_state(mi, "running", 16)

    def _start_sshd(self, inst):
        inst.proc, inst.init_pid = hostops.start_sshd(self.ledger, inst.idir, inst.ns,
                                                      inst.hostname, inst.uid,
                                                      inst.no_python)
        self._write_info(inst)

    def _write_info(self, inst):
        config.write_json(os.path.join(inst.idir, "info.json"), {
            "id": inst.id, "type": inst.type, "ns": inst.ns, "veth": inst.hv,
            "address": inst.addr, "init_pid": inst.init_pid,
            "init_start": config.pid_start(inst.init_pid) if inst.init_pid else None})

    def _kill(self, inst):
        if inst.init_pid and config.pid_start(inst.init_pid):
            hostops.kill_tree([inst.init_pid])  # PID 1 of the pid namespace: takes all with it
        if inst.proc is not None:
            try:
                inst.proc.wait(timeout=10)
            except Exception:
                pass
        inst.init_pid = inst.proc = None

    def terminate(self, mi, vols):
        inst = self.insts.get(mi.id)
        if inst is None or inst.gone:
            return
        inst.gone = True
        inst.stop_evt.set()
        _set_state(mi, "shutting-down", 32)
        for v, att in vols:
            att.status = "detaching"
            v.attachment = att
        self.later(self._teardown, inst, mi, vols)

    def _teardown(self, inst, mi, vols):
        with inst.lock:
            for vid, d in list(inst.devices.items()):
                hostops.remove_device(inst.init_pid, d["node"], d["minor"], d["links"])
            self._kill(inst)
            for vid, d in list(inst.devices.items()):
                hostops.loop_detach(d["dev"], d["file"])
            inst.devices.clear()
            if inst.ns:
                hostops.delete_net(inst.ns, inst.hv)
            hostops.remove_tree(inst.idir or "/nonexistent")
        time.sleep(self.state_delay)
        for v, att in vols:
            if v.attachment is att:
                v.attachment = None
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
            time.sleep(self.state_delay)
            _set_state(mi, "stopped", 80)
        self.later(work)

    def start(self, mi):
        inst = self.insts.get(mi.id)
        _set_state(mi, "pending", 0)

        def work():
            time.sleep(self.state_delay)
            with inst.lock:
                self._start_sshd(inst)
                for vid, d in inst.devices.items():  # the new mount namespace lacks the nodes
                    hostops.add_device(inst.init_pid, d["node"], d["minor"], d["links"])
            _set_state(mi, "running", 16)  # sshd answers a moment later, as at launch
        self.later(work)

    # ---- volumes -----------------------------------------------------------
    def attach(self, vol, mi, att):
        inst = self.insts[mi.id]
        att.status = "attaching"
        delay = max(self.state_delay, float(faults.load(self.sdir).get("attach_delay", 0)))

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
                if inst.init_pid:
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
                        hostops.remove_device(inst.init_pid, d["node"], d["minor"], d["links"])
                        hostops.loop_detach(d["dev"], d["file"])
            time.sleep(self.state_delay)
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
        self.after(self.state_delay, setattr, vol, "_sim_status", None)

    def deleted(self, vid):
        try:
            os.unlink(self.vol_file(vid))
        except OSError:
            pass

    def snapshot(self, vol, snap):
        vfile = self.vol_file(vol.id)
        if not os.path.exists(vfile):
            return  # moto's own AMI snapshots and root volumes have no bytes behind them
        snap.status = "pending"

        def work():
            hostops.copy_sparse(vfile, self.snap_file(snap.id))
            time.sleep(self.state_delay)
            snap.status = "completed"
        self.later(work)

    def console(self, iid):
        inst = self.insts.get(iid)
        keys = hostops.host_pubkeys(inst.idir) if inst and inst.idir else []
        return cloudinit.console_text(iid, inst.hostname if inst else "localhost", keys)


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

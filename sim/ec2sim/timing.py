"""How long the simulator's state changes take: every figure, its default in each timing
profile and where that default comes from, in one place. Standard library only (the CLI
resolves the figures at `up`, before the daemon starts, and records them in config.json).

Profiles (EC2SIM_TIMING at `up`):
  fast  the default: as quick as the host allows, for tests and demos (EC2SIM_BOOT_DELAY,
        EC2SIM_STATE_DELAY, as before; no jitter);
  aws   as on EC2, from the published measurements cited below, with a little jitter.
Any figure can be set for either profile with its variable (seconds, or MiB/s for the
snapshot rate). EC2SIM_TIMING_SCALE multiplies every duration (0.1: ten times faster, for
tests of the aws profile); EC2SIM_JITTER is the +- fraction each duration is drawn within;
EC2SIM_SEED makes the draws repeatable: each figure has its own seeded sequence, so the
n-th attach (say) takes the same time in every run, however the threads interleave.

A figure is simulated time added to the host's own work for that step (milliseconds, up to
a second for a large volume copy), except pending -> running, which is counted from the
moment RunInstances answers, and the two boot figures, counted from `running`.

Sources (FACTS.md, "EC2 timing (published, for the simulator's AWS profile)"):
  [daemonology] Colin Percival, ec2-boot-bench (c5.xlarge, Linux AMIs, 2021): RunInstances
                answers in 1.5 s; pending -> running 4.9 s; running -> port 22 "closed" (the
                first RST: the network is up) 17.2 s; closed -> open (sshd) 5.6 s; ~29 s in
                all.
  [brevdev]     brevdev ec2-coldboot-research: 25.8 s on average to ssh (API 19 %, pending ->
                running 69 % = ~18 s, boot -> ssh 12 %): its split puts most of the OS boot
                into "pending"; the total agrees. To follow it instead: EC2SIM_PENDING_S=18
                EC2SIM_NET_UP_S=0 EC2SIM_SSHD_UP_S=3.1.
  [litmus]      litmuschaos/litmus-go PR #354, logs of AttachVolume/DetachVolume on gp2 (2021),
                state polled every ~2 s: attaching at 0 s, still attaching at 3 s, attached
                by 5 s; detaching at 0 s, still detaching at 4 s, detached by 6 s.
  [fog]         fog/fog PR #1758 and coreos/scripts PR #340: a new volume "is not ready to
                be attached for a few seconds after creation". EC2 publishes no figure.
  [ec2-docs]    EC2 User Guide, "Troubleshoot instance termination": an instance still
                shutting-down after "a few minutes" counts as delayed; SPEC 8.5: "tens of
                seconds".
  [eni]         After `terminated`, EC2 deletes the instance's network interface on its own
                schedule; until then DeleteSecurityGroup answers DependencyViolation
                ("resource sg-... has a dependent object"). Reported as "a few seconds"
                (swiftotter/driver#43), intermittent right after termination, sometimes
                minutes (cloud-barista/cb-spider#460); Terraform retries it for 5 minutes
                (hashicorp/terraform#11047). No published figure.
  [snap]        AWS publishes no snapshot completion time: it grows with the blocks written
                since the last snapshot (re:Post "Why is my EBS snapshot creation slow?");
                time-based snapshot copies are capped at 500 MiB/s per snapshot (EBS docs),
                an upper bound for the rate.
"""
import random
import threading

PROFILES = ("fast", "aws")
MIB = 1 << 20


class Figure:
    def __init__(self, name, env, fast, aws, what, source):
        self.name, self.env, self.what, self.source = name, env, what, source
        self.fast, self.aws = fast, aws  # a number, or the name of a fast-profile base


# fast: "boot" is EC2SIM_BOOT_DELAY (1 s), "state" is EC2SIM_STATE_DELAY (0.3 s), as before.
FIGURES = [
    Figure("run_api", "EC2SIM_RUN_API_S", 0.0, 1.5,
           "RunInstances answers after (the instances are pending meanwhile)",
           "[daemonology] RunInstances 1.5 s"),
    Figure("pending", "EC2SIM_PENDING_S", "boot", 4.9,
           "pending -> running, from RunInstances' answer (fault boot-delay overrides it)",
           "[daemonology] pending -> running 4.9 s"),
    Figure("net_up", "EC2SIM_NET_UP_S", 0.0, 17.2,
           "running -> the instance's network answers (before: connections hang unanswered; "
           "after: port 22 refuses)",
           "[daemonology] running -> port 22 closed 17.2 s"),
    Figure("sshd_up", "EC2SIM_SSHD_UP_S", 0.0, 5.6,
           "network up -> sshd accepts (cloud-config bootcmd runs just before sshd)",
           "[daemonology] port 22 closed -> open 5.6 s"),
    Figure("start", "EC2SIM_START_S", "state", 4.9,
           "pending -> running after StartInstances (then the boot figures again)",
           "as pending [daemonology]; a reasoned guess: a start places the instance anew"),
    Figure("volume_create", "EC2SIM_VOLUME_CREATE_S", "state", 3.0,
           "volume creating -> available",
           "[fog] 'a few seconds'; reasoned guess"),
    Figure("attach", "EC2SIM_ATTACH_S", "state", 4.0,
           "attaching -> attached (fault attach-delay, if longer, wins)",
           "[litmus] 3-5 s"),
    Figure("detach", "EC2SIM_DETACH_S", "state", 5.0,
           "detaching -> detached (volume available)",
           "[litmus] 4-6 s"),
    Figure("terminate", "EC2SIM_TERMINATE_S", "state", 30.0,
           "shutting-down -> terminated (kept volumes stay detaching until then)",
           "[ec2-docs] 'tens of seconds', minutes counts as delayed; reasoned guess: a clean "
           "OS shutdown plus the host's release"),
    Figure("stop", "EC2SIM_STOP_S", "state", 30.0,
           "stopping -> stopped",
           "reasoned guess, as terminate (the same clean OS shutdown)"),
    Figure("snapshot", "EC2SIM_SNAPSHOT_S", "state", 30.0,
           "snapshot pending -> completed, fixed part (CreateSnapshot; EBS direct after "
           "CompleteSnapshot)",
           "[snap] reasoned guess"),
    Figure("snapshot_mibps", "EC2SIM_SNAPSHOT_MIBPS", 0.0, 50.0,
           "snapshot data rate, MiB/s of the volume's written (allocated) bytes, or of the "
           "blocks put through EBS direct, added to the fixed part; 0: data takes no time",
           "[snap] reasoned guess, well under the 500 MiB/s copy cap"),
    Figure("sg_release", "EC2SIM_SG_RELEASE_S", 0.0, 20.0,
           "a security group stays in use (DeleteSecurityGroup: DependencyViolation) this "
           "long after its last instance is terminated",
           "[eni] reasoned guess within the reported seconds-to-a-minute"),
]
BY_NAME = {f.name: f for f in FIGURES}
KNOBS = [  # (variable, fast default, aws default, meaning)
    ("EC2SIM_TIMING", "fast", "aws", "the profile, chosen at `up`"),
    ("EC2SIM_TIMING_SCALE", 1.0, 1.0, "multiplies every duration"),
    ("EC2SIM_JITTER", 0.0, 0.1, "each duration is drawn within +- this fraction"),
    ("EC2SIM_SEED", None, None, "seed of the jitter draws (unset: random)"),
    ("EC2SIM_BOOT_DELAY", 1.0, None, "fast profile only: pending -> running"),
    ("EC2SIM_STATE_DELAY", 0.3, None, "fast profile only: every other state change"),
]


class Bad(ValueError):
    pass


def _num(env, var, default):
    raw = env.get(var)
    if raw is None or raw == "":
        return float(default)
    try:
        v = float(raw)
    except ValueError:
        raise Bad(f"{var}={raw!r} is not a number")
    if not v >= 0 or v == float("inf"):
        raise Bad(f"{var}={raw!r} must be a finite number >= 0")
    return v


def resolve(env):
    """The profile and figures `up` records (config.json "timing"); raises Bad."""
    profile = env.get("EC2SIM_TIMING") or "fast"
    if profile not in PROFILES:
        raise Bad(f"EC2SIM_TIMING={profile!r}: expected one of {', '.join(PROFILES)}")
    fast = profile == "fast"
    base = {"boot": _num(env, "EC2SIM_BOOT_DELAY", 1.0),
            "state": _num(env, "EC2SIM_STATE_DELAY", 0.3)} if fast else {}
    figures = {}
    for f in FIGURES:
        d = f.fast if fast else f.aws
        figures[f.name] = _num(env, f.env, base[d] if isinstance(d, str) else d)
    jitter = _num(env, "EC2SIM_JITTER", 0.0 if fast else 0.1)
    if jitter >= 1:
        raise Bad(f"EC2SIM_JITTER={jitter}: must be below 1")
    seed = env.get("EC2SIM_SEED") or None
    return {"profile": profile, "scale": _num(env, "EC2SIM_TIMING_SCALE", 1.0),
            "jitter": jitter, "seed": seed, "figures": figures}


class Timing:
    """The daemon's figures (from resolve()) and its jitter draws."""

    def __init__(self, spec):
        self.profile = spec["profile"]
        self.scale = float(spec["scale"])
        self.jitter = float(spec["jitter"])
        self.fig = dict(spec["figures"])
        seed = spec.get("seed")
        # One sequence per figure: one figure's draws do not shift another's.
        self._rngs = {f.name: random.Random(f"{seed}/{f.name}") if seed is not None
                      else random.Random() for f in FIGURES}
        self._lock = threading.Lock()

    def _jit(self, name):
        if not self.jitter:
            return 1.0
        with self._lock:
            return 1.0 + self._rngs[name].uniform(-self.jitter, self.jitter)

    def draw(self, name, extra=0.0):
        """Seconds for one occurrence of figure name (plus extra unscaled-figure seconds)."""
        base = self.fig[name] + extra
        return base * self.scale * self._jit(name) if base else 0.0

    def snapshot(self, nbytes):
        """Seconds for a snapshot of nbytes of data to complete after its copy."""
        rate = self.fig["snapshot_mibps"]
        return self.draw("snapshot", nbytes / (rate * MIB) if rate > 0 else 0.0)

    def boots_slowly(self):
        """The OS boot is simulated (sshd starts after net_up + sshd_up, not at once)."""
        return self.fig["net_up"] > 0 or self.fig["sshd_up"] > 0


def table(spec):
    """Human-readable: every figure in effect, with both defaults and its source."""
    rows = [f"timing profile {spec['profile']}: scale {spec['scale']:g}, jitter "
            f"+-{spec['jitter'] * 100:g} %, seed {spec['seed'] or 'random'}"]
    for f in FIGURES:
        fd = {"boot": "EC2SIM_BOOT_DELAY", "state": "EC2SIM_STATE_DELAY"}.get(f.fast)
        rows.append(f"  {f.env:24} {spec['figures'][f.name]:>6g}   (fast {fd or f'{f.fast:g}'}, "
                    f"aws {f.aws:g})"
                    f"\n      {f.what}\n      source: {f.source}")
    return "\n".join(rows) + "\n"

"""The aws timing profile with its real default figures (no scaling), for the one thing
that matters most to a run: RunInstances to ssh takes ~29 s, as daemonology's
ec2-boot-bench measured (1.5 + 4.9 + 17.2 + 5.6 s), the instance `running` after ~6.4 s.
~35 s in all; the other transitions are checked scaled down in test_timing.py."""
import time

import pytest

from test_timing import port22, watch_boot

SIM_ENV = {"EC2SIM_TIMING": "aws"}  # the published defaults, +-10 % jitter


@pytest.mark.slow
def test_launch_to_ssh_with_published_figures(sim):
    assert sim.status()["timing"] == "aws"
    t0 = time.time()
    inst = sim.launch("t3.nano", wait=False)
    answered = time.time() - t0
    assert 1.35 - 0.05 <= answered <= 1.65 + 0.5, answered  # RunInstances 1.5 s
    first, probes = watch_boot(sim, inst["InstanceId"], timeout=60)
    running, ssh = first["running"] - t0, first["open"] - t0
    print(f"RunInstances {answered:.2f} s, running at {running:.2f} s, network at "
          f"{first['refused'] - t0:.2f} s, ssh at {ssh:.2f} s")  # seen with -s or on failure
    assert 1.35 + 4.41 - 0.1 <= running <= 1.65 + 5.39 + 0.6, running  # 6.4 s
    assert probes["running"] == {"hang"}, probes  # 17.2 s with no answer at all
    assert 17.2 * 0.9 - 0.3 <= first["refused"] - first["running"] <= 17.2 * 1.1 + 0.8
    assert 26.3 - 0.2 <= ssh <= 32.1 + 1.5, ssh  # ~29 s to ssh
    d = sim.describe(inst["InstanceId"])
    assert sim.ssh(d, "echo up").stdout.strip() == "up"
    assert port22(d["PublicIpAddress"]) == "open"

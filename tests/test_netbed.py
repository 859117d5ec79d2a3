"""The multi-host test bed itself: isolation, faults, and nothing left behind."""

import subprocess
import time

import pytest

import netbed

pytestmark = pytest.mark.slow

PROBE = """
import socket, sys

s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("silent")
"""


def reach(host, ip, port=9, timeout=1.0) -> str:
    """From ``host``: 'refused' (a live machine, no server), or 'silent' (nothing answers)."""
    out = host.exec("python3", "-c", PROBE, ip, str(port), str(timeout))
    return out.stdout.strip()


def test_hosts_reach_each_other_and_faults_are_real_and_cleaned_up():
    netbed.require()
    bed = netbed.NetBed(3).start()
    try:
        h0, h1, h2 = bed.hosts
        assert reach(h0, h1.ip) == reach(h0, h2.ip) == "refused"
        # Each host has its own hostname, and the bridge has no address: the subnet
        # exists only inside the namespaces.
        names = {
            subprocess.run([*h.wrapper(), "hostname"], capture_output=True, text=True).stdout.strip() for h in bed.hosts
        }
        assert names == {"host0", "host1", "host2"}
        assert "inet " not in subprocess.run(["ip", "addr", "show", bed.bridge], capture_output=True, text=True).stdout
        # A partition from one host drops packets silently, both ways; heal restores.
        bed.partition(h1, [h0])
        assert reach(h0, h1.ip) == "silent" and reach(h1, h0.ip) == "silent"
        assert reach(h2, h1.ip) == "refused"
        bed.heal(h1)
        assert reach(h0, h1.ip) == "refused"
        # A lost host: its processes are gone and nothing answers for it.
        sleeper = bed.start_program(h2, ["sleep", "600"], f"{bed.workdir}/sleep.log")
        deadline = time.monotonic() + 10
        while sleeper.pid not in h2.pids():  # it enters the namespace as it starts
            assert time.monotonic() < deadline, "the process never showed in its host"
            time.sleep(0.02)
        bed.kill_host(h2)
        assert sleeper.poll() is not None and h2.pids() == []
        assert reach(h0, h2.ip) == "silent"
        bed.revive_host(h2)
        assert reach(h0, h2.ip) == "refused"
        # Added latency is there (where the machine supports it at all).
        if bed.netem_missing() is None:
            bed.netem(h1, delay_ms=20)
            t0 = time.monotonic()
            assert reach(h0, h1.ip) == "refused"
            assert time.monotonic() - t0 >= 0.02
            bed.clear_netem(h1)
        rule = bed._forward_rule
    finally:
        bed.close()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert bed.prefix not in namespaces
    assert subprocess.run(["ip", "link", "show", bed.bridge], capture_output=True).returncode != 0
    if rule:
        assert bed.bridge not in subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    with pytest.raises(Exception):
        netbed.Host.exec(h0, "true")

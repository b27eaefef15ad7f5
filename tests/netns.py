"""N "hosts" on one machine for tests: network namespaces, each with its own address on a bridge (in a hub
namespace), so traffic between hosts crosses a veth whose counters and qdisc the test controls, while traffic
inside one host stays on its loopback. Needs root; `hosts` skips the test where namespaces cannot be made."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager

import pytest


@contextmanager
def hosts(n: int, subnet: str, prefix: str):
    tag = f"{os.getpid() % 10000}"
    hub, names = f"{prefix}h{tag}", [f"{prefix}{i}{tag}" for i in range(n)]
    veth, port = [f"{prefix}e{i}{tag}" for i in range(n)], [f"{prefix}b{i}{tag}" for i in range(n)]
    cmds = [f"ip netns add {hub}", f"ip -n {hub} link add br0 type bridge", f"ip -n {hub} link set br0 up"]
    for i, ns in enumerate(names):
        cmds += [f"ip netns add {ns}", f"ip link add {veth[i]} type veth peer name {port[i]}",
                 f"ip link set {veth[i]} netns {ns}", f"ip link set {port[i]} netns {hub}",
                 f"ip -n {hub} link set {port[i]} master br0", f"ip -n {hub} link set {port[i]} up",
                 f"ip -n {ns} link set lo up", f"ip -n {ns} addr add {subnet}.{i + 1}/24 dev {veth[i]}",
                 f"ip -n {ns} link set {veth[i]} up"]
    try:
        for cmd in cmds:
            res = subprocess.run(cmd.split(), capture_output=True, text=True)
            if res.returncode != 0:
                pytest.skip(f"cannot build network namespaces here ({cmd}: {res.stderr.strip()})")
        yield {"ns": names, "hub": hub, "veth": veth, "bridge_port": port,
               "addr": [f"{subnet}.{i + 1}" for i in range(n)]}
    finally:
        for ns in (*names, hub):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

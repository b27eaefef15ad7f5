"""`dist-ft doctor`: a healthy run passes; a slowed link, a full output filesystem, a rank short of memory and a
launcher that gives each process its own world are each found and named, with a non-zero exit.

The faults are real, not simulated: network namespaces joined by a bridge with a token-bucket rate limit on one
node's veth (the kernel here has no netem, so the slow link is slow in bandwidth, not in delay), a tmpfs of a few
MiB as the output folder, a memory cgroup around one node's launcher, and processes started with their own worlds.
Root is needed for the first three; they skip without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli, tiny_recipe, write_recipe
from netns import hosts

from dist_ft.doctor.links import link_pairs
from dist_ft.doctor.memory import cgroup_room
from dist_ft.doctor.report import Check, Node, verdict


def _recipe(tmp_path, model, name="r", **sections):
    out = tmp_path / f"{name}-run"
    sections["distributed"] = {"timeout_seconds": 60, **sections.get("distributed", {})}
    r = tiny_recipe(model, out, **sections)
    return write_recipe(tmp_path / f"{name}.yaml", r), out


def _doctor(out: Path) -> dict:
    return json.loads((out / "doctor" / "doctor.json").read_text())


def _checks(doc: dict) -> dict:
    return {c["name"]: c for c in doc["checks"]}


# ------------------------------------------------------------------------------------------------ healthy

# CI time: bare torchrun in the slow suite (its ranks run the doctor as accelerate's do in the Slurm test).
@pytest.mark.parametrize("launcher", ["dist-ft", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_a_healthy_two_process_run_passes(tmp_path, tiny_llama, launcher):
    path, out = _recipe(tmp_path, tiny_llama)
    if launcher == "dist-ft":
        res = run_cli("doctor", str(path), "--nproc-per-node", "2", timeout=300)
    else:  # one rank of any launcher; told the world to expect
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "dist_ft", "doctor", str(path), "--expect-world-size", "2"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "[doctor] PASS (8 of 8 checks passed)" in res.stdout, res.stdout[-3000:]
    doc = _doctor(out)
    checks = _checks(doc)
    assert doc["verdict"] == "pass" and doc["world_size"] == 2 and doc["launcher"] == "torchrun"
    assert {c["status"] for c in doc["checks"]} == {"pass"}, doc["checks"]
    assert checks["rendezvous"]["details"]["expected"] == 2
    links = checks["links"]["details"]["links"]
    assert len(links) == 1 and links[0]["gb_per_s"] > 0 and links[0]["latency_us"] > 0
    coll = checks["collectives"]["details"]["collectives"]
    assert [c["op"] for c in coll] == ["all_reduce"] and coll[0]["bytes"] == 25 * 2 ** 20  # DDP's bucket
    ranks = checks["checkpoint storage"]["details"]["ranks"]
    assert all(r["verified"] and r["write_mb_s"] > 0 and r["sees"] == 2 for r in ranks)
    p = checks["loss parity"]["details"]
    assert p["batch_rows"] == 8 and p["rows_covered"] == 8
    assert abs(p["n_rank_loss"] - p["one_rank_loss"]) <= 1e-4 * p["one_rank_loss"]
    # The one-rank loss is the model's loss on that batch: transformers' own, from the saved weights.
    assert 3.0 < p["one_rank_loss"] < 10.0
    assert not list((out / "doctor" / "fs").rglob("*.bin"))  # the probe files are gone
    # The folder is still a fresh run directory for training.
    res = run_cli("check", str(path))
    assert res.returncode == 0, res.stderr


def test_fsdp2_collectives_are_sized_from_the_model(tmp_path, tiny_llama):
    """Under FSDP2 the doctor times all-gather and reduce-scatter at the size of the largest wrapped unit."""
    path, out = _recipe(tmp_path, tiny_llama, distributed={"strategy": "fsdp", "timeout_seconds": 60})
    res = run_cli("doctor", str(path), "--nproc-per-node", "2", timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    coll = _checks(_doctor(out))["collectives"]["details"]["collectives"]
    assert [c["op"] for c in coll] == ["all_gather", "reduce_scatter"], coll
    from dist_ft.config import load_recipe
    from dist_ft.plan import analyze_model
    facts = analyze_model(load_recipe(str(path), []))
    units: dict = {}
    for p in facts.params:
        units[p.unit] = units.get(p.unit, 0) + p.numel
    assert coll[0]["bytes"] == max(units.values()) * 4  # fp32


# ------------------------------------------------------------------------------------------------ separate worlds

def test_processes_given_separate_worlds_fail_rendezvous_and_parity(tmp_path, tiny_llama):
    """Two processes that should form one world of 2 but each start alone (RANK=0, WORLD_SIZE=1): each computes
    only its half of the global batch, so the loss parity fails, and each sees the other's mark."""
    path, out = _recipe(tmp_path, tiny_llama)
    procs = []
    for port in (29611, 29612):
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_ft", "doctor", str(path),
                                       "--expect-world-size", "2"], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    texts = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 1 for p in procs), [t[-3000:] for t in texts]
    for text in texts:
        assert "FAIL" in text and "rendezvous" in text and "asked for 2" in text, text[-3000:]
        assert "computed 4 of the batch's 8 rows" in text, text[-3000:]
    # At least the world that finished second saw the other's mark (they overlap in time).
    assert sum("other world(s) ran the doctor on this output folder" in t for t in texts) >= 1, texts[1][-2000:]
    checks = _checks(_doctor(out))
    assert checks["loss parity"]["status"] == "fail" and checks["rendezvous"]["status"] == "fail"


# ------------------------------------------------------------------------------------------------ full filesystem

def test_a_full_output_filesystem_is_named(tmp_path, tiny_llama, small_disk):
    disk = small_disk("disk", 2048)  # 2 MiB: each rank's 4 MiB probe cannot fit
    out = disk / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, distributed={"timeout_seconds": 60}))
    res = run_cli("doctor", str(path), "--nproc-per-node", "2", timeout=300)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("[doctor] FAIL")]
    assert line and "checkpoint storage" in line[0] and "no space left" in line[0] and str(out) in line[0], \
        res.stdout[-3000:]
    assert "rank " in line[0]  # names the rank and node


# ------------------------------------------------------------------------------------------------ memory

def test_cgroup_room_reads_v1_and_v2_and_keeps_the_tightest(tmp_path):
    v1 = tmp_path / "memory" / "job" / "step"
    v1.mkdir(parents=True)
    (tmp_path / "memory" / "job" / "memory.limit_in_bytes").write_text(str(4 << 30))
    (tmp_path / "memory" / "job" / "memory.usage_in_bytes").write_text(str(1 << 30))
    (v1 / "memory.limit_in_bytes").write_text(str(9223372036854771712))
    (v1 / "memory.usage_in_bytes").write_text(str(1 << 29))
    assert cgroup_room("4:memory:/job/step\n1:cpu:/x", root=tmp_path) == (3 << 30, "/job")
    v2 = tmp_path / "u" / "slice"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text(str(2 << 30))
    (v2 / "memory.current").write_text(str(1 << 30))
    (tmp_path / "u" / "memory.max").write_text("max")
    (tmp_path / "u" / "memory.current").write_text("5")
    assert cgroup_room("0::/u/slice", root=tmp_path) == (1 << 30, "/u/slice")
    assert cgroup_room("0::/nothing", root=tmp_path) == (None, "")


def _memory_cgroup(name: str, limit: int) -> Path | None:
    folder = Path("/sys/fs/cgroup/memory") / name
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        return None
    return folder


def test_a_rank_short_of_memory_is_named(tmp_path, tiny_llama):
    """Two "nodes" (launchers with --nnodes 2 on this machine); node 1's launcher and its rank run in a memory
    cgroup of 1.5 GiB while the recipe needs ~3 GiB per rank (a large micro-batch): rank 1 is named; the model is
    never built."""
    from dist_ft.distributed.topology import free_port

    path, out = _recipe(tmp_path, tiny_llama, training={"micro_batch_size": 128}, data={"max_length": 1024,
                                                                                       "max_train_samples": 256})
    group = _memory_cgroup(f"dft-doctor-{os.getpid()}", int(1.5 * 2 ** 30))
    if group is None:
        pytest.skip("cannot create a memory cgroup here (needs root and cgroup v1's memory controller)")
    port = free_port()
    procs = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "dist_ft", "doctor", str(path), "--nproc-per-node", "1", "--nnodes", "2",
                   "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}"]
            if node == 1:  # the launcher joins the cgroup first, so its rank is born in it
                cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
            procs.append(subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        texts = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        time.sleep(0.5)
        try:
            group.rmdir()
        except OSError:
            pass
    assert procs[0].returncode == 1, texts[0][-3000:] + texts[1][-2000:]
    checks = _checks(_doctor(out))
    mem = checks["memory"]
    assert mem["status"] == "fail" and mem["culprit"].startswith("rank 1 "), mem
    assert "cgroup" in mem["summary"] and "the plan needs" in mem["summary"], mem["summary"]
    ranks = {r["rank"]: r for r in mem["details"]["ranks"]}
    assert ranks[1]["usable_bytes"] < 1.5 * 2 ** 30 < mem["details"]["need_bytes_per_rank"] < ranks[0]["usable_bytes"]
    assert checks["loss parity"]["status"] == "skip"


# ------------------------------------------------------------------------------------------------ slow link

@pytest.fixture
def three_hosts():
    """Three "nodes" on a bridge (tests/netns.py)."""
    with hosts(3, "10.79.0", "dfn") as h:
        yield h


def _slow_down(hosts: dict, i: int, rate: str) -> None:
    """A token-bucket limit on node i's link, both ways (its veth's egress, and the bridge port's)."""
    for ns, dev in ((hosts["ns"][i], hosts["veth"][i]), (hosts["hub"], hosts["bridge_port"][i])):
        res = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                              rate, "burst", "32kb", "latency", "400ms"], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot rate-limit a link here: {res.stderr.strip()}")


def test_a_node_behind_a_slow_link_is_named(tmp_path, tiny_llama, three_hosts):
    path, out = _recipe(tmp_path, tiny_llama)
    _slow_down(three_hosts, 2, "40mbit")
    hosts = tmp_path / "hosts"  # each node its own hostname, resolvable by all (as on a cluster)
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} node{i}\n" for i, a in enumerate(three_hosts["addr"])))
    procs = []
    for rank, (ns, dev) in enumerate(zip(three_hosts["ns"], three_hosts["veth"])):
        cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "sh", "-c",
               f'hostname node{rank} && mount --bind {hosts} /etc/hosts && exec "$@"', "sh",
               "env", f"GLOO_SOCKET_IFNAME={dev}", "PYTHONUNBUFFERED=1", sys.executable, "-m", "dist_ft", "doctor",
               str(path), "--nproc-per-node", "1", "--nnodes", "3", "--node-rank", str(rank),
               "--rdzv-endpoint", f"{three_hosts['addr'][0]}:29544"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        texts = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, texts[0][-4000:] + texts[2][-2000:]
    assert (out / "doctor" / "doctor.json").exists(), texts[0][-4000:] + texts[2][-3000:]
    links = _checks(_doctor(out))["links"]
    assert links["status"] == "fail" and links["culprit"].startswith("node node2 (10.79.0.3)"), links
    by_pair = {(r["a"], r["b"]): r["gb_per_s"] for r in links["details"]["links"]}
    assert set(by_pair) == {(0, 1), (0, 2), (1, 2)}
    assert by_pair[(0, 1)] > 4 * max(by_pair[(0, 2)], by_pair[(1, 2)])
    assert max(by_pair[(0, 2)], by_pair[(1, 2)]) < 0.006  # 40 Mbit/s = 0.005 GB/s
    line = [ln for ln in texts[0].splitlines() if ln.startswith("[doctor] FAIL")][0]
    print("\n" + line)
    assert "links: node node2 (10.79.0.3)" in line, line


# ------------------------------------------------------------------------------------------------ units

def test_link_pairs_cover_every_node_pair_and_one_link_inside_each_node():
    nodes = [Node(r, h, a) for r, (h, a) in enumerate([("a", "1"), ("a", "1"), ("b", "2"), ("b", "2"), ("c", "3")])]
    pairs = link_pairs(nodes)
    assert [(a, b) for a, b, k in pairs if k == "inter-node"] == [(0, 2), (0, 4), (2, 4)]
    assert [(a, b) for a, b, k in pairs if k == "intra-node"] == [(0, 1), (2, 3)]


def test_the_verdict_names_every_failing_check_and_its_culprit():
    checks = [Check("a", "pass", "fine"), Check("b", "fail", "too slow", culprit="node x"),
              Check("c", "warn", "tight"), Check("d", "fail", "full", culprit="rank 3 on y")]
    code, line = verdict(checks)
    assert code == 1 and line == "[doctor] FAIL (2 of 4 checks): b: node x - too slow; d: rank 3 on y - full"
    code, line = verdict([Check("a", "pass", "fine"), Check("c", "warn", "tight")])
    assert code == 0 and "1 of 2 checks passed, 1 warning(s): c: tight" in line

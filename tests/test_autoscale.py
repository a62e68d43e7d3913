"""Autoscaling execution on Ray's fake multi-node autoscaler (the provider `ray.cluster_utils.
AutoscalingCluster` uses, started here by hand: its `start()` runs `ray stop --force`, which would end
every Ray process of the machine).

A head with 1 CPU and two worker node types, both with min 0: `cpu` (CPU: 1) and `gpu` (CPU: 1,
GPU: 1, the GPU advertised as a resource: there is no real GPU). Through `pipeline.runtime.map_batches`
attached to the cluster (runtime.autoscale detected):
- a stage whose workers ask for a GPU makes the autoscaler start a `gpu` node, and its actors run
  there, each holding the GPU;
- a CPU stage with more work than the head holds asks for more: `cpu` nodes join while it runs and
  receive part of its work; every item comes back exactly once.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO
from tests.test_cluster import VENV_BIN, _free_ports, _kill_pids, _Node

DRIVER = textwrap.dedent('''
    import json, os, sys, time, functools
    import ray
    from pipeline.config import RuntimeConfig
    from pipeline.runtime import map_batches

    class Work:
        """Sleeps per item; reports where it ran (node, its type, the GPU it holds)."""
        def __init__(self, seconds):
            self.seconds = seconds
        def __call__(self, batch):
            ctx = ray.get_runtime_context()
            out = []
            for it in batch:
                t0 = time.time()
                time.sleep(self.seconds)
                out.append([{"key": it["key"], "status": "ok", "error": "", "node": ctx.get_node_id(),
                             "type": os.environ.get("RAY_NODE_TYPE_NAME", "head"), "start": t0,
                             "gpu": ctx.get_assigned_resources().get("GPU", 0)}])
            return out

    cfg = RuntimeConfig(progress=False, inline_below=0, max_workers=3)
    res = {}
    for name, n, gpus, seconds in (("gpu", 4, 1.0, 0.5), ("cpu", 24, 0.0, 1.5)):
        t0 = time.time()
        rows = [r[0] for _, out in map_batches(functools.partial(Work, seconds), [{"key": f"{name}{i}"} for i in range(n)],
                                               1, cfg, num_gpus=gpus) for r in out]
        res[name] = {"t0": t0, "rows": rows}
    print("RESULT " + json.dumps(res))
''')


@pytest.mark.slow
def test_gpu_stage_starts_gpu_nodes_and_nodes_added_mid_stage_get_work(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="pra", dir="/tmp"))  # short: Unix socket paths
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "HF_HUB_OFFLINE": "1"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    from ray._private.services import node_ip_address_from_perspective

    gcs, client, agent = _free_ports(3)
    address = f"{node_ip_address_from_perspective()}:{gcs}"
    config = {
        "cluster_name": "persona-autoscale-test", "max_workers": 3, "upscaling_speed": 10.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 150_000_000}, "node_config": {},
                               "min_workers": 0, "max_workers": 2},
            "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150_000_000}, "node_config": {},
                               "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    (root / "autoscaler.yaml").write_text(yaml.safe_dump(config))
    head = None
    try:
        head = _Node(["--head", f"--port={gcs}", "--num-cpus=1", f"--ray-client-server-port={client}",
                      f"--dashboard-agent-listen-port={agent}", "--include-dashboard=false",
                      "--object-store-memory=150000000", "--disable-usage-stats", f"--temp-dir={root / 'h'}",
                      f"--autoscaling-config={root / 'autoscaler.yaml'}"], env, root / "head.log")
        head.wait_started(timeout=180)
        r = subprocess.run([sys.executable, "-c", DRIVER], env={**env, "RAY_ADDRESS": address}, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
        head.remember_children()
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    finally:
        if head is not None:
            head.remember_children()
            head.stop()
        strays = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(root) in a for a in (p.info["cmdline"] or [])):
                    strays.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        _kill_pids(strays)
        shutil.rmtree(root, ignore_errors=True)

    gpu = res["gpu"]["rows"]
    assert sorted(r["key"] for r in gpu) == sorted(f"gpu{i}" for i in range(4))
    assert {r["type"] for r in gpu} == {"ray.worker.gpu"}, "the GPU stage ran on the node the autoscaler started"
    assert all(r["gpu"] == 1 for r in gpu), "each GPU actor holds the GPU"

    cpu = res["cpu"]["rows"]
    assert sorted(r["key"] for r in cpu) == sorted(f"cpu{i}" for i in range(24)), "items lost or repeated"
    by_node: dict[str, list[dict]] = {}
    for r in cpu:
        by_node.setdefault(r["node"], []).append(r)
    new = [rows for rows in by_node.values() if rows[0]["type"] == "ray.worker.cpu"]
    assert new, f"no item ran on a cpu node started during the stage: {[(r['type'], len(v)) for v in by_node.values() for r in v[:1]]}"
    t0 = res["cpu"]["t0"]
    first_new = min(min(r["start"] for r in rows) for rows in new)
    assert first_new > t0 + 1.0 and len(by_node) >= 2, "the new node joined mid-stage and received work"

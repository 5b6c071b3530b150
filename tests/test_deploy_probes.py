"""The rendered serving container, run here: its command line and environment start a real
`sqltune serve`, and the probes the manifests declare answer within the window they allow.

    pytest -m slow tests/test_deploy_probes.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sqltune.config import Config
from sqltune.deploy import common, k8s, render

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendered_serve_command_passes_its_own_probes(tiny_model_dir: Path) -> None:
    cfg = Config(gpu_count=0, deploy_cpu=2, deploy_memory="4Gi", serve_engine="transformers")
    deployment = yaml.safe_load(render.render(cfg, "kubernetes")["deployment.yaml"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container == k8s.deployment(cfg, common.names(cfg))["spec"]["template"]["spec"]["containers"][0]

    # The bucket URL and the platform's port are what differs here; everything else is as rendered.
    args = list(container["args"])
    args[args.index("--model") + 1] = str(tiny_model_dir)
    port = _free_port()
    args[args.index("--serve-port") + 1] = str(port)
    args += ["--serve-host", "127.0.0.1"]
    env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
    assert env.get("SQLTUNE_SERVE_ENGINE") == "transformers", "the serve fields reach the container as environment"

    startup, liveness = container["startupProbe"], container["livenessProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    server = subprocess.Popen([sys.executable, "-m", "sqltune", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + min(window, 240)
        ready = None
        while time.time() < deadline and server.poll() is None:
            try:
                ready = httpx.get(base + startup["httpGet"]["path"], timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()[-3000:] if server.stderr else ""
        assert ready is not None and ready.status_code == 200, "the startup probe never passed"
        assert httpx.get(base + liveness["httpGet"]["path"], timeout=2).status_code == 200
        assert httpx.get(base + container["readinessProbe"]["httpGet"]["path"], timeout=2).status_code == 200
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

"""A failed GGUF export says why: a full disk names the folder, what the file needed and what is
free (not numpy's "940032 requested and 927584 written"), and an export child that was killed says
so (not an empty `failed: `). Real ENOSPC on a small tmpfs (root only), a real SIGKILL.

    pytest tests/test_export_failures.py
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import run_sqltune

from sqltune.engines.llamacpp_engine import export_once
from sqltune.errors import ModelError

pytest.importorskip("gguf", reason="the gguf package is not installed")


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 512 kB tmpfs: smaller than the tiny model's GGUF (about 1.4 MB at f16)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_export_to_a_full_disk_names_the_folder_and_the_free_space(tiny_model_dir, small_disk: Path) -> None:
    out = small_disk / "tiny.f16.gguf"
    done = run_sqltune("export", "gguf", "--model", str(tiny_model_dir), "--out", str(out), "--quant", "f16",
                       check=False, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("sqltune: error:")]
    assert len(error) == 1, done.stderr[-3000:]
    assert f"writing {out} failed: no space left on the disk of {small_disk}" in error[0]
    assert re.search(r"needs about \d+\.\d MB; \d+\.\d MB free there", error[0]), error[0]
    assert "fix: free space there" in done.stderr
    assert list(small_disk.iterdir()) == []  # the half-written file is gone


def test_a_servers_export_into_a_full_cache_says_so(tiny_model_dir, small_disk: Path) -> None:
    with pytest.raises(ModelError) as caught:
        export_once(tiny_model_dir, "f16", small_disk)
    message = caught.value.message
    assert f"in the model cache ({small_disk / 'gguf-export'}" in message, message
    assert "no space left on the disk" in message and "MB free there" in message, message
    assert "--model-cache" in (caught.value.hint or "")


def test_a_killed_export_child_is_named(tiny_model_dir, tmp_path: Path) -> None:
    failure: list[BaseException] = []

    def export() -> None:
        try:
            export_once(tiny_model_dir, "f16", tmp_path / "cache")
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            failure.append(e)

    worker = threading.Thread(target=export)
    worker.start()
    me, child, deadline = psutil.Process(), None, time.monotonic() + 60
    while child is None and time.monotonic() < deadline and worker.is_alive():
        child = next((c for c in me.children() if "export" in c.cmdline() and "gguf" in c.cmdline()), None)
        time.sleep(0.01)
    assert child is not None, "the export child never started"
    child.send_signal(signal.SIGKILL)
    worker.join(120)
    assert failure and isinstance(failure[0], ModelError), failure
    assert "failed: the export process was killed by SIGKILL (the kernel's out-of-memory killer" in \
        failure[0].message, failure[0].message

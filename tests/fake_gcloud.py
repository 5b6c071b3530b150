"""A stand-in `gcloud` executable for tests: a real program on PATH that keeps the project's resources in
a JSON state file (FAKE_GCLOUD_STATE) and appends each call to FAKE_GCLOUD_LOG. It answers the calls
`sqltune deploy cloudrun` makes the way gcloud does: JSON on describe, NOT_FOUND on stderr with exit
code 1 for a missing resource, an error when a resource it needs is missing.

    tests/test_deploy_cloudrun.py installs it as <tmp>/bin/gcloud
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml


def _flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return ""


def _positional(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("--"):
            skip = "=" not in a and a not in ("--uniform-bucket-level-access", "--wait", "--quiet", "--recursive")
        else:
            out.append(a)
    return out


def _labels(args: list[str]) -> dict[str, str]:
    raw = _flag(args, "--labels") or _flag(args, "--update-labels")
    return dict(kv.split("=", 1) for kv in raw.split(",") if kv)


def main(argv: list[str]) -> int:
    state_path = Path(os.environ["FAKE_GCLOUD_STATE"])
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    if state.get("logged_out"):
        print("ERROR: (gcloud) You do not currently have an active account selected.", file=sys.stderr)
        return 1
    if state.get("garbled") and "--format=json" in argv:  # a broken installation or an unexpected version
        print("Updates are available for some Google Cloud CLI components.")
        return 0
    project = _flag(argv, "--project")
    pos = _positional(argv)
    group = tuple(pos[:3])

    def key() -> str:
        if pos[:2] == ["iam", "service-accounts"]:
            name = pos[3]
            return "sa:" + (name if "@" in name else f"{name}@{project}.iam.gserviceaccount.com")
        if pos[0] == "secrets":
            return "secret:" + pos[2]
        if pos[:2] == ["storage", "buckets"]:
            return "bucket:" + pos[3].removeprefix("gs://")
        if pos[:2] == ["storage", "rm"]:
            return "bucket:" + pos[2].removeprefix("gs://").rstrip("/")
        if pos[:2] == ["artifacts", "repositories"]:
            return "repo:" + pos[3]
        if pos[:3] == ["artifacts", "docker", "images"]:
            return "image:" + pos[4]
        if pos[0] == "run":
            kind = pos[1][:-1]
            if pos[2] == "replace":
                return f"{kind}:" + yaml.safe_load(Path(pos[3]).read_text())["metadata"]["name"]
            return f"{kind}:" + pos[3]
        return ""

    def missing(k: str) -> int:
        print(f"ERROR: (gcloud.{'.'.join(pos[:3])}) NOT_FOUND: {k} was not found", file=sys.stderr)
        return 1

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=1, sort_keys=True))

    verb = pos[2] if pos[0] in ("iam", "storage", "artifacts") and len(pos) > 2 else pos[1] if len(pos) > 1 else ""
    if pos[:2] == ["artifacts", "docker"]:
        verb = pos[3]
    if pos[0] == "run":
        verb = pos[2]
    if pos[:2] == ["storage", "rm"]:
        verb = "rm"
    enabled = state.setdefault("services", [])
    if pos[:2] == ["services", "list"]:
        print(json.dumps([{"config": {"name": api}, "state": "ENABLED"} for api in enabled]))
        return 0
    if pos[:2] == ["services", "enable"]:
        state["services"] = sorted(set(enabled) | set(pos[2:]))
        save()
        return 0
    api = {"iam": "iam", "secrets": "secretmanager", "run": "run", "artifacts": "artifactregistry",
           "builds": "cloudbuild"}.get(pos[0])
    if api and f"{api}.googleapis.com" not in enabled:
        print(f"ERROR: (gcloud) PERMISSION_DENIED: {api}.googleapis.com has not been used in project {project} "
              "before or it is disabled. reason: SERVICE_DISABLED", file=sys.stderr)
        return 1
    if pos[:2] == ["builds", "submit"]:
        build = yaml.safe_load(Path(_flag(argv, "--config")).read_text())
        for image in build["images"]:
            state["image:" + image] = {}
        save()
        return 0
    k = key()
    if verb == "describe":
        if k not in state:
            return missing(k)
        print(json.dumps(state[k]))
        return 0
    if verb == "get-iam-policy":
        if k not in state:
            return missing(k)
        print(json.dumps({"bindings": state[k].get("bindings", [])}))
        return 0
    if verb == "add-iam-policy-binding":
        if k not in state:
            return missing(k)
        if state.get("iam_lag"):  # IAM does not see a service account created a moment ago
            state["iam_lag"] -= 1
            save()
            print(f"ERROR: INVALID_ARGUMENT: Service account {_flag(argv, '--member')} does not exist.",
                  file=sys.stderr)
            return 1
        state[k].setdefault("bindings", []).append({"role": _flag(argv, "--role"), "members": [_flag(argv, "--member")]})
    elif verb == "create":
        if k in state:
            print(f"ERROR: ALREADY_EXISTS: {k}", file=sys.stderr)
            return 1
        if pos[0] == "secrets" and not sys.stdin.read():
            print("ERROR: the secret payload is empty", file=sys.stderr)
            return 1
        state[k] = {"labels": _labels(argv), "description": _flag(argv, "--description")}
        if k.startswith("sa:"):
            state["iam_lag"] = 1
    elif verb == "update":
        if k not in state:
            return missing(k)
        state[k].setdefault("labels", {}).update(_labels(argv))
    elif verb == "replace":
        state[k] = {"file": pos[3]}
    elif verb == "execute":
        if k not in state:
            return missing(k)
        state.setdefault("executions", []).append(pos[3])
    elif verb in ("delete", "rm"):
        if k not in state:
            return missing(k)
        del state[k]
        if k.startswith("repo:"):  # a repository takes its images with it
            for image in [i for i in state if i.startswith("image:") and f"/{k[5:]}/" in i]:
                del state[image]
    else:
        print(f"ERROR: fake gcloud does not know {group}", file=sys.stderr)
        return 2
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

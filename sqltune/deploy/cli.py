"""`sqltune deploy`: render manifests, or run the whole Cloud Run deployment with gcloud.

    sqltune deploy render --target cloudrun --config configs/gemma-2b-qlora.yaml --out deploy/
    sqltune deploy render --target kubernetes --out deploy/k8s/
    sqltune deploy cloudrun --config configs/gemma-2b-qlora.yaml --project P --region us-central1 --dry-run
    sqltune deploy cloudrun --project P --region us-central1 --teardown --yes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqltune import config
from sqltune.errors import DeployError

GROUPS = ["finetune", "eval", "deploy"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="Render Cloud Run / Kubernetes manifests, or deploy to Cloud Run.")
    dsub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)

    r = dsub.add_parser("render", allow_abbrev=False,
                        help="Write the manifests for a target, rendered from the config.")
    r.add_argument("--target", required=True, choices=["cloudrun", "kubernetes"],
                   help="cloudrun: job.yaml, eval-job.yaml, service.yaml, Cloud Build configs; "
                        "kubernetes: job.yaml, deployment.yaml, service.yaml.")
    r.add_argument("--out", required=True, metavar="DIR", help="Folder the files are written to.")
    config.add_arguments(r, groups=GROUPS)
    r.set_defaults(func=run_render)

    c = dsub.add_parser("cloudrun", allow_abbrev=False,
                        help="Create or reuse every Cloud Run resource, build the images, train, serve.")
    c.add_argument("--out", default="deploy/cloudrun", metavar="DIR",
                   help="Where the manifests that gcloud applies are written (default deploy/cloudrun).")
    c.add_argument("--dry-run", action="store_true",
                   help="Print the gcloud commands that would run; only read-only describe calls are made.")
    c.add_argument("--teardown", action="store_true",
                   help="Delete what this command created (service, jobs, images, bucket, secret, account).")
    c.add_argument("--yes", action="store_true", help="Do not ask before --teardown deletes.")
    c.add_argument("--rebuild", action="store_true", help="Build the images even when their tag exists.")
    c.add_argument("--no-execute", dest="execute", action="store_false",
                   help="Replace the job without running it (the service then serves the model already "
                        "in the bucket).")
    config.add_arguments(c, groups=GROUPS)
    c.set_defaults(func=run_cloudrun)


def run_render(args: argparse.Namespace) -> int:
    from sqltune.deploy import common, render

    cfg, _ = config.from_namespace(args)
    paths = render.write(render.render(cfg, args.target), args.out)
    for path in paths:
        print(path)
    _print_plan(cfg)
    for warning in common.warnings(cfg, args.target):
        print(f"warning: {warning}", file=sys.stderr)
    n = common.names(cfg)
    if not n.registry:
        print("note: images are bare local names; pass --project and --region (or --image-registry) "
              "to point the manifests at Artifact Registry", file=sys.stderr)
    return 0


def _print_plan(cfg: config.Config) -> tuple[str, str] | None:
    """Print the fine-tuning plan (and a warning when it cannot fit) on stderr; return the problem."""
    from sqltune.deploy import plan

    p = plan.plan(cfg)
    for line in p.lines():
        print(line, file=sys.stderr)
    problem = p.problem()
    if problem:
        print(f"warning: {problem[0]}\n  fix: {problem[1]}", file=sys.stderr)
    return problem


def run_cloudrun(args: argparse.Namespace) -> int:
    from sqltune.deploy import cloudrun, common, render

    cfg, _ = config.from_namespace(args)
    cloudrun.require(cfg)
    if not args.teardown:
        common.check(cfg, "cloudrun")  # what Cloud Run would reject fails before any gcloud call
        problem = _print_plan(cfg)
        if problem and args.execute and not args.dry_run:
            raise DeployError(*problem)  # a run that cannot finish is refused before anything is built or billed
    gcloud = cloudrun.Gcloud()
    n = common.names(cfg)
    where = f"project {n.project}, region {n.region}"
    if args.teardown:
        steps = cloudrun.teardown_plan(cfg, n, gcloud)
        text = cloudrun.format_plan(steps, f"sqltune deploy cloudrun --teardown: {where}", teardown=True)
        if args.dry_run:
            print(text + "\n# dry run: nothing was deleted")
            return 0
        if not any(not s.skip for s in steps):
            print(text + "\n# nothing to delete")
            return 0
        print(text)
        if not args.yes:
            if not sys.stdin.isatty():
                raise DeployError("--teardown deletes the bucket and its models and asks first",
                                  "run it in a terminal, or pass --yes")
            if input(f"Delete these from {n.project}? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        cloudrun.apply(steps, gcloud)
        return 0

    out = Path(args.out)
    render.write(render.render(cfg, "cloudrun"), out)
    for warning in common.warnings(cfg, "cloudrun"):
        print(f"warning: {warning}", file=sys.stderr)
    steps = cloudrun.plan(cfg, n, out, gcloud, rebuild=args.rebuild, execute=args.execute)
    if args.dry_run:
        print(cloudrun.format_plan(steps, f"sqltune deploy cloudrun: {where}; manifests in {out}")
              + "\n# dry run: nothing was changed")
        return 0
    builds = [s for s in steps if not s.skip and s.commands[0][:3] == ["gcloud", "builds", "submit"]]
    if builds and not Path("docker/Dockerfile.finetune").is_file():
        raise DeployError("the images are built from docker/Dockerfile.* but this folder has none",
                          "run `sqltune deploy cloudrun` from the sqltune repository root")
    ran = cloudrun.apply(steps, gcloud)
    print(f"done: {ran} steps ran, {len(steps) - ran} reused; service {n.service} in {n.region}")
    return 0

"""`meshfed install` (a member cluster's manifests, printed or applied) and `meshfed image build`.

    meshfed install --context kind-east --print | kubectl apply -f -
    meshfed install --context kind-east --controller 172.18.0.1:15012 --bootstrap 172.18.0.1:15013 \\
        --controller-roots .meshfed/roots/east.mesh.local.pem     (applies through the kubeconfig)
    meshfed install --context kind-east --workloads --print       (the LabCluster's demo workloads)
    meshfed install --context kind-east --with-controller --repo https://git.example/fleet.git --print
    meshfed image build [--tag meshfed/meshfed:0.1.0] [--fleet DIR]   (docker build + kind load per cluster)

The objects come from `clusters.kind.manifests` (pure); applying goes through `clusters.kube.apply`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from federation.cli.output import EXIT_FAILED, EXIT_PROBLEMS, EXIT_USAGE, fail, fleet_option, resolve_fleet

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_fleet(fleet: str | None) -> Any:
    """The fleet at `fleet` (--fleet), or where `resolve_fleet` finds it; exits on problems."""
    import gitops
    from gitops.problems import FleetError

    path = resolve_fleet(fleet)
    if not path.is_dir():
        fail(f"fleet directory {path} does not exist", hint="pass --fleet DIR (a fleet repo: it holds federation.yaml)",
             code=EXIT_FAILED)
    try:
        return gitops.load_worktree(path)
    except FleetError as e:
        fail(f"the fleet repo has problems: {e}", hint=f"run `meshfed validate {path}`", code=EXIT_PROBLEMS)


def register(group: click.Group) -> None:
    @group.command("install")
    @click.option("--context", "context", required=True, help="the cluster's kubeconfig context (its spec.api.context)")
    @fleet_option()
    @click.option("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG / ~/.kube/config)")
    @click.option("--print", "print_only", is_flag=True, help="print the YAML instead of applying it")
    @click.option("--image", default=None, help="meshfed image (default meshfed/meshfed:<version>)")
    @click.option("--controller", default=None, metavar="HOST:PORT",
                  help="where proxies reach the controller's gRPC services (default: the in-cluster Service)")
    @click.option("--bootstrap", default=None, metavar="HOST:PORT",
                  help="the controller's certificate service for first certificates (default: in-cluster Service)")
    @click.option("--controller-roots", "roots", default=None, type=click.Path(dir_okay=False, exists=True),
                  help="PEM roots of the cluster's trust domain, what its proxies verify the controller with "
                       "(the controller's state dir's roots/<trust-domain>.pem)")
    @click.option("--workloads", is_flag=True, help="the LabCluster's demo workloads instead of meshfed itself")
    @click.option("--with-controller", is_flag=True,
                  help="also run the controller in this cluster (`controller run --in-cluster`)")
    @click.option("--repo", default="", help="--with-controller: the fleet repo's Git URL the controller follows")
    def install(context: str, fleet: str | None, kubeconfig: str | None, print_only: bool, image: str | None,
                controller: str | None, bootstrap: str | None, roots: str | None, workloads: bool,
                with_controller: bool, repo: str) -> None:
        """Install meshfed into the member cluster behind CONTEXT: namespace, RBAC, the node proxy
        DaemonSet, the east-west gateway (Deployment + LoadBalancer Service)."""
        from dataclasses import replace

        from clusters.kind.manifests import (
            InstallOptions,
            ManifestError,
            cluster_for_context,
            controller_objects,
            member_objects,
            to_yaml,
            workload_objects,
        )

        snapshot = load_fleet(fleet)
        opts = InstallOptions()
        if image:
            opts = replace(opts, image=image)
        if controller:
            opts = replace(opts, controller=controller)
        if bootstrap:
            opts = replace(opts, bootstrap=bootstrap)
        if roots:
            opts = replace(opts, controller_roots_pem=Path(roots).read_text())
        try:
            cluster = cluster_for_context(snapshot, context)
        except ManifestError as e:  # an unknown name: a problem found, not a usage error
            fail(str(e), hint="meshfed graph --fleet DIR -o table lists the clusters", code=EXIT_PROBLEMS)
        try:
            if workloads:
                objects = workload_objects(snapshot, cluster.name, opts)
            else:
                objects = member_objects(snapshot, cluster.name, opts)
                if with_controller:
                    objects += controller_objects(snapshot, cluster.name, repo, opts)
        except ManifestError as e:
            fail(str(e), code=EXIT_USAGE)
        if print_only:
            click.echo(to_yaml(objects), nl=False)
            return
        if not roots and not workloads and not with_controller:
            click.echo("warning: no --controller-roots: the proxies start once the ConfigMap meshfed-controller-roots "
                       "holds the controller's roots (run install again with them)", err=True)
        from clusters.kube.apply import ApplyError, apply_objects
        from clusters.kube.discovery import DiscoveryError

        try:
            for line in apply_objects(kubeconfig, context, objects):
                click.echo(str(line))
        except (ApplyError, DiscoveryError) as e:
            fail(str(e), code=EXIT_FAILED)

    @group.group("image")
    def image() -> None:
        """The meshfed container image (node proxy, gateway, controller, demo workloads)."""

    @image.command("build")
    @click.option("--tag", default=None, help="image tag (default meshfed/meshfed:<version>)")
    @click.option("--fleet", default=None, type=click.Path(file_okay=False),
                  help="also `kind load docker-image` into each of this fleet's clusters")
    @click.option("--dry-run", is_flag=True, help="print the commands only")
    def build(tag: str | None, fleet: str | None, dry_run: bool) -> None:
        """docker build the image from this checkout, then kind load it into each cluster."""
        from clusters.kind.manifests import DEFAULT_IMAGE
        from clusters.kind.plan import Command, Plan
        from clusters.kind.runner import CommandRunner, KindError

        tag = tag or DEFAULT_IMAGE
        if tag.endswith(":latest") or ":" not in tag.rsplit("/", 1)[-1]:
            fail(f"image tag {tag!r}: give a version (kind-loaded images with :latest are pulled again, and fail)",
                 code=EXIT_USAGE)
        cmds = [Command(("docker", "build", "-t", tag, "-f", str(REPO_ROOT / "Dockerfile"), str(REPO_ROOT)),
                        f"build {tag}", timeout_s=1800)]
        if fleet:
            cmds += [Command(("kind", "load", "docker-image", tag, "--name", name), f"load {tag} into kind cluster {name}",
                             timeout_s=600) for name in sorted(load_fleet(fleet).clusters)]
        runner = CommandRunner(Path(os.environ.get("TMPDIR", "/tmp")) / "meshfed-image", dry_run=dry_run)
        try:
            runner.run(Plan(tuple(cmds)))
        except KindError as e:
            fail(str(e), code=EXIT_FAILED)


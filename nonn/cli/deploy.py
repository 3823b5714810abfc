"""`nonn deploy k8s|systemd|image|triton`: deployment files from a bundle and a plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from nonn.cli import CLIError
from nonn.cli.common import positive_float, positive_int
from nonn.cli.deprecation import add_alias

# nonn.deploy.spec's defaults, repeated so that building the parser imports nothing.
DEFAULT_BUNDLE_PATH = "/opt/nonn/bundle"
DEFAULT_PORT = 8001
DEFAULT_AGGREGATOR_PORT = 8000

EPILOG = """\
targets:
  k8s      Kubernetes manifests (k3s, KubeEdge, any cluster) and a kustomization.yaml
  systemd  one unit per student/device and one for the aggregator, with install steps
  image    the container build context: Dockerfile (multi-arch), docker-bake.json, bundle
  triton   a Triton model repository serving the whole ensemble on one server

example:
  nonn plan --bundle runs/bundle --fleet rpi4b:4 --out runs/plan.json
  nonn deploy image --bundle runs/bundle --plan runs/plan.json --out deploy/image --image registry.local/nonn
  nonn deploy k8s --bundle runs/bundle --plan runs/plan.json --out deploy/k8s --image registry.local/nonn \\
      --nodes pi-a,pi-b,pi-c,pi-d
"""


def _common(p: argparse.ArgumentParser, plan: bool = True) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory from `nonn export`")
    if plan:
        p.add_argument("--plan", required=True, help="plan.json from `nonn plan --out` (made for this bundle)")
    p.add_argument("--out", required=True, help="directory to write (replaced as a whole)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")


def _fleet(p: argparse.ArgumentParser, tls: bool = True) -> None:
    g = p.add_argument_group("fleet")
    g.add_argument("--fleet-name", default="nonn", metavar="NAME", help="name prefix of every object/unit, so several fleets can coexist (default: nonn)")
    add_alias(g, "--fleet", "--fleet-name", dest="fleet_name")
    g.add_argument("--bundle-path", default=DEFAULT_BUNDLE_PATH, help=f"where the bundle is on a device or in a container (default: {DEFAULT_BUNDLE_PATH})")
    g.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"students' gRPC port (default: {DEFAULT_PORT})")
    g.add_argument("--aggregator-port", type=positive_int, default=DEFAULT_AGGREGATOR_PORT, help=f"aggregator's gRPC port (default: {DEFAULT_AGGREGATOR_PORT})")
    g.add_argument("--memory-headroom", type=positive_float, default=1.5,
                   help="memory limit = the plan's estimate x this, capped at the device's memory (default: 1.5)")
    g.add_argument("--max-batch", type=positive_int, default=64, help="largest batch a server accepts (default: 64)")
    if tls:
        g.add_argument("--tls", choices=("none", "tls", "mtls"), default="none",
                       help="TLS between clients, aggregator and students: tls (servers present certificates) or mtls "
                       "(the aggregator too); certificates come from Secrets / files (default: none)")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default="nonn-fleet", help="image repository, e.g. registry.local/nonn (default: nonn-fleet)")
    p.add_argument("--tag", default=None, help="tag prefix (default: the first 12 hex digits of the bundle's manifest sha256)")


def register(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser(
        "deploy",
        help="write deployment files (Kubernetes, systemd, container image, Triton) from a bundle and a plan",
        description="Generate what existing engines need to run the fleet: every server runs the `nonn serve` "
        "command `nonn plan` implies, on the device the plan chose, with the plan's memory figures. A plan made "
        "for another bundle is refused.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = d.add_subparsers(dest="deploy_target", metavar="TARGET", required=True)

    k = sub.add_parser("k8s", help="Kubernetes manifests and a kustomization.yaml",
                       description="One Deployment and Service per student, pinned to its device's node; the aggregator "
                       "as a Deployment with several replicas behind a Service; gRPC health probes, memory from the plan, "
                       "non-root and read-only.")  # fmt: skip
    _common(k)
    _fleet(k)
    _image_args(k)
    k.add_argument("--nodes", default=None,
                   help="node names: NODE,... one per plan device in the plan's order, or DEVICE=NODE,... (pods then select "
                   "kubernetes.io/hostname); default: pods select the label nonn/device=<device> that you put on the nodes")
    k.add_argument("--bundle-source", choices=("image", "volume", "configmap"), default="image",
                   help="how the bundle reaches the pods: baked into per-student images (`nonn deploy image`), a hostPath "
                   "volume at --bundle-path on each node, or a ConfigMap per server (models under 1 MiB) (default: image)")
    k.add_argument("--aggregator-replicas", type=positive_int, default=2, help="aggregator pods (default: 2)")
    k.add_argument("--namespace", default=None, help="namespace set in kustomization.yaml (default: none: kubectl's current)")
    k.set_defaults(func=_k8s)

    s = sub.add_parser("systemd", help="systemd units (one per student/device, one aggregator) and install steps",
                       description="One sandboxed unit per student for its device and one for the aggregator, restart on "
                       "failure, MemoryMax from the plan, and a README with the install steps.")  # fmt: skip
    _common(s)
    _fleet(s)
    s.add_argument("--nodes", default=None,
                   help="host names or addresses of the devices: HOST,... in the plan's device order, or DEVICE=HOST,... "
                   "(the aggregator calls HOST:PORT); default: the devices' names as host names")
    s.add_argument("--nonn-bin", default="/opt/nonn/venv/bin/nonn", help="absolute path of `nonn` on the hosts (default: /opt/nonn/venv/bin/nonn)")
    s.set_defaults(func=_systemd)

    i = sub.add_parser("image", help="container build context for the lean device side (amd64 + arm64)",
                       description="A Dockerfile with one small stage per student (nonn's core without torch, the manifest, "
                       "one model) and one for the aggregator, a docker-bake.json building them for linux/amd64 and "
                       "linux/arm64, and the bundle's files.")  # fmt: skip
    _common(i)
    _fleet(i)
    _image_args(i)
    i.add_argument("--wheel", default=None, help="the nonn wheel to install in the images (default: put one in OUT/wheels/)")
    i.set_defaults(func=_image)

    t = sub.add_parser("triton", help="Triton model repository: students, head and an ensemble on one server",
                       description="Write a Triton model repository that serves the whole ensemble (students, the "
                       "features concatenation, the head, and an ensemble wiring them), batching on. `nonn export` "
                       "writes the same into every bundle.")  # fmt: skip
    _common(t, plan=False)
    t.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every model; 0 turns batching off (default: 64)")
    t.set_defaults(func=_triton)


def _spec(args: argparse.Namespace, hosts_from_nodes: bool = False):
    from nonn.deploy.spec import DeployOptions, FleetSpec, dns_label, parse_nodes
    from nonn.devices.plan_file import load_plan
    from nonn.runtime.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    plan = load_plan(args.plan)
    plan.check_bundle(bundle, source=f"--plan {args.plan}")
    nodes = parse_nodes(getattr(args, "nodes", None), plan)
    options = DeployOptions(
        fleet=args.fleet_name, nodes=nodes, bundle_path=args.bundle_path, port=args.port, aggregator_port=args.aggregator_port,
        memory_headroom=args.memory_headroom, tls=getattr(args, "tls", "none"), max_batch=args.max_batch,
    )  # fmt: skip
    hosts = None
    if hosts_from_nodes:
        hosts = [nodes.get(plan.devices_of(s.name)[0]) or dns_label(plan.devices_of(s.name)[0]) for s in bundle.students]
    return FleetSpec.build(bundle, plan, options, device_hosts=hosts)


def _report(target: str, out: str, files: list[Path], spec=None) -> int:
    print(f"nonn deploy {target}: wrote {len(files)} files to {out}")
    for path in files:
        print(f"  {path.relative_to(out)}")
    if spec is not None:
        for s in spec.servers:
            where = f"{s.student} on {s.device}" + (f" ({s.node})" if s.node else "") if s.student else "aggregator"
            print(f"  {s.name}: {where}, memory {s.memory_request_mb} MiB, limit {s.memory_limit_mb} MiB")
    return 0


def _yaml_needed() -> None:
    try:
        import yaml  # noqa: F401
    except ModuleNotFoundError:
        raise CLIError("nonn deploy k8s writes YAML with PyYAML: pip install 'nonn[deploy]'") from None


def _k8s(args: argparse.Namespace) -> int:
    from nonn.deploy.k8s import write_k8s

    _yaml_needed()
    spec = _spec(args)
    files = write_k8s(
        spec, args.out, namespace=args.namespace, overwrite=args.overwrite, image=args.image, tag=args.tag,
        bundle_source=args.bundle_source, aggregator_replicas=args.aggregator_replicas,
    )  # fmt: skip
    return _report("k8s", args.out, files, spec)


def _systemd(args: argparse.Namespace) -> int:
    from nonn.deploy.systemd import write_systemd

    spec = _spec(args, hosts_from_nodes=True)
    return _report("systemd", args.out, write_systemd(spec, args.out, nonn_bin=args.nonn_bin, overwrite=args.overwrite), spec)


def _image(args: argparse.Namespace) -> int:
    from nonn.deploy.image import write_image_context

    spec = _spec(args)
    files = write_image_context(spec, args.out, image=args.image, tag=args.tag, wheel=args.wheel, overwrite=args.overwrite)
    return _report("image", args.out, files)


def _triton(args: argparse.Namespace) -> int:
    from nonn.deploy.triton import write_model_repository
    from nonn.runtime.bundle import Bundle

    if args.max_batch < 0:
        raise CLIError(f"--max-batch must be >= 0, got {args.max_batch}")
    files = write_model_repository(Bundle.load(args.bundle), args.out, max_batch=args.max_batch, overwrite=args.overwrite)
    return _report("triton", args.out, files)

"""Kubernetes manifests for a fleet (plain objects: k3s, KubeEdge and any conformant cluster).

Per student: a Deployment of one pod pinned to the node its device is (nodeSelector), and a
Service in front of it. The aggregator: a Deployment of several replicas (it is stateless)
behind a Service, a PodDisruptionBudget, and `--devices` pointing at the student Services by
DNS. Every pod: native gRPC probes on grpc.health.v1 (TCP probes under TLS: the kubelet's gRPC
probe does not speak TLS), memory request = the plan's estimate and limit = that with headroom,
non-root, read-only root file system, no privilege escalation, no capabilities. A
kustomization.yaml lists every file so users patch the fleet with overlays.

How the bundle reaches the pods (`bundle_source`):
  image      baked into the image (`nonn deploy image` writes its recipe; one image per student)
  volume     a hostPath directory on each node (copy the bundle there; nothing in the image)
  configmap  one ConfigMap per server with the manifest and that server's model (each under 1 MiB)

The objects are validated against the Kubernetes JSON schemas of KUBERNETES_VERSION in the tests.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from nonn.deploy.image import image_ref
from nonn.deploy.spec import FleetSpec, ServerSpec, dns_label
from nonn.deploy.writer import write_tree

__all__ = ["KUBERNETES_VERSION", "BUNDLE_SOURCES", "CONFIGMAP_LIMIT_BYTES", "manifests", "write_k8s"]

KUBERNETES_VERSION = "1.30"  # the schemas the manifests are validated against (native gRPC probes: 1.27+)
BUNDLE_SOURCES = ("image", "volume", "configmap")
CONFIGMAP_LIMIT_BYTES = 1024 * 1024  # the API server's limit on a ConfigMap's data
NODE_LABEL = "nonn/device"  # the label nodes carry when --nodes is not given
RUN_AS = 65532  # the non-root user of the image (`nonn deploy image`)


def _labels(spec: FleetSpec, server: ServerSpec) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "nonn",
        "app.kubernetes.io/instance": spec.options.fleet,
        "app.kubernetes.io/component": server.component,
    }
    if server.student:
        labels["nonn/student"] = dns_label(server.student)
    return labels


def _probes(server: ServerSpec, tls: bool) -> dict[str, Any]:
    check: dict[str, Any] = {"tcpSocket": {"port": "grpc"}} if tls else {"grpc": {"port": server.port}}
    return {
        "startupProbe": {**check, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**check, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**check, "periodSeconds": 10, "failureThreshold": 3},
    }


def _pod(spec: FleetSpec, server: ServerSpec, image: str, source: str) -> dict[str, Any]:
    o = spec.options
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if source == "volume":
        volumes.append({"name": "bundle", "hostPath": {"path": o.bundle_path, "type": "Directory"}})
        mounts.append({"name": "bundle", "mountPath": o.bundle_path, "readOnly": True})
    elif source == "configmap":
        volumes.append({"name": "bundle", "configMap": {"name": f"{server.name}-bundle"}})
        mounts.append({"name": "bundle", "mountPath": o.bundle_path, "readOnly": True})
    if o.tls != "none":
        volumes.append({"name": "tls", "secret": {"secretName": f"{server.name}-tls", "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": o.tls_dir, "readOnly": True})
    container = {
        "name": server.component,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["nonn"],
        "args": list(server.args),
        "ports": [{"name": "grpc", "containerPort": server.port, "protocol": "TCP"}],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            {"name": "OMP_NUM_THREADS", "value": str(server.threads)},
        ],
        "resources": {
            "requests": {"memory": f"{server.memory_request_mb}Mi", "cpu": "100m"},
            "limits": {"memory": f"{server.memory_limit_mb}Mi"},
        },
        **_probes(server, o.tls != "none"),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 15,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if server.device is not None:
        pod["nodeSelector"] = {"kubernetes.io/hostname": server.node} if server.node else {NODE_LABEL: dns_label(server.device)}
    return pod


def _deployment(spec: FleetSpec, server: ServerSpec, image: str, source: str, replicas: int) -> dict[str, Any]:
    labels = _labels(spec, server)
    metadata: dict[str, Any] = {"name": server.name, "labels": labels}
    if server.device is not None:
        metadata["annotations"] = {"nonn/device": server.device, "nonn/profile": server.profile or ""}
    pod = _pod(spec, server, image, source)
    if replicas > 1:
        term = {"labelSelector": {"matchLabels": _labels(spec, server)}, "topologyKey": "kubernetes.io/hostname"}
        pod["affinity"] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            # One pod per device: the old pod goes before the new one starts (a device holds one).
            "strategy": {"type": "Recreate"} if server.device is not None else {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": _labels(spec, server)},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _service(spec: FleetSpec, server: ServerSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": server.name, "labels": _labels(spec, server)},
        "spec": {
            "type": "ClusterIP",
            "selector": _labels(spec, server),
            "ports": [{"name": "grpc", "port": server.port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}],
        },
    }


def _config_map(spec: FleetSpec, server: ServerSpec) -> dict[str, Any]:
    root = spec.bundle.root
    sizes = {name: (root / name).stat().st_size for name in server.files}
    total = sum(sizes.values())
    if total > CONFIGMAP_LIMIT_BYTES:
        raise ValueError(
            f"--bundle-source configmap: {server.name} needs {', '.join(f'{n} ({b:,} B)' for n, b in sizes.items())}, "
            f"{total:,} B in all, over a ConfigMap's {CONFIGMAP_LIMIT_BYTES:,} B; use --bundle-source image or volume"
        )
    data = {name: (root / name).read_text(encoding="utf-8") for name in server.files if name.endswith(".json")}
    binary = {name: base64.b64encode((root / name).read_bytes()).decode("ascii") for name in server.files if name not in data}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{server.name}-bundle", "labels": _labels(spec, server)},
        "immutable": True,
        "data": data,
        "binaryData": binary,
    }


def _disruption_budget(spec: FleetSpec, server: ServerSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": server.name, "labels": _labels(spec, server)},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": _labels(spec, server)}},
    }


def manifests(spec: FleetSpec, *, image: str = "nonn-fleet", tag: str | None = None, bundle_source: str = "image",
              aggregator_replicas: int = 2) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """File name -> the Kubernetes objects it holds (students, then the aggregator)."""
    if bundle_source not in BUNDLE_SOURCES:
        raise ValueError(f"bundle source {bundle_source!r}: expected one of {', '.join(BUNDLE_SOURCES)}")
    if aggregator_replicas < 1:
        raise ValueError(f"aggregator replicas {aggregator_replicas}: expected at least 1")
    files: dict[str, list[dict[str, Any]]] = {}
    for server in spec.servers:
        target = (server.student or "aggregator") if bundle_source == "image" else "runtime"
        ref = image_ref(spec, image, tag, target)
        objects = [] if bundle_source != "configmap" else [_config_map(spec, server)]
        replicas = 1 if server.component == "student" else aggregator_replicas
        objects += [_deployment(spec, server, ref, bundle_source, replicas), _service(spec, server)]
        if server.component == "aggregator" and replicas > 1:
            objects.append(_disruption_budget(spec, server))
        files[f"{server.name}.yaml"] = objects
    return files


def write_k8s(spec: FleetSpec, out: str | Path, *, namespace: str | None = None, overwrite: bool = False, **kwargs: Any) -> list[Path]:
    """Write the manifests, a kustomization.yaml and a README into `out` (atomically); returns the files."""
    import yaml

    files = manifests(spec, **kwargs)
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        if dns_label(namespace) != namespace:
            raise ValueError(f"--namespace {namespace!r}: expected a DNS label, e.g. {dns_label(namespace)!r}")
        kustomization["namespace"] = namespace
    kustomization["resources"] = sorted(files)
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # plain YAML: no &anchors for repeated labels
            return True

    texts = {name: yaml.dump_all(objects, Dumper=Dumper, sort_keys=False) for name, objects in files.items()}
    texts["kustomization.yaml"] = yaml.dump(kustomization, Dumper=Dumper, sort_keys=False)
    texts["README.md"] = _readme(spec, kwargs.get("bundle_source", "image"))
    return write_tree(out, texts, overwrite=overwrite)


def _readme(spec: FleetSpec, source: str) -> str:
    o = spec.options
    lines = [
        f"# Fleet `{o.fleet}` on Kubernetes",
        "",
        f"Bundle manifest sha256 `{spec.plan.bundle.manifest_sha256 if spec.plan.bundle else '?'}`; "
        f"manifests checked against the Kubernetes {KUBERNETES_VERSION} schemas.",
        "",
        "| server | student | device | node selector | memory request / limit |",
        "|---|---|---|---|---|",
    ]
    for s in spec.servers:
        selector = "-" if s.device is None else (f"kubernetes.io/hostname={s.node}" if s.node else f"{NODE_LABEL}={dns_label(s.device)}")
        lines.append(f"| {s.name} | {s.student or '(aggregator)'} | {s.device or '-'} | {selector} | {s.memory_request_mb} / {s.memory_limit_mb} MiB |")
    lines += ["", "```bash"]
    unlabelled = [s for s in spec.students if not s.node]
    if unlabelled:
        lines.append("# each student runs on the node labelled with its device:")
        lines += [f"kubectl label node NODE {NODE_LABEL}={dns_label(s.device or '')}" for s in unlabelled]
    if source == "volume":
        lines.append(f"# the bundle in {o.bundle_path} on every node (hostPath volume)")
    if o.tls != "none":
        lines.append("# one Secret per server with tls.crt, tls.key and ca.crt (the aggregator's certificate also for clientAuth under mtls)")
        lines += [f"kubectl create secret generic {s.name}-tls --from-file=tls.crt --from-file=tls.key --from-file=ca.crt" for s in spec.servers]
    lines += ["kubectl apply -k .", f"kubectl rollout status deployment/{spec.aggregator.name}", "```", ""]
    return "\n".join(lines)

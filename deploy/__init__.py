"""Deployment files for a fleet, generated from a bundle and a plan, for the engines fleets run on.

  nonn.deploy.spec     what every target runs: one `nonn serve` per placed student, the aggregator
  nonn.deploy.k8s      Kubernetes manifests (k3s, KubeEdge) and a kustomization
  nonn.deploy.systemd  systemd units for boards without Kubernetes, with install steps
  nonn.deploy.image    the container recipe of the lean device side (multi-arch)
  nonn.deploy.triton   a Triton model repository serving the whole ensemble on one server

Imports without torch: deployment files are written next to the runtime side.
"""

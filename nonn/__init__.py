"""nonn: compress one teacher CNN into K small students (NoNN) and run them on K edge devices.

Sub-packages:
  nonn.partition  teacher activations -> Filter Activation Network -> communities -> K groups
  nonn.students   model zoo, datasets, teacher training, student ensemble, KD+AT training, export
  nonn.runtime    gRPC device server (Open Inference Protocol), aggregator, bundle manifest
  nonn.devices    device profiles, placement planner, local fleet, simulation, reports
  nonn.deploy     Kubernetes, systemd, container and Triton files from a bundle and a plan

`nonn.runtime`, `nonn.devices` and `nonn.deploy` import without torch.
"""

__version__ = "0.1.0"

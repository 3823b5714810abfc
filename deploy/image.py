"""The container recipe of the lean device side: nonn's core (no torch) and one student per image.

`write_image_context(spec, out)` writes a build context:

    Dockerfile         stages: build (a venv with nonn's core), runtime (that venv on a slim
                       Python, non-root, no bundle), one stage per student (runtime + the manifest
                       + that student's model, its `nonn serve` as CMD), aggregator (+ the head)
    docker-bake.json   every stage for linux/amd64 and linux/arm64, tagged IMAGE:TAG-STAGE
    .dockerignore      only bundle/ and wheels/ go to the builder
    bundle/            the manifest, the students' and the head's models
    wheels/            the nonn wheel to install (given with --wheel, or put there)
    README.md          the build commands

Cache-friendly: the dependency layer comes before any bundle file, so a new bundle rebuilds
only the last, small layer of each image, and every student image shares all other layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nonn import __version__
from nonn.deploy.spec import FleetSpec, ServerSpec
from nonn.deploy.writer import write_tree

__all__ = ["PLATFORMS", "PYTHON_IMAGE", "image_ref", "dockerfile", "bake_file", "write_image_context"]

PLATFORMS = ("linux/amd64", "linux/arm64")
PYTHON_IMAGE = "python:3.12-slim-bookworm"  # multi-arch; onnxruntime and grpcio ship wheels for both
RUN_AS = 65532


def image_tag(spec: FleetSpec, tag: str | None) -> str:
    """The images' tag: given, or the first 12 hex digits of the bundle's manifest sha256."""
    if tag:
        return tag
    assert spec.plan.bundle is not None  # FleetSpec.build checked it
    return spec.plan.bundle.manifest_sha256[:12]


def image_ref(spec: FleetSpec, image: str, tag: str | None, target: str) -> str:
    """IMAGE:TAG-TARGET, the reference a stage is built and pulled as (target: a student, aggregator, runtime)."""
    return f"{image}:{image_tag(spec, tag)}-{target}"


def _stage(server: ServerSpec, bundle_path: str) -> list[str]:
    files = " ".join(f"bundle/{name}" for name in server.files)
    return [
        f"FROM runtime AS {server.student or 'aggregator'}",
        f"COPY --chown=0:0 --chmod=0444 {files} {bundle_path}/",
        f"EXPOSE {server.port}",
        f"CMD {json.dumps(server.args)}",
    ]


def dockerfile(spec: FleetSpec) -> str:
    """The Dockerfile text for `spec`'s bundle."""
    o = spec.options
    lines = [
        "# syntax=docker/dockerfile:1",
        f"# nonn {__version__}: the lean device side (nonn's core without torch) and one model per image.",
        "# Build every image for amd64 and arm64 with: docker buildx bake --push (see docker-bake.json).",
        f"ARG PYTHON_IMAGE={PYTHON_IMAGE}",
        "",
        "FROM ${PYTHON_IMAGE} AS build",
        "ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_COMPILE=1",
        "RUN python -m venv /opt/nonn/venv",
        "COPY wheels/ /tmp/wheels/",
        "# The core only (numpy, onnxruntime, grpcio, tritonclient's stubs): no extras, no torch.",
        "RUN --mount=type=cache,target=/root/.cache/pip \\",
        "    set -e; test -n \"$(ls /tmp/wheels/nonn-*.whl)\" || { echo 'put the nonn wheel in wheels/' >&2; exit 1; }; \\",
        "    /opt/nonn/venv/bin/pip install /tmp/wheels/nonn-*.whl \\",
        "    && /opt/nonn/venv/bin/pip uninstall --yes pip setuptools \\",
        "    && find /opt/nonn/venv -depth -name __pycache__ -type d -exec rm -rf {} +",
        "",
        "FROM ${PYTHON_IMAGE} AS runtime",
        "ENV PATH=/opt/nonn/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
        "COPY --from=build /opt/nonn/venv /opt/nonn/venv",
        f"USER {RUN_AS}:{RUN_AS}",
        'ENTRYPOINT ["nonn"]',
        'CMD ["serve", "--help"]',
        "",
    ]
    for server in spec.servers:
        lines += [*_stage(server, o.bundle_path), ""]
    return "\n".join(lines)


def bake_file(spec: FleetSpec, image: str, tag: str | None) -> dict[str, Any]:
    """docker-bake.json: every stage for PLATFORMS, tagged as the manifests pull them."""
    targets = ["runtime", *(s.student or "aggregator" for s in spec.servers)]
    return {
        "group": {"default": {"targets": targets}},
        "target": {
            t: {"context": ".", "dockerfile": "Dockerfile", "target": t, "platforms": list(PLATFORMS), "tags": [image_ref(spec, image, tag, t)]}
            for t in targets
        },
    }


def write_image_context(spec: FleetSpec, out: str | Path, *, image: str = "nonn-fleet", tag: str | None = None,
                        wheel: str | Path | None = None, overwrite: bool = False) -> list[Path]:  # fmt: skip
    """Write the build context (see the module doc) into `out`, atomically; returns the files."""
    root = spec.bundle.root
    files: dict[str, str | bytes | Path] = {
        "Dockerfile": dockerfile(spec),
        ".dockerignore": "*\n!bundle/\n!wheels/\n",
        "docker-bake.json": json.dumps(bake_file(spec, image, tag), indent=2) + "\n",
        "wheels/.keep": "",
    }
    for name in dict.fromkeys(n for s in spec.servers for n in s.files):
        files[f"bundle/{name}"] = root / name
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file() or not wheel.name.startswith("nonn-") or wheel.suffix != ".whl":
            raise ValueError(f"--wheel {wheel}: expected an existing nonn-*.whl file (pip wheel --no-deps -w wheels .)")
        files[f"wheels/{wheel.name}"] = wheel
    files["README.md"] = "\n".join([
        f"# Images of fleet `{spec.options.fleet}`",
        "",
        "```bash",
        *([] if wheel is not None else ["pip wheel --no-deps -w wheels /path/to/nonn   # the nonn wheel the images install"]),
        "docker buildx create --use          # once: a builder that can build for several platforms",
        "docker buildx bake --push           # every image for " + " and ".join(PLATFORMS),
        "docker buildx bake student_0 --load --set '*.platforms=linux/amd64'   # one image, locally",
        "```",
        "",
        *(f"- `{image_ref(spec, image, tag, s.student or 'aggregator')}`: {s.student or 'the aggregator'}" for s in spec.servers),
        f"- `{image_ref(spec, image, tag, 'runtime')}`: nonn without a bundle (for --bundle-source volume or configmap)",
        "",
    ])  # fmt: skip
    return write_tree(out, files, overwrite=overwrite)

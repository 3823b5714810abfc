"""`nonn deploy`: Kubernetes manifests, systemd units, the container recipe, the Triton repository.

No cluster, no Docker engine and no Triton server here: the manifests are validated against the
Kubernetes schemas, units with `systemd-analyze verify`, the Dockerfile with hadolint, Triton
configs with Triton's own ModelConfig; and the fleet is started locally from the generated
files' own command lines (ports rewritten to loopback) and answers like `nonn simulate`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fleet_testing import make_bundle, tiny_images
from nonn.cli import main
from nonn.deploy.k8s import KUBERNETES_VERSION
from nonn.deploy.triton import ENSEMBLE_NAME, parse_config, verify_model_repository, write_model_repository
from nonn.devices.fleet import health_status
from nonn.devices.plan_file import load_plan
from nonn.runtime.bundle import Bundle
from runtime_testing import free_port, reference_logits

pytestmark = pytest.mark.timeout(240)

DEVICES = "rpi4b,rpi3b+:4"  # five devices for four students: one stays unused


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A four-student bundle, its plan (plan.json) and a labelled test set (.npz) for simulate."""
    root = tmp_path_factory.mktemp("deploy")
    bundle = make_bundle(root / "bundle", feature_sizes=(3, 2, 4, 3), classes=5)
    assert main(["plan", "--bundle", str(bundle.root), "--fleet", DEVICES, "--out", str(root / "plan.json")]) == 0
    x = tiny_images(30, seed=7)
    predicted = reference_logits(bundle, _preprocessed(bundle, x)).argmax(axis=1)
    y = predicted.copy()
    y[::3] = (y[::3] + 1) % 5  # every third label disagrees with the ensemble: accuracy 20/30
    np.savez(root / "data.npz", x=x, y=y, x_test=x, y_test=y)
    return root, bundle, x, y


def _preprocessed(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    return bundle.input_contract.prepare(images)


def _deploy(*args: str) -> None:
    assert main(["deploy", *args]) == 0


# --------------------------------------------------------------------------- Kubernetes


def _yaml_documents(directory: Path) -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(directory.glob("*.yaml"))}


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--bundle-source", "volume", "--tls", "mtls", "--nodes", "pi-a,pi-b,pi-c,pi-d,pi-e", "--namespace", "edge"],
        ["--bundle-source", "configmap", "--tls", "tls", "--aggregator-replicas", "1", "--fleet-name", "second"],
    ],
    ids=["image", "volume-mtls-nodes", "configmap-tls"],
)
def test_k8s_manifests_validate_against_the_kubernetes_schemas(fleet, tmp_path, extra):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    root, bundle, _, _ = fleet
    out = tmp_path / "k8s"
    _deploy("k8s", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out), *extra)
    files = _yaml_documents(out)
    kustomization = files.pop("kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(files)  # every manifest listed, none missing
    kinds = []
    for name, documents in files.items():
        for doc in documents:
            # strict: an unknown or misspelt field fails, as do wrong types and missing required fields
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            kinds.append(doc["kind"])
    plan = load_plan(root / "plan.json")
    deployments = {d["metadata"]["name"]: d for docs in files.values() for d in docs if d["kind"] == "Deployment"}
    fleet_name = extra[extra.index("--fleet-name") + 1] if "--fleet-name" in extra else "nonn"
    for k, student in enumerate(bundle.students):
        pod = deployments[f"{fleet_name}-student-{k}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        device = plan.device(plan.devices_of(student.name)[0])
        # pinned to the device the plan chose, memory from its estimate, the plan's thread count
        if "--nodes" in extra:
            nodes = dict(zip([d.device for d in plan.devices], "pi-a,pi-b,pi-c,pi-d,pi-e".split(",")))
            assert pod["nodeSelector"] == {"kubernetes.io/hostname": nodes[device.device]}
        else:
            assert list(pod["nodeSelector"]) == ["nonn/device"]
        assert container["resources"]["requests"]["memory"] == f"{int(np.ceil(device.memory_mb))}Mi"
        assert int(container["resources"]["limits"]["memory"][:-2]) >= int(np.ceil(device.memory_mb * 1.5)) - 1
        assert container["args"][container["args"].index("--threads") + 1] == str(device.threads)
        assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
        probe = container["livenessProbe"]
        assert ("tcpSocket" in probe) if "--tls" in extra else (probe["grpc"]["port"] == 8001)
    aggregator = deployments[f"{fleet_name}-aggregator"]
    replicas = 1 if "--aggregator-replicas" in extra else 2
    assert aggregator["spec"]["replicas"] == replicas
    args = aggregator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--devices") + 1] == ",".join(f"{fleet_name}-student-{k}:8001" for k in range(4))
    assert kinds.count("Service") == 5 and kinds.count("PodDisruptionBudget") == (replicas > 1)
    assert kinds.count("ConfigMap") == (5 if "configmap" in extra else 0)
    if "--namespace" in extra:
        assert kustomization["namespace"] == "edge"
    if "--tls" in extra:
        assert "--tls-cert" in args and (("--device-tls-cert" in args) == ("mtls" in extra))


def test_k8s_refuses_a_configmap_over_the_limit_and_a_plan_for_another_bundle(fleet, tmp_path, capsys):
    root, bundle, _, _ = fleet
    big = tmp_path / "big"
    shutil.copytree(bundle.root, big)
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["students"][1]["size_bytes"] = 3 * 2**20  # the planner's memory follows the manifest
    with open(big / "student_1.onnx", "ab") as fh:
        fh.write(b"\0" * 2**20)  # a model of more than 1 MiB (its hash no longer matters here)
    (big / "manifest.json").write_text(json.dumps(manifest))
    assert main(["plan", "--bundle", str(big), "--fleet", DEVICES, "--out", str(tmp_path / "big.json")]) == 0
    code = main(["deploy", "k8s", "--bundle", str(big), "--plan", str(tmp_path / "big.json"), "--out", str(tmp_path / "k"), "--bundle-source", "configmap"])
    assert code == 2 and "over a ConfigMap's 1,048,576 B; use --bundle-source image or volume" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
    # The other bundle's plan against this bundle: refused, naming both bundles and their hashes.
    for target in ("k8s", "systemd", "image"):
        code = main(["deploy", target, "--bundle", str(bundle.root), "--plan", str(tmp_path / "big.json"), "--out", str(tmp_path / target)])
        err = capsys.readouterr().err
        assert code == 2 and f"was made for bundle {big} (manifest sha256 " in err and f"not for bundle {bundle.root} (manifest sha256 " in err
        assert not (tmp_path / target).exists()
    # An existing --out is kept unless --overwrite.
    out = tmp_path / "again"
    _deploy("systemd", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out))
    assert main(["deploy", "systemd", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["deploy", "k8s", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out), "--tls", "ssl"])
    assert main(["deploy", "k8s", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(tmp_path / "n"), "--nodes", "a,b"]) == 2
    assert "2 node(s) for the plan's 5 devices" in capsys.readouterr().err


# --------------------------------------------------------------------------- systemd


def test_systemd_units_pass_systemd_analyze_verify(fleet, tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here: the units cannot be verified")
    root, bundle, _, _ = fleet
    nonn_bin = shutil.which("nonn", path=str(Path(sys.executable).parent))
    assert nonn_bin is not None
    for tls in ("none", "mtls"):
        out = tmp_path / tls
        _deploy("systemd", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out), "--tls", tls,
                "--nonn-bin", nonn_bin)  # fmt: skip
        units = sorted(out.glob("*.service"))
        assert len(units) == 5
        result = subprocess.run([tool, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        text = (out / "nonn-student-0.service").read_text()
        assert "DynamicUser=yes" in text and "NoNewPrivileges=yes" in text and "Restart=on-failure" in text
        assert ("LoadCredential=tls.key:/etc/nonn/tls/tls.key" in text) == (tls == "mtls")
        readme = (out / "README.md").read_text()
        assert "systemctl daemon-reload && sudo systemctl enable --now nonn-aggregator.service" in readme
        assert sorted(p.name for p in (out / "bundle").iterdir()) == sorted(["manifest.json", "head.onnx", *(s.file for s in bundle.students)])


# --------------------------------------------------------------------------- container image


def test_image_recipe_lints_and_names_files_of_its_context(fleet, tmp_path):
    root, bundle, _, _ = fleet
    out = tmp_path / "image"
    _deploy("image", "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out), "--image", "registry.local/nonn")
    dockerfile = (out / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert stages == ["build", "runtime", *(s.name for s in bundle.students), "aggregator"]
    for line in dockerfile.splitlines():
        if line.startswith("COPY --chown"):
            for source in line.split()[3:-1]:
                assert (out / source).is_file(), source  # every file a stage copies is in the context
    assert "torch" not in dockerfile.replace("without torch", "").replace("no torch", "")
    bake = json.loads((out / "docker-bake.json").read_text())
    assert set(bake["target"]) == set(stages) - {"build"}
    assert all(t["platforms"] == ["linux/amd64", "linux/arm64"] for t in bake["target"].values())
    sha = load_plan(root / "plan.json").bundle.manifest_sha256
    assert bake["target"]["student_0"]["tags"] == [f"registry.local/nonn:{sha[:12]}-student_0"]
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed here: the Dockerfile was checked for its context only")
    result = subprocess.run([hadolint, "--no-color", str(out / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Triton


def _run_ensemble(repo: Path, images: np.ndarray) -> np.ndarray:
    """Follow the ensemble's steps as Triton's scheduler does, each model in ONNX Runtime."""
    import onnxruntime as ort

    ensemble = parse_config(repo / ENSEMBLE_NAME / "config.pbtxt")
    tensors = {ensemble.input[0].name: images}
    for step in ensemble.ensemble_scheduling.step:
        session = ort.InferenceSession(str(repo / step.model_name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {inner: tensors[outer] for inner, outer in step.input_map.items()}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        tensors.update({outer: outputs[inner] for inner, outer in step.output_map.items()})
    return tensors[ensemble.output[0].name]


def test_triton_repository_serves_the_whole_ensemble(fleet, tmp_path, capsys):
    root, bundle, x, _ = fleet
    repo = tmp_path / "triton"
    _deploy("triton", "--bundle", str(bundle.root), "--out", str(repo))
    models = sorted(p.name for p in repo.iterdir())
    assert models == sorted([*(s.name for s in bundle.students), "features", "head", "ensemble"])
    for name in models:
        config = parse_config(repo / name / "config.pbtxt")  # Triton's own ModelConfig
        assert config.name == name and config.max_batch_size == 64
        if config.platform == "onnxruntime_onnx":
            assert (repo / name / "1" / "model.onnx").is_file() and config.HasField("dynamic_batching")
    assert verify_model_repository(bundle, repo) == []
    images = _preprocessed(bundle, x)
    np.testing.assert_allclose(_run_ensemble(repo, images), reference_logits(bundle, images), rtol=1e-5, atol=1e-5)
    # Drift is found: a student copy that is not the bundle's, a step naming a tensor its model lacks.
    (repo / "student_2" / "1" / "model.onnx").write_bytes(b"x")
    text = (repo / "ensemble" / "config.pbtxt").read_text()
    (repo / "ensemble" / "config.pbtxt").write_text(text.replace('key: "logits"', 'key: "scores"'))
    problems = verify_model_repository(bundle, repo)
    assert any("student_2" in p and "sha256 mismatch" in p for p in problems), problems
    assert any("maps output 'scores', which head does not have" in p for p in problems), problems
    # Batching off on request; a repository written again replaces the old one whole.
    write_model_repository(bundle, repo, max_batch=0, overwrite=True)
    assert parse_config(repo / "student_0" / "config.pbtxt").max_batch_size == 0
    assert not parse_config(repo / "head" / "config.pbtxt").HasField("dynamic_batching")
    assert list(parse_config(repo / "head" / "config.pbtxt").input[0].dims) == [-1, 12]
    np.testing.assert_allclose(_run_ensemble(repo, images), reference_logits(bundle, images), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the fleet from its own files


def _k8s_commands(out: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Deployment name -> its container's command + args; Service name -> port."""
    commands, ports = {}, {}
    for documents in _yaml_documents(out).values():
        for doc in documents:
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                commands[doc["metadata"]["name"]] = [*container["command"], *container["args"]]
            elif doc["kind"] == "Service":
                ports[doc["metadata"]["name"]] = doc["spec"]["ports"][0]["port"]
    return commands, ports


def _systemd_commands(out: Path) -> dict[str, list[str]]:
    """Unit name (without .service) -> its ExecStart= as words (systemd's %% and $$ undone)."""
    commands = {}
    for unit in sorted(out.glob("*.service")):
        line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
        words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line[len("ExecStart="):])]
        commands[unit.stem] = words
    return commands


def _to_loopback(words: list[str], port: int, endpoints: dict[str, str] | None = None) -> list[str]:
    """The same command with its server on 127.0.0.1:port (and --devices names mapped to loopback endpoints)."""
    out = list(words)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    if "--devices" in out and endpoints is not None:
        i = out.index("--devices") + 1
        out[i] = ",".join(endpoints[item] for item in out[i].split(","))
    return out


@contextlib.contextmanager
def _started(commands: dict[str, list[str]], log_dir: Path):
    """Start each command (program `nonn` run as `python -m nonn`); stop them all on exit."""
    procs = {}
    try:
        for name, words in commands.items():
            assert Path(words[0]).name == "nonn", words
            log = open(log_dir / f"{name}.log", "wb")
            procs[name] = (subprocess.Popen([sys.executable, "-m", "nonn", *words[1:]], stdout=log, stderr=subprocess.STDOUT), log)
        yield procs
    finally:
        for proc, log in procs.values():
            proc.terminate()
        for proc, log in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _wait_serving(endpoint: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health_status(endpoint) != "SERVING":
        assert proc.poll() is None, f"{endpoint} exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"{endpoint} not SERVING after {timeout_s:.0f} s: {log.read_text()}"
        time.sleep(0.1)


@pytest.mark.parametrize("target", ["k8s", "systemd"])
def test_fleet_started_from_the_generated_files_answers_like_simulate(fleet, tmp_path, target, capsys):
    """Every command line written into the manifests/units is a real `nonn` invocation that works."""
    import tritonclient.grpc as triton

    from nonn.cli.fleet import run_simulation
    from nonn.devices.simulate import SimulationConfig

    root, bundle, x, y = fleet
    out = tmp_path / target
    # The files name the bundle where the target keeps it; here that is the local bundle directory.
    _deploy(target, "--bundle", str(bundle.root), "--plan", str(root / "plan.json"), "--out", str(out), "--bundle-path", str(bundle.root))
    if target == "k8s":
        commands, service_ports = _k8s_commands(out)
        names = {name: name for name in commands}  # the aggregator calls the Services by name
    else:
        commands = _systemd_commands(out)
        plan = load_plan(root / "plan.json")
        from nonn.deploy.spec import dns_label

        # the aggregator calls the devices' host names (the plan's device names without --nodes)
        names = {f"nonn-student-{k}": dns_label(plan.devices_of(s.name)[0]) for k, s in enumerate(bundle.students)}
        names["nonn-aggregator"] = "nonn-aggregator"
        service_ports = {name: int(words[words.index("--port") + 1]) for name, words in commands.items()}
    assert set(commands) == {*(f"nonn-student-{k}" for k in range(4)), "nonn-aggregator"}
    ports = {name: free_port() for name in commands}
    endpoints = {f"{names[name]}:{service_ports[name]}": f"127.0.0.1:{ports[name]}" for name in commands}
    students = {n: _to_loopback(w, ports[n]) for n, w in commands.items() if n != "nonn-aggregator"}
    aggregator = _to_loopback(commands["nonn-aggregator"], ports["nonn-aggregator"], endpoints)
    logs = tmp_path / "logs"
    logs.mkdir()
    with _started(students, logs) as procs:
        for name, (proc, _) in procs.items():
            _wait_serving(f"127.0.0.1:{ports[name]}", proc, logs / f"{name}.log")
        with _started({"nonn-aggregator": aggregator}, logs) as agg:
            _wait_serving(f"127.0.0.1:{ports['nonn-aggregator']}", agg["nonn-aggregator"][0], logs / "nonn-aggregator.log")
            client = triton.InferenceServerClient(f"127.0.0.1:{ports['nonn-aggregator']}")
            images = _preprocessed(bundle, x)
            tensor = triton.InferInput(bundle.students[0].input.name, list(images.shape), bundle.students[0].input.datatype)
            tensor.set_data_from_numpy(images)
            result = client.infer("ensemble", [tensor])
            client.close()
    logits = result.as_numpy(bundle.head.output.name)
    assert result.get_response().parameters["contributed"].string_param == "1,1,1,1"
    np.testing.assert_allclose(logits, reference_logits(bundle, images), rtol=1e-5, atol=1e-5)
    deployed_accuracy = float(np.mean(logits.argmax(axis=1) == y))

    report = run_simulation(
        bundle.root, DEVICES, str(root / "data.npz"),
        config=SimulationConfig(requests=0, concurrency=2, network="none", progress=False), echo=False,
    )  # fmt: skip
    print(f"{target}: accuracy through the deployed aggregator {deployed_accuracy:.4f}, nonn simulate {report['accuracy']:.4f}")
    assert deployed_accuracy == pytest.approx(20 / 30, abs=1e-12)
    assert report["accuracy"] == pytest.approx(deployed_accuracy, abs=1e-6)  # the report keeps 6 decimals

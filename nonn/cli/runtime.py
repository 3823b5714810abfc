"""`nonn serve` and `nonn infer`: device servers and the aggregator on the Open Inference Protocol.

Neither command needs torch: both run on a device with only numpy, onnxruntime and grpcio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from nonn.cli import CLIError
from nonn.cli.deprecation import add_alias
from nonn.cli.common import DEVICES_METAVAR, add_json_arg, add_transport_arg, emit_json, non_negative_float, non_negative_int, positive_float, positive_int

log = logging.getLogger("nonn.serve")

DEFAULT_PORT = 8001
DEFAULT_MAX_STREAMS = 8  # nonn.runtime.server.DEFAULT_MAX_STREAMS, without importing grpc to build the parser


def _add_aggregator_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, max_batch: bool = True) -> None:
    p.add_argument("--devices", default=None, metavar=DEVICES_METAVAR, help="(required) one host:port per student, in student order, comma-separated "
                   "(with --replicas R: R per student, each student's replicas in a row)")
    p.add_argument("--replicas", type=positive_int, default=1, help="devices serving each student (default: 1); a request "
                   "goes to the healthiest one, and to a second one when the first is slower than usual")
    p.add_argument("--no-hedge", action="store_true", help="with --replicas: never send a request to a second replica "
                   "because the first is slow (failing replicas are still replaced)")
    p.add_argument("--deadline", type=positive_float, default=1.0, help="seconds a device has to answer, retries included (default: 1.0)")
    p.add_argument("--retries", type=non_negative_int, default=2, help="extra attempts when a device is UNAVAILABLE (default: 2)")
    p.add_argument("--strict", action="store_true", help="fail a request when any student is missing, at once while its "
                   "devices are down (default: answer with zeros for that student)")
    add_transport_arg(p)
    if max_batch:
        p.add_argument("--max-batch", type=positive_int, default=64, help="largest batch per request (default: 64)")


def _add_device_tls_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, old_prefix: str | None = None) -> None:
    """--device-tls-*: how this process, as a client, talks TLS to the student devices.

    (--tls-* always describe a server's own endpoint, as in `nonn serve`.)
    """
    p.add_argument("--device-tls-ca", default=None, help="CA certificate (PEM) that the devices' certificates must chain to; turns on TLS")
    p.add_argument("--device-tls-cert", default=None, help="client certificate (PEM) presented to the devices (mutual TLS)")
    p.add_argument("--device-tls-key", default=None, help="private key (PEM) of that client certificate")
    p.add_argument("--device-tls-server-name", default=None, help="name to check in the devices' certificates instead of the host")
    if old_prefix:
        for field in ("ca", "cert", "key", "server-name"):
            add_alias(p, f"--{old_prefix}-{field}", f"--device-tls-{field}", dest=f"device_tls_{field.replace('-', '_')}")


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve",
        help="host one student (or the whole ensemble) over gRPC (Open Inference Protocol)",
        description="Serve one ONNX model on inference.GRPCInferenceService (KServe v2) and "
        "grpc.health.v1. From a bundle, the model's sha256 is checked against the manifest and a "
        "mismatch is refused. With --aggregate, serve the whole ensemble as one model by fanning "
        "each request out to the student devices. Stops gracefully on SIGTERM. A device model runs "
        "in ONNX Runtime's C library (from the onnxruntime wheel; the environment variable "
        "NONN_ORT_LIBRARY names another libonnxruntime.so), without numpy.",
    )
    what = s.add_argument_group("what to serve")
    what.add_argument("--bundle", default=None, help="bundle directory from `nonn export`")
    what.add_argument("--student", default=None, help="student name (student_0) or index, with --bundle")
    what.add_argument("--model", default=None, help="an ONNX file to serve instead of a bundle student")
    what.add_argument("--name", default=None, help="model name to serve under (default: the student's name; 'ensemble' with --aggregate)")
    what.add_argument("--sha256", default=None, help="expected sha256 of --model; a mismatch is refused")
    what.add_argument("--aggregate", action="store_true", help="serve the whole ensemble of --bundle (needs --devices)")
    net = s.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all interfaces)")
    net.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    net.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    net.add_argument("--workers", type=positive_int, default=1, help="requests run by ONNX Runtime at once (default: 1)")
    net.add_argument("--max-batch", type=positive_int, default=64, help="largest batch accepted per request (default: 64)")
    net.add_argument("--max-streams", type=non_negative_int, default=DEFAULT_MAX_STREAMS, help=f"open ModelStreamInfer streams accepted at once, each on its own thread; 0 offers unary ModelInfer only (default: {DEFAULT_MAX_STREAMS})")
    net.add_argument("--grace", type=non_negative_float, default=5.0, help="seconds to finish in-flight requests on SIGTERM (default: 5)")
    net.add_argument("--ready-file", default=None, help="write {host, port, pid, models} as JSON here once serving (removed on exit)")
    net.add_argument("--tls-cert", default=None, help="server certificate (PEM); with --tls-key turns on TLS")
    net.add_argument("--tls-key", default=None, help="server private key (PEM)")
    net.add_argument("--tls-client-ca", default=None, help="CA (PEM) that client certificates must chain to: mutual TLS")
    agg = s.add_argument_group("ensemble (--aggregate)")
    _add_aggregator_args(agg, max_batch=False)
    agg.add_argument("--coalesce", type=positive_int, default=1, help="merge requests that queue up under load into one device call of up to N images (default: 1, off)")
    _add_device_tls_args(agg)
    s.set_defaults(func=_serve)

    i = subparsers.add_parser(
        "infer",
        help="classify images with the student devices and the head",
        description="Send images to the K student devices concurrently, concatenate their "
        "feature vectors and apply the bundle's head locally. A device that does not answer "
        "contributes zeros (unless --strict); the report says which devices contributed.",
    )
    i.add_argument("--bundle", required=True, help="bundle directory from `nonn export` (head, input contract, students)")
    i.add_argument("--input", required=True,
                   help=".npy of images (N,C,H,W / N,H,W,C / N,H,W; uint8 or floats in [0,1]), .npz with x (and y), or a "
                        "folder of images (one subfolder per class, named as the bundle's classes, gives labels); images "
                        "are prepared as the bundle's input contract says")
    i.add_argument("--labels", default=None, help=".npy of integer labels, to report accuracy")
    i.add_argument("--preprocessed", action="store_true",
                   help="the .npy/.npz input is already what the students take (normalised floats for a bundle exported "
                        "with --input-type fp32), so the input contract is not applied")
    i.add_argument("--batch-size", type=positive_int, default=32, help="images per request (default: 32)")
    add_json_arg(i, "result")
    _add_aggregator_args(i)
    _add_device_tls_args(i, old_prefix="tls")
    i.set_defaults(func=_infer)


def _client_tls(args: argparse.Namespace, prefix: str):
    from nonn.runtime.tls import ClientTLS

    ca, cert, key, name = (getattr(args, f"{prefix}_{f}") for f in ("ca", "cert", "key", "server_name"))
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        flag = prefix.replace("_", "-")
        raise CLIError(f"--{flag}-cert and --{flag}-key go together (got only one)")
    return ClientTLS(
        ca=Path(ca) if ca else None, cert=Path(cert) if cert else None, key=Path(key) if key else None, server_name=name
    )


def _serve(args: argparse.Namespace) -> int:
    from nonn.runtime.backends import OnnxBackend
    from nonn.runtime.model_loading import load_model, student_backend
    from nonn.runtime.server import serve_backends
    from nonn.runtime.tls import ServerTLS

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    tls = ServerTLS.from_args(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.aggregate:
        from nonn.runtime.aggregator import Aggregator, DeviceMismatchError
        from nonn.runtime.ensemble_backend import AggregatorBackend

        if args.bundle is None or args.devices is None:
            raise CLIError("--aggregate needs --bundle and --devices host:port,...")
        if args.model or args.student is not None:
            raise CLIError("--aggregate serves the whole bundle: drop --model/--student")
        aggregator = Aggregator(
            args.bundle,
            args.devices,
            deadline_s=args.deadline,
            retries=args.retries,
            strict=args.strict,
            tls=_client_tls(args, "device_tls"),
            max_batch=args.max_batch,
            head_threads=args.threads,
            coalesce=args.coalesce,
            transport=args.transport,
            replicas=args.replicas,
            hedge=not args.no_hedge,
        )
        backend = AggregatorBackend(aggregator, name=args.name or "ensemble")
        try:
            for warning in aggregator.verify_devices_sync():
                log.warning("%s", warning)
        except DeviceMismatchError as exc:
            backend.close()
            raise CLIError(f"a device serves another model than the bundle names: {exc}") from None
    elif args.bundle is not None:
        if args.model is not None:
            raise CLIError("give either --bundle with --student, or --model with --name, not both")
        if args.student is None:
            raise CLIError("--bundle needs --student NAME_OR_INDEX (e.g. --student student_0), or --aggregate")
        backend = student_backend(
            args.bundle, args.student, threads=args.threads, max_batch=args.max_batch, workers=args.workers
        )
        if args.name:
            backend.name = args.name
    elif args.model is not None:
        if not args.name:
            raise CLIError("--model needs --name (the model name clients ask for)")
        model = load_model(args.model, threads=args.threads, expected_sha256=args.sha256)
        backend = OnnxBackend(model, args.name, max_batch=args.max_batch, workers=args.workers)
    else:
        raise CLIError("nothing to serve: give --bundle DIR --student K, --model FILE --name NAME, or --bundle DIR --aggregate --devices ...")
    serve_backends(
        backend, host=args.host, port=args.port, tls=tls, grace_s=args.grace, ready_file=args.ready_file,
        max_streams=args.max_streams,
    )  # fmt: skip
    return 0


def _load_images(path: str, class_names: list[str]):
    """(images, labels): an array from .npy/.npz, or the list of files of an image folder."""
    import numpy as np

    file = Path(path)
    if file.is_dir():
        from nonn.students.image_folder import images_to_classify

        return images_to_classify(file, class_names)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: input file not found")
    try:
        data = np.load(file, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{file}: not a numpy .npy/.npz file without pickled objects ({exc})") from exc
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if "x" not in data.files:
                raise ValueError(f"{file}: an .npz input needs an array named x (found {data.files})")
            return data["x"], data["y"] if "y" in data.files else None
    return data, None


def _infer(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from nonn.runtime.aggregator import AggregationError, Aggregator, DeviceMismatchError
    from nonn.runtime.bundle import Bundle
    from nonn.runtime.traffic import BytesPerInference, describe

    if args.devices is None:
        raise CLIError("--devices host:port,... is required (one per student, in student order; R per student with --replicas R)")
    if args.batch_size > args.max_batch:
        raise CLIError(f"--batch-size must be in 1..{args.max_batch} (--max-batch), got {args.batch_size}")
    bundle = Bundle.load(args.bundle)
    contract = bundle.input_contract
    images, labels = _load_images(args.input, bundle.class_names)
    if args.labels is not None:
        labels = np.load(args.labels, allow_pickle=False)
    from_files = isinstance(images, list)
    if from_files and args.preprocessed:
        raise CLIError("--preprocessed is for .npy/.npz input; images read from files are prepared by the input contract")

    def batch_of(start: int) -> Any:
        """One request's images, as the students take them (a folder is decoded batch by batch)."""
        chunk = images[start : start + args.batch_size]
        if from_files:
            from nonn.students.image_folder import read_images

            chunk = read_images(chunk, contract.input_shape)
        return np.ascontiguousarray(chunk) if args.preprocessed else contract.prepare(chunk)

    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")

    per_device = bundle.num_students * args.replicas
    predictions: list[int] = []
    answered = np.zeros(per_device, dtype=np.int64)  # images each device's features went into
    skipped = np.zeros(per_device, dtype=np.int64)  # batches a device was skipped for (down)
    sent = np.zeros(per_device, dtype=np.int64)
    received = np.zeros(per_device, dtype=np.int64)
    latencies: list[float] = []
    degraded_batches = 0
    errors: dict[str, str] = {}
    with Aggregator(
        bundle, args.devices, deadline_s=args.deadline, retries=args.retries, strict=args.strict,
        tls=_client_tls(args, "device_tls"), max_batch=args.max_batch, transport=args.transport,
        replicas=args.replicas, hedge=not args.no_hedge,
    ) as aggregator:  # fmt: skip
        try:
            for warning in aggregator.verify_devices_sync():
                print(f"nonn infer: warning: {warning}", file=sys.stderr)
        except DeviceMismatchError as exc:
            raise CLIError(f"a device serves another model than the bundle names: {exc}") from None
        started = time.monotonic()
        starts = range(0, len(images), args.batch_size)
        for start in tqdm(starts, desc="infer", unit="batch", disable=args.json == "-" or len(starts) < 2, file=sys.stderr):
            try:
                result = aggregator.infer_sync(batch_of(start))
            except AggregationError as exc:
                raise CLIError(str(exc)) from None
            predictions.extend(int(p) for p in result.predictions)
            n = len(result.logits)
            for d in result.answered_by:
                if d is not None:
                    answered[d] += n
            skipped += np.asarray(result.skipped, dtype=np.int64)
            sent += result.bytes_sent
            received += result.bytes_received
            latencies.append(result.latency_s)
            degraded_batches += result.degraded
            for endpoint, error in zip(result.devices, result.errors):
                if error:
                    errors[endpoint] = error
        endpoints = aggregator.endpoints
        transports = aggregator.transports
        events = [e.to_dict(since=started) for e in aggregator.health_events]
    n_images = len(predictions)
    report = {
        "images": n_images,
        "predictions": predictions,
        "labels": [bundle.class_names[p] for p in predictions],
        "accuracy": float(np.mean(np.asarray(predictions) == labels)) if labels is not None else None,
        "degraded_batches": degraded_batches,
        "batches": len(latencies),
        "latency_ms_p50": float(np.percentile(latencies, 50) * 1e3) if latencies else None,
        "devices": [
            {
                "student": bundle.students[d // args.replicas].name,
                "endpoint": endpoint,
                "transport": transports[d],
                "contributed_images": int(answered[d]),
                "skipped_batches": int(skipped[d]),
                "bytes_per_inference": BytesPerInference.measured(sent[d], received[d], n_images).to_dict(),
                "last_error": errors.get(endpoint),
            }
            for d, endpoint in enumerate(endpoints)
        ],
        "device_events": events,
    }
    if args.json:
        emit_json(args.json, report)
        if args.json == "-":
            return 0
    shown = min(n_images, 20)
    for index in range(shown):
        line = f"{index:5d}  {report['labels'][index]}"
        if labels is not None:
            line += f"  (label {bundle.class_names[int(labels[index])]})"
        print(line)
    if shown < n_images:
        print(f"  ... {n_images - shown} more")
    print(f"{n_images} images in {len(latencies)} batches, p50 batch latency {report['latency_ms_p50']:.2f} ms")
    if report["accuracy"] is not None:
        print(f"accuracy {report['accuracy'] * 100:.2f}%")
    if degraded_batches:
        print(f"degraded: {degraded_batches} of {len(latencies)} batches missed at least one device")
    for d in report["devices"]:
        status = f"{d['contributed_images']}/{n_images} images" + (f", skipped for {d['skipped_batches']} batches while down" if d["skipped_batches"] else "")
        print(
            f"  {d['student']} @ {d['endpoint']} ({d['transport']}): {status}; {describe(d['bytes_per_inference'])}"
            + (f"; last error: {d['last_error']}" if d["last_error"] else "")
        )
    for e in report["device_events"]:
        print(f"  t={e['t']:.2f} s: {e['device']} {e['state']} ({e['reason']})")
    return 0

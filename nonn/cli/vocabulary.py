"""One vocabulary of flags: each long option means one thing, with one metavar, in every command.

`build_parser` applies the metavars below to every sub-command, so a flag reads the same in all
`--help` texts; tests/test_flag_vocabulary.py walks every parser and fails on a flag that is not
listed here, or that one command takes as a switch and another as a value, or with values of
another kind, and prints the list.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Flag:
    """A long option's one meaning; `metavar` is None for switches and for flags with choices."""

    meaning: str
    metavar: str | None = None


FILE, DIR, N = "FILE", "DIR", "N"

VOCABULARY: dict[str, Flag] = {
    # data and models
    "--dataset": Flag("data set: a name (digits, mnist, fashion-mnist, cifar10, cifar100), an .npz file or an image folder", "DATASET"),
    "--data-dir": Flag("directory holding a named data set's files", DIR),
    "--split": Flag("which split of the data set to use"),
    "--image-size": Flag("resize every image to H x W pixels", "H[,W]"),
    "--normalize": Flag("the teacher's input contract: auto, dataset, none, imagenet or MEAN,..:STD,..", "MODE"),
    "--data-workers": Flag("processes decoding image-folder batches while the model runs", N),
    "--limit": Flag("use only the first N images", N),
    "--eval-limit": Flag("evaluate on only the first N test images", N),
    "--batch-size": Flag("images per batch or request", N),
    "--arch": Flag("model architecture from nonn's registry (name, options after ':', comma list per student)", "ARCH"),
    "--width": Flag("base width of a zoo model", N),
    "--dropout": Flag("dropout probability inside a zoo model", "P"),
    "--teacher": Flag("a nonn teacher checkpoint (nonn.teacher/1)", FILE),
    "--teacher-factory": Flag("bring your own teacher: package.module:function returning an nn.Module", "MODULE:FUNCTION"),
    "--weights": Flag("weights for --teacher-factory (state_dict or nonn checkpoint)", FILE),
    "--layer": Flag("the teacher module whose output is the final feature map", "MODULE"),
    "--teacher-predictions": Flag(".npy of the teacher's classes or logits for the streamed images", FILE),
    "--students": Flag("a students checkpoint (nonn.students/1)", FILE),
    "--num-students": Flag("number of students K", "K"),
    "-K": Flag("number of students K (short for --num-students)", "K"),
    "--partition": Flag("partition.json (nonn.partition/1)", FILE),
    "--force": Flag("use a partition made for another teacher"),
    "--bundle": Flag("a deployment bundle directory from `nonn export`", DIR),
    "--plan": Flag("plan.json from `nonn plan --out`", FILE),
    "--fan": Flag("a FAN .npy (filters x filters)", FILE),
    "--activations": Flag("(images x filters) activations .npy", FILE),
    # training
    "--epochs": Flag("epochs to train", N),
    "--teacher-epochs": Flag("epochs to train the teacher", N),
    "--student-epochs": Flag("epochs to train the students", N),
    "--lr": Flag("initial SGD learning rate", "LR"),
    "--momentum": Flag("SGD momentum", "M"),
    "--weight-decay": Flag("L2 weight decay", "WD"),
    "--nesterov": Flag("Nesterov momentum on"),
    "--no-nesterov": Flag("Nesterov momentum off"),
    "--schedule": Flag("learning-rate schedule"),
    "--step-size": Flag("StepLR step in epochs", N),
    "--gamma": Flag("StepLR factor", "FACTOR"),
    "--alpha": Flag("KD weight alpha", "ALPHA"),
    "--temperature": Flag("KD temperature T", "T"),
    "--kd-scale": Flag("extra factor on the KD term", "SCALE"),
    "--at": Flag("activation-transfer variant"),
    "--beta": Flag("activation-transfer weight", "BETA"),
    "--student-dropout": Flag("probability of zeroing a student's vector per training image", "P"),
    "--baseline": Flag("train an ablation instead of NoNN"),
    "--seed": Flag("random seed", "SEED"),
    "--device": Flag("torch device for training or evaluation: cpu, cuda, cuda:N or auto", "DEVICE"),
    "--precision": Flag("numeric precision of training"),
    "--sync-bn": Flag("BatchNorm statistics over the whole global batch under torchrun"),
    "--threads": Flag("CPU threads of the compute engine (torch or ONNX Runtime)", N),
    "--resume": Flag("continue the run saved in --out"),
    "--overwrite": Flag("replace an existing --out instead of refusing"),
    "--reuse": Flag("keep artifacts already in --out and run only the missing stages"),
    # partition
    "--top-k": Flag("filters kept per image in the FAN", N),
    "--strategy": Flag("partition strategy"),
    "--resolution": Flag("Louvain resolution", "GAMMA"),
    "--percentile": Flag("keep FAN edges at or above this percentile of the non-zero weights", "PCT"),
    "--tolerance": Flag("allowed deviation of group sizes from C/K", "FRACTION"),
    "--fan-out": Flag("where to save the computed FAN", FILE),
    "--activations-out": Flag("also save the activations here", FILE),
    "--plot": Flag("also draw a figure to this PNG", "PNG"),
    # outputs
    "--out": Flag("where the command writes its artifact (file or directory, as the command says)", "PATH"),
    "--metrics": Flag("JSON-lines file with one record per training epoch", FILE),
    "--json": Flag("the command's result as JSON: to FILE, or on stdout instead of the text when FILE is left out", FILE),
    "--report": Flag("the HTML report with plots", FILE),
    "--log-dir": Flag("keep the device servers' logs in this directory", DIR),
    "--no-progress": Flag("no progress bar"),
    "--pairs": Flag("also report each pair of students missing"),
    "--no-pairs": Flag("do not report pairs of students missing"),
    # export and bundles
    "--quantize": Flag("quantization of the students"),
    "--opset": Flag("ONNX opset", N),
    "--input-type": Flag("what the exported students take: raw uint8 pixels or normalised fp32"),
    "--out-of-range": Flag("what a bundle does with float pixels outside [0, 1]"),
    "--calibration-images": Flag("training images for int8 calibration", N),
    "--parity-images": Flag("test images for the ONNX Runtime vs PyTorch parity check", N),
    "--eval-images": Flag("test images for the accuracy report", N),
    "--no-run": Flag("check hashes and schema only, without loading the models"),
    # devices: profiles (placement) and servers (endpoints)
    "--fleet": Flag("the devices to place students on, as device profile names", "PROFILE[:COUNT],..."),
    "--profiles": Flag("extra or overriding device profiles (nonn.devices/1 JSON)", FILE),
    "--aggregator": Flag("device profile of the node that runs the head", "PROFILE"),
    "--runtime-mb": Flag("memory of the serving runtime itself, MB", "MB"),
    "--replicas": Flag("devices serving each student", "R"),
    "--devices": Flag("running student servers: one host:port per student (R per student with --replicas)", "HOST:PORT,..."),
    "--no-hedge": Flag("never send a request to a second replica because the first is slow"),
    "--deadline": Flag("seconds a device has to answer, retries included", "SECONDS"),
    "--retries": Flag("extra attempts when a device is UNAVAILABLE", N),
    "--strict": Flag("a request fails when any student is missing, instead of a degraded answer"),
    "--transport": Flag("how the aggregator calls the devices"),
    "--max-batch": Flag("largest batch a server accepts per request", N),
    "--coalesce": Flag("merge queued requests into one device call of up to N images", N),
    "--device-tls-ca": Flag("CA (PEM) that the devices' certificates must chain to; turns on TLS to the devices", FILE),
    "--device-tls-cert": Flag("client certificate (PEM) presented to the devices (mutual TLS)", FILE),
    "--device-tls-key": Flag("private key (PEM) of that client certificate", FILE),
    "--device-tls-server-name": Flag("name to check in the devices' certificates instead of the host", "NAME"),
    # serving
    "--student": Flag("a bundle's student, by name or index", "STUDENT"),
    "--model": Flag("an ONNX file to serve instead of a bundle student", FILE),
    "--name": Flag("model name to serve under", "NAME"),
    "--sha256": Flag("expected sha256 of --model", "HEX"),
    "--aggregate": Flag("serve the whole ensemble by fanning out to the student devices"),
    "--host": Flag("address to bind", "ADDRESS"),
    "--port": Flag("the students' (servers') gRPC port", "PORT"),
    "--workers": Flag("requests run by ONNX Runtime at once", N),
    "--max-streams": Flag("open ModelStreamInfer streams accepted at once", N),
    "--grace": Flag("seconds to finish in-flight requests on SIGTERM", "SECONDS"),
    "--ready-file": Flag("write {host, port, pid, models} as JSON here once serving", FILE),
    "--tls-cert": Flag("this server's certificate (PEM)", FILE),
    "--tls-key": Flag("this server's private key (PEM)", FILE),
    "--tls-client-ca": Flag("CA (PEM) that clients' certificates must chain to: mutual TLS", FILE),
    # inference and simulation
    "--input": Flag("images to classify: .npy, .npz or an image folder", "PATH"),
    "--labels": Flag(".npy of integer labels, to report accuracy", FILE),
    "--preprocessed": Flag("the input is already normalised"),
    "--requests": Flag("requests to send", N),
    "--concurrency": Flag("requests in flight at once", N),
    "--rate": Flag("requests per second (open loop)", "RPS"),
    "--duration": Flag("stream for at least this many seconds", "SECONDS"),
    "--kill": Flag("kill a device during the stream, optionally restarting it", "DEVICE@SECONDS[:RESTART]"),
    "--slow": Flag("slow a device down by FACTOR from SECONDS on", "DEVICE@SECONDS:FACTOR"),
    "--compare-all-up": Flag("first run the same stream with every device up"),
    "--recovery": Flag("seconds to keep streaming after the last fault event", "SECONDS"),
    "--until-faults-end": Flag("stream until every fault has played out instead of exactly --requests"),
    "--network": Flag("network emulation"),
    "--startup-timeout": Flag("seconds each device has to report SERVING", "SECONDS"),
    "--no-fault": Flag("do not kill a device during the simulation"),
    # deployment
    "--fleet-name": Flag("name prefix of every generated object or unit", "NAME"),
    "--bundle-path": Flag("where the bundle is on a device or in a container", "PATH"),
    "--aggregator-port": Flag("the aggregator's gRPC port", "PORT"),
    "--memory-headroom": Flag("memory limit = the plan's estimate x this", "FACTOR"),
    "--tls": Flag("TLS mode of a generated fleet"),
    "--image": Flag("container image repository", "REPOSITORY"),
    "--tag": Flag("container image tag prefix", "TAG"),
    "--nodes": Flag("where the plan's devices are: node or host names, one per device in plan order", "NODE,..."),
    "--bundle-source": Flag("how the bundle reaches the pods"),
    "--aggregator-replicas": Flag("aggregator pods", N),
    "--namespace": Flag("Kubernetes namespace", "NAMESPACE"),
    "--nonn-bin": Flag("absolute path of `nonn` on the hosts", "PATH"),
    "--wheel": Flag("the nonn wheel to install in the images", FILE),
    # global
    "--version": Flag("print the version"),
    "--verbose": Flag("log debug messages"),
}


def visible_options(parser: argparse.ArgumentParser, command: str = "") -> Iterator[tuple[str, argparse.Action, str]]:
    """(command, action, option) for every option shown in --help, through all sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from visible_options(sub, f"{command} {name}".strip())
        elif action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            for option in action.option_strings:
                if option != "-v":
                    yield command, action, option


def apply_vocabulary(parser: argparse.ArgumentParser) -> None:
    """Give every value flag the vocabulary's metavar, so each reads the same in every command.

    A metavar written in a command's own code must be the vocabulary's: a command cannot give a
    flag another reading.
    """
    for command, action, option in visible_options(parser):
        flag = VOCABULARY.get(option)
        if flag is None or flag.metavar is None or action.nargs == 0 or action.choices:
            continue
        if action.metavar is not None and action.metavar != flag.metavar:
            raise ValueError(f"nonn {command} {option} {action.metavar}: the flag vocabulary says {option} {flag.metavar}")
        action.metavar = flag.metavar


def format_vocabulary() -> str:
    """The flag list: option, metavar, meaning."""
    usage = {option: f"{option} {flag.metavar}" if flag.metavar else option for option, flag in VOCABULARY.items()}
    width = max(map(len, usage.values()))
    return "\n".join(f"{usage[option]:{width}}  {flag.meaning}" for option, flag in sorted(VOCABULARY.items()))

"""Joint training of the K NoNN students: KD + activation transfer, student dropout, DDP, resume.

`train_students(StudentsConfig(...))` trains the "unified student model" of NONN.md section 3
with one optimizer: the frozen teacher's logits (KD) and its final-layer feature map (captured
by a forward hook on the teacher's feature layer) supervise the K students, each through the
teacher channels of its own filter group. Each epoch ends with an evaluation on the test split
(ensemble accuracy and accuracy with each student zeroed), one JSON line of metrics and an
atomic checkpoint ("format": "nonn.students/1"); `resume=True` continues a stopped run so that
it ends exactly where an uninterrupted run would have (CPU, same seed).

Under `torchrun --nproc_per_node N` the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on GPU); every rank draws the same global batch (same seeded loader) and takes its
own interleaved slice of it, as a DistributedSampler would, and only rank 0 evaluates, logs
and writes. BatchNorm statistics are per rank unless `sync_bn` (see nonn.students.distributed).

On CUDA the run trains in the precision its device does best (nonn.students.precision), with
cuDNN autotuning; a resumed run restores every rank's random streams but is not bit-exact there,
since cuDNN's kernels do not sum in a fixed order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nonn.artifacts import ArtifactError, atomic_write_jsonl
from nonn.runtime.input_contract import InputContract
from nonn.students.checkpoint import cpu_state_dict, load_checkpoint, save_checkpoint, saved_config
from nonn.students.ensemble import (
    StudentEnsemble,
    StudentSpec,
    build_ensemble,
    ensemble_from_specs,
    sample_presence,
)
from nonn.students.evaluate import evaluate_ensemble, student_name
from nonn.students.layout import to_layout, training_memory_format
from nonn.students.distributed import (
    DistInfo,
    all_reduce_sums,
    gather_objects,
    join_process_group,
    leave_process_group,
    shard,
    sync_batchnorm,
)
from nonn.students.losses import KDLoss, make_transfer_loss
from nonn.students.precision import PRECISIONS, Precision, synchronize
from nonn.students.teacher import resolve_device
from nonn.students.train_setup import TrainSetup, prepare

__all__ = [
    "FORMAT",
    "BASELINES",
    "StudentsConfig",
    "LoadedStudents",
    "train_students",
    "load_students",
    "resolve_device",
]

FORMAT = "nonn.students/1"
BASELINES = ("single-kd", "random-partition", "no-at")
AT_FORMS = ("pooled", "spatial", "none")
SCHEDULES = ("cosine", "step")

log = logging.getLogger(__name__)

# Settings that only say where or how to run; everything else must match to resume a run.
# The data set and input normalisation are compared as resolved (spec, shape, contract), not as flags.
_RUN_ONLY_FIELDS = {
    "out", "resume", "overwrite", "progress", "device", "precision", "sync_bn", "metrics", "teacher",
    "teacher_factory", "weights", "partition", "dataset", "data_dir", "image_size", "normalize", "force",
    "workers", "epochs",
}  # fmt: skip


@dataclass
class StudentsConfig:
    """Everything that defines a students training run (saved in the checkpoint)."""

    partition: str  # partition.json
    out: str  # students checkpoint to write
    teacher: str | None = None  # nonn teacher checkpoint, or
    teacher_factory: str | None = None  # "package.module:function" ...
    weights: str | None = None  # ... with this state_dict / checkpoint
    layer: str | None = None  # teacher feature layer (default: the partition's)
    dataset: str | None = None  # default: the data set the partition (or teacher checkpoint) records
    data_dir: str | None = None
    image_size: list[int] | None = None  # (H, W) every image is resized to
    normalize: str | None = None  # --normalize; default: the teacher checkpoint's or partition's record, else auto
    force: bool = False  # use a partition made for another teacher
    arch: str = "wrn-16-1"  # one spec for all students or a comma list, e.g. "wrn-10-1:width=8"
    num_students: int | None = None  # if given, must equal the partition's K
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine over all epochs, or step (StepLR(step_size, gamma))
    step_size: int = 20
    gamma: float = 0.2
    alpha: float = 0.9  # KD weight
    temperature: float = 4.0
    kd_scale: float = 1.0  # 2.0 = the prototype's 2 * alpha * T^2 weighting of the KL term
    at: str = "pooled"  # activation transfer: pooled, spatial, none
    beta: float | None = None  # default: 1e4 pooled, 1e3 spatial
    student_dropout: float = 0.0  # per-sample probability of zeroing a student's vector
    baseline: str | None = None  # single-kd, random-partition, no-at
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images
    eval_limit: int | None = None  # evaluate on the first N test images
    device: str = "auto"
    precision: str = "auto"  # fp32, bf16, fp16 or auto (by the device: see nonn.students.precision)
    sync_bn: bool = False  # SyncBatchNorm across DDP ranks (CUDA only)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    metrics: str | None = None  # JSON-lines log (default: <out>.metrics.jsonl)
    workers: int = 0  # processes decoding image-folder batches

    def validate(self) -> None:
        """Reject settings that cannot work, naming the bad value."""
        if self.teacher is None and self.teacher_factory is None:
            raise ValueError("a teacher is needed: give --teacher teacher.pt or --teacher-factory MODULE:FUNCTION --weights FILE")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch size must be >= 2 (BatchNorm), got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.precision in PRECISIONS, f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}"),
            (self.at in AT_FORMS, f"activation transfer {self.at!r}: expected one of {', '.join(AT_FORMS)}"),
            (self.beta is None or self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (0.0 <= self.student_dropout < 1.0, f"student dropout must lie in [0, 1), got {self.student_dropout}"),
            (self.baseline is None or self.baseline in BASELINES, f"baseline {self.baseline!r}: expected one of {', '.join(BASELINES)}"),
            (self.num_students is None or self.num_students >= 1, f"number of students must be >= 1, got {self.num_students}"),
            (self.train_limit is None or self.train_limit >= 2, f"train limit must be >= 2 images, got {self.train_limit}"),
            (self.eval_limit is None or self.eval_limit >= 1, f"eval limit must be >= 1 image, got {self.eval_limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        KDLoss(self.alpha, self.temperature, self.kd_scale)  # validates alpha, T, scale

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics) if self.metrics else Path(str(self.out) + ".metrics.jsonl")

    @property
    def effective_at(self) -> str:
        return "none" if self.baseline in ("single-kd", "no-at") else self.at


@dataclass
class LoadedStudents:
    """A students checkpoint, rebuilt: the ensemble (eval mode) and everything else it recorded."""

    ensemble: StudentEnsemble
    meta: dict[str, Any]  # the checkpoint without weights/optimizer state

    @property
    def groups(self) -> list[list[int]]:
        return self.ensemble.groups

    @property
    def contract(self) -> InputContract:
        """How the students' (and teacher's) images were normalised in training."""
        if self.meta.get("input_contract") is not None:
            return InputContract.from_dict(self.meta["input_contract"], "students checkpoint")
        return InputContract.from_dataset_meta(self.meta.get("dataset") or {}, "students checkpoint")


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _config_dict(config: StudentsConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_resume_settings(saved: dict[str, Any], config: StudentsConfig, setup: TrainSetup, path: Path) -> None:
    """A resumed run must have the same training settings, teacher and groups as the saved one."""
    current = _config_dict(config)
    saved_cfg = saved_config(StudentsConfig, saved.get("config"))
    diffs = [
        f"{key}: saved {saved_cfg.get(key)!r}, now {current[key]!r}"
        for key in sorted(current)
        if key not in _RUN_ONLY_FIELDS and saved_cfg.get(key) != current[key]
    ]
    if saved_cfg.get("epochs") != config.epochs and (config.schedule == "cosine" or config.epochs < int(saved.get("epoch", 0))):
        diffs.append(f"epochs: saved {saved_cfg.get('epochs')!r}, now {config.epochs!r}")
    if (saved.get("teacher") or {}).get("fingerprint") != setup.teacher_meta["fingerprint"]:
        diffs.append("teacher: the weights differ from the ones this run started with")
    if saved.get("groups") != setup.groups:
        diffs.append("partition: the filter groups differ")
    saved_data, now_data = saved.get("dataset") or {}, setup.data.meta()
    for key in ("input_shape", "num_classes"):
        if key in saved_data and saved_data[key] != now_data[key]:
            diffs.append(f"data set {key}: saved {saved_data[key]!r}, now {now_data[key]!r}")
    saved_spec, now_spec = saved_data.get("spec") or {}, now_data.get("spec") or {}
    for key in ("dataset", "image_size"):
        if key in saved_spec and saved_spec[key] != now_spec.get(key):
            diffs.append(f"data set: saved {saved_spec[key]!r}, now {now_spec.get(key)!r}")
    if saved.get("input_contract") and not InputContract.from_dict(saved["input_contract"], str(path)).same_normalization(setup.contract):
        diffs.append(f"input normalisation: saved {saved['input_contract'].get('normalize')!r}, now {setup.contract.describe()}")
    if diffs:
        raise ValueError(f"cannot resume {path} with different settings ({'; '.join(diffs)}); use another --out to start anew")


def _load_raw(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    return load_checkpoint(path, FORMAT, map_location=map_location)


def load_students(path: str | os.PathLike[str], map_location: Any = "cpu") -> LoadedStudents:
    """Rebuild the ensemble from a students checkpoint (eval mode, on map_location)."""
    raw = _load_raw(path, map_location)
    try:
        specs = [StudentSpec.from_dict(s["spec"]) for s in raw["students"]]
        groups = [list(map(int, g)) for g in raw["groups"]]
        num_classes = int(raw["dataset"]["num_classes"])
        ensemble = ensemble_from_specs(specs, groups, num_classes)
        for student, entry in zip(ensemble.students, raw["students"]):
            student.load_state_dict(entry["state_dict"])
        ensemble.head.load_state_dict(raw["head"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: students checkpoint is malformed ({exc})") from exc
    meta = {k: v for k, v in raw.items() if k not in ("students", "head", "optimizer", "scheduler", "scaler", "rng")}
    meta["students"] = [{k: v for k, v in s.items() if k != "state_dict"} for s in raw["students"]]
    if isinstance(map_location, (str, torch.device)):
        ensemble = ensemble.to(map_location)
    return LoadedStudents(ensemble.eval(), meta)


def _rng_state(loader: Any, dropout_gen: torch.Generator, cuda_states: list[Tensor] | None) -> dict[str, Any]:
    state = {"loader": loader.state_dict(), "dropout": dropout_gen.get_state(), "torch": torch.get_rng_state()}
    if cuda_states is not None:
        state["cuda_per_rank"] = cuda_states
    return state


def _cuda_rng_states(device: torch.device, info: DistInfo) -> list[Tensor] | None:
    """Every rank's CUDA random state, in rank order (a collective: all ranks call it); None on CPU."""
    return gather_objects(torch.cuda.get_rng_state(device), info) if device.type == "cuda" else None


def _restore_rng(state: dict[str, Any], loader: Any, dropout_gen: torch.Generator, device: torch.device, info: DistInfo) -> None:
    loader.load_state_dict(state["loader"])
    dropout_gen.set_state(state["dropout"])
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    per_rank = state.get("cuda_per_rank")
    if per_rank is not None and len(per_rank) == info.world:
        torch.cuda.set_rng_state(per_rank[info.rank], device)
    else:
        saved = "no" if per_rank is None else f"{len(per_rank)} rank(s)'"
        log.warning("the checkpoint holds %s CUDA random state for this run's %d rank(s): CUDA random streams start afresh",
                    saved, info.world)


# ----------------------------------------------------------------------------------------------
# Training


class _TrainForward(nn.Module):
    """The ensemble's training forward as a module's forward, so DDP can wrap it."""

    def __init__(self, ensemble: StudentEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: Tensor, present: Tensor | None, need_maps: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        out = self.ensemble.forward_train(x, present, need_maps)
        return out.logits, out.pooled, out.maps


def _make_scheduler(config: StudentsConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)


def _progress(iterable: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=len(iterable), leave=False, dynamic_ncols=True)


def _summary_metrics(report: Any, ensemble: StudentEnsemble, teacher_params: int) -> dict[str, Any]:
    params = ensemble.params_per_student()
    return {
        "accuracy": report.accuracy,
        "accuracy_without": report.missing_one,
        "accuracy_without_pair": report.missing_two,
        "worst_accuracy_one_lost": report.worst_missing_one,
        "params_per_student": params,
        "head_params": ensemble.head_parameters(),
        "teacher_params": teacher_params,
        "teacher_student_ratio": teacher_params / max(params),
        "feature_sizes": ensemble.feature_sizes,
    }


def train_students(config: StudentsConfig) -> dict[str, Any]:
    """Train the K students jointly; returns the final metrics (also saved in the checkpoint).

    Raises ValueError / FileExistsError / ArtifactError on bad input before anything is written,
    and FloatingPointError (on every rank) when the loss stops being finite.
    """
    config.validate()
    out = Path(config.out)
    if out.exists() and not config.resume and not config.overwrite:
        raise FileExistsError(f"{out} exists; pass --resume to continue that run or --overwrite to replace it")
    if config.resume and not out.exists():
        raise FileNotFoundError(f"--resume: {out} does not exist (nothing to resume)")
    info, device = join_process_group(config.device)
    try:
        return _train(config, out, info, device)
    finally:
        leave_process_group(info)


def _train(config: StudentsConfig, out: Path, info: DistInfo, device: torch.device) -> dict[str, Any]:
    setup = prepare(config, device)
    saved = _load_raw(out, "cpu") if config.resume else None
    if saved is not None:
        _check_resume_settings(saved, config, setup, out)

    torch.manual_seed(config.seed)
    ensemble = build_ensemble(setup.archs, setup.groups, setup.data.num_classes, setup.data.input_shape[0], setup.out_hw)
    layout = training_memory_format(ensemble, device)  # channels_last where torch trains it safely
    ensemble = ensemble.to(device, memory_format=layout)
    from nonn.students.loader import make_loader

    loader = make_loader(setup.data, "train", batch_size=config.batch_size, train=True, seed=config.seed, limit=config.train_limit,
                         contract=setup.contract, workers=config.workers)
    test_loader = make_loader(setup.data, "test", batch_size=max(256, config.batch_size), train=False, limit=config.eval_limit,
                              contract=setup.contract, workers=config.workers)
    dropout_gen = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.SGD(
        ensemble.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.momentum > 0
    )
    scheduler = _make_scheduler(config, optimizer)
    precision = Precision.for_device(config.precision, device)
    scaler = precision.loss_scaler()
    kd_loss = KDLoss(config.alpha, config.temperature, config.kd_scale)
    at_form = config.effective_at
    at_loss = make_transfer_loss(at_form, config.beta)
    groups_index = [torch.tensor(g, dtype=torch.long, device=device) for g in setup.groups]
    partition_order = torch.cat(groups_index)

    start_epoch, history = 0, []
    if saved is not None:
        for student, entry in zip(ensemble.students, saved["students"]):
            student.load_state_dict(entry["state_dict"])
        ensemble.head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        _restore_rng(saved["rng"], loader, dropout_gen, device, info)
        start_epoch, history = int(saved["epoch"]), list(saved.get("history") or [])
        if config.schedule == "step" and saved["config"].get("epochs") != config.epochs:
            log.info("extending the run from %s to %s epochs", saved["config"].get("epochs"), config.epochs)

    train_module: nn.Module = _TrainForward(sync_batchnorm(ensemble, device, info) if config.sync_bn else ensemble)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(train_module, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    log.info("training %d student(s) on %s in %s%s", ensemble.num_students, device, precision.name,
             f" ({info.world} processes)" if info.enabled else "")

    need_maps = at_form == "spatial"
    show = config.progress and info.is_main
    metrics: dict[str, Any] = dict(saved.get("metrics") or {}) if saved is not None else {}
    teacher_params = setup.teacher_meta["params"]
    for epoch in range(start_epoch, config.epochs):
        ensemble.train()
        # Running sums stay on the device (no per-step synchronisation); read once per epoch.
        running = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kd, at, correct
        seen = 0
        synchronize(device)
        started = time.perf_counter()
        bar = _progress(loader, show, f"epoch {epoch + 1}/{config.epochs}")
        for step, (x_all, y_all) in enumerate(bar):
            if len(y_all) < 2 * info.world:
                continue  # too few images for BatchNorm on every rank; every rank skips alike
            present = None
            if config.student_dropout > 0:
                present_all = sample_presence(len(y_all), ensemble.num_students, config.student_dropout, dropout_gen)
                present = shard(present_all, info).to(device, non_blocking=True)
            x = to_layout(shard(x_all, info), device, layout)
            y = shard(y_all, info).to(device, non_blocking=True)
            with precision.autocast():
                t_logits, t_map = setup.features(x)
                logits, pooled, maps = train_module(x, present, need_maps)
                kd = kd_loss(logits, t_logits, y)
                if at_form == "pooled":
                    t_pooled = t_map.float().mean(dim=(2, 3)).index_select(1, partition_order)
                    at = at_loss(torch.cat(pooled, dim=1), t_pooled)
                elif at_form == "spatial":
                    at = at_loss(maps, [t_map.index_select(1, idx) for idx in groups_index])
                else:
                    at = torch.zeros((), device=device)
                loss = kd + at
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.step(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
            n = len(y)
            running += torch.stack([loss.detach() * n, kd.detach() * n, at.detach() * n, (logits.detach().argmax(1) == y).sum()]).double()
            seen += n
            if show and step % 10 == 0:
                values = running.tolist()
                bar.set_postfix(loss=f"{values[0] / seen:.3f}", acc=f"{values[3] / seen:.3f}", refresh=False)
        synchronize(device)  # the clock must include the queued GPU work
        elapsed = time.perf_counter() - started
        # Reduce first, then check: every rank sees the same sums, so all stop together on a NaN.
        sums = torch.cat([running, running.new_tensor([seen])])
        loss_sum, kd_sum, at_sum, correct, images = all_reduce_sums(sums, info).tolist()
        if not all(math.isfinite(v) for v in (loss_sum, kd_sum, at_sum)):
            where = f" on at least one of {info.world} ranks" if info.enabled else ""
            raise FloatingPointError(f"training diverged in epoch {epoch + 1}{where} (loss {loss_sum / max(images, 1)}); "
                                     "lower --lr or --beta")
        skipped = scaler.take_skipped() if scaler is not None else 0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        cuda_states = _cuda_rng_states(device, info)
        if info.is_main:
            report = evaluate_ensemble(ensemble, test_loader, device, pairs=ensemble.num_students >= 4)
            images = max(int(images), 1)
            entry = {
                "epoch": epoch + 1,
                "lr": lr,
                "loss": loss_sum / images,
                "kd_loss": kd_sum / images,
                "at_loss": at_sum / images,
                "train_accuracy": correct / images,
                "test_accuracy": report.accuracy,
                "accuracy_without": report.missing_one,
                "contribution": {name: report.accuracy - acc for name, acc in report.missing_one.items()},
                "train_images": images,
                "world_size": info.world,
                "precision": precision.name,
                "images_per_s": images / elapsed if elapsed > 0 else None,
                "seconds": elapsed,
            }
            if scaler is not None:
                entry.update(skipped_steps=skipped, loss_scale=scaler.scale)
                if skipped:
                    log.warning("epoch %d: %d of %d fp16 steps skipped (gradients overflowed); loss scale now %g",
                                epoch + 1, skipped, len(loader), scaler.scale)
            history.append(entry)
            metrics = _summary_metrics(report, ensemble, teacher_params)
            log.info(
                "epoch %d/%d loss %.4f (kd %.4f, at %.4f) train acc %.4f test acc %.4f, %.1f images/s",
                epoch + 1, config.epochs, entry["loss"], entry["kd_loss"], entry["at_loss"], entry["train_accuracy"],
                report.accuracy, entry["images_per_s"] or 0.0,
            )
            checkpoint = {
                "format": FORMAT,
                "epoch": epoch + 1,
                "complete": epoch + 1 == config.epochs,
                "baseline": config.baseline,
                "students": [
                    {"name": student_name(k), "spec": s.spec.to_dict(), "group": setup.groups[k], "state_dict": cpu_state_dict(s)}
                    for k, s in enumerate(ensemble.students)
                ],
                "head": cpu_state_dict(ensemble.head),
                "groups": setup.groups,
                "partition": setup.partition,
                "dataset": setup.data.meta(),
                "input_contract": setup.contract.to_dict(),
                "teacher": setup.teacher_meta,
                "activation_transfer": at_form,
                "config": _config_dict(config),
                "history": history,
                "metrics": metrics,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(loader, dropout_gen, cuda_states),
            }
            save_checkpoint(checkpoint, out)
            atomic_write_jsonl(config.metrics_path, history)
        if info.enabled:
            import torch.distributed as dist

            dist.barrier()
    setup.features.close()
    seconds = sum(float(h.get("seconds") or 0.0) for h in history)
    return {"out": str(out), "epochs": config.epochs, "history": history, "train_seconds": seconds, **metrics}

"""Teacher training: the SGD recipe, exact resume (loading a teacher: nonn.students.teacher_loading).

Checkpoint format ``"nonn.teacher/1"`` (a dict that loads with ``torch.load(weights_only=True)``):

- ``arch``: ``create_model`` arguments (name, num_classes, in_channels, kwargs);
- ``state_dict``: model weights (CPU tensors); ``feature_layer``, ``num_features``, ``params``;
- ``dataset``: the data set's ``meta()`` (name, input_shape, classes, mean, std, and the
  spec that loads it again); ``input_contract``: how images were normalised for training
  (nonn.runtime.input_contract), so every later stage feeds the teacher the same way;
- ``epoch`` (completed epochs), ``optimizer``, ``scheduler``, ``rng`` (torch CPU/CUDA and the
  batch loader's generator), so ``--resume`` continues exactly where a killed run stopped;
- ``config`` (:class:`TeacherConfig` as a dict), ``history`` (one record per epoch, the same
  records as the JSON-lines log: losses, accuracies, learning rate, seconds with the evaluation,
  images/s of the training pass alone, precision, and under fp16 the skipped steps and loss
  scale), ``metrics`` (the last epoch's figures).

A checkpoint is written atomically after every epoch; the log is rewritten from ``history``
with it, so the two never disagree.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nonn.artifacts import atomic_write_jsonl
from nonn.runtime.input_contract import parse_normalize
from nonn.students.checkpoint import cpu_state_dict, load_checkpoint, save_checkpoint, saved_config
from nonn.students.data import DatasetInfo, load_dataset
from nonn.students.layout import to_layout, training_memory_format
from nonn.students.loader import BatchLoader, make_loader
from nonn.students.models import count_parameters, create_model
from nonn.students.precision import PRECISIONS, Precision, synchronize
from nonn.students.teacher_loading import TEACHER_FORMAT

__all__ = [
    "TeacherConfig",
    "train_teacher",
    "evaluate",
    "resolve_device",
]

SCHEDULES = ("cosine", "step")
log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """Everything that defines a teacher training run.

    ``limit`` caps the images of each split (for quick trials); ``threads`` sets torch's
    intra-op threads; ``precision`` is fp32, bf16, fp16 or auto (the device's best, see
    nonn.students.precision). ``device``, ``precision``, ``out``, ``resume``, ``overwrite``,
    ``log``, ``threads`` and ``progress`` may change between a run and its resume; everything
    else must not.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: list[int] | None = None  # (H, W) every image is resized to
    normalize: str = "dataset"  # dataset | none | imagenet | MEAN,..:STD,..
    arch: str = "wrn-16-2"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    out: str = "teacher.pt"
    resume: bool = False
    overwrite: bool = False
    log: str | None = None
    limit: int | None = None
    threads: int | None = None
    workers: int = 0  # processes decoding image-folder batches
    progress: bool = True

    # Fields allowed to differ between a run and its resume.
    RUNTIME_FIELDS = ("data_dir", "device", "precision", "out", "resume", "overwrite", "log", "threads", "workers", "progress")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0 (pass --no-nesterov or --momentum 0.9)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive number of images, got {self.limit!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if parse_normalize(self.normalize).name == "auto":
            raise ValueError(
                "--normalize auto finds how a trained teacher expects its images; to train one, choose "
                "dataset, none, imagenet or MEAN,..:STD,.."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda'/'cuda:N' must really be available."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {spec!r}: expected cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"unsupported device {spec!r}: expected cpu, cuda, cuda:N or auto")
    return device


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean cross-entropy loss and top-1 accuracy of ``model`` over ``loader`` (eval mode)."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1)}


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TeacherConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: cosine to zero, or x0.2 at 30 %, 60 % and 80 % of the epochs (WRN)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    milestones = sorted({max(1, round(config.epochs * f)) for f in (0.3, 0.6, 0.8)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.2)


def _check_resumable(checkpoint: dict[str, Any], config: TeacherConfig, dataset: DatasetInfo, path: Path) -> None:
    saved = saved_config(TeacherConfig, checkpoint.get("config"))
    current = config.to_dict()
    diffs = [
        f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}"
        for key in current
        if key not in TeacherConfig.RUNTIME_FIELDS and saved[key] != current[key]
    ]
    saved_data = checkpoint.get("dataset", {})
    for key in ("input_shape", "num_classes", "mean", "std"):
        if saved_data.get(key) != dataset.meta()[key]:
            diffs.append(f"dataset {key}: checkpoint {saved_data.get(key)!r}, now {dataset.meta()[key]!r}")
    if diffs:
        raise ValueError(
            f"cannot resume {path}: it was trained with different settings ({'; '.join(diffs)}); "
            "use the original settings, or a new --out (or --overwrite) to start afresh"
        )


def train_teacher(config: TeacherConfig) -> dict[str, Any]:
    """Train (or resume training) a teacher as ``config`` says; returns the final checkpoint dict.

    Deterministic on CPU for a given seed: two epochs in one go give the same weights as one
    epoch, a kill, and ``resume=True`` for the second.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = Path(config.out)
    dataset = load_dataset(config.dataset, config.data_dir, config.image_size)
    contract = dataset.contract(parse_normalize(config.normalize))

    checkpoint: dict[str, Any] | None = None
    if out.exists():
        if config.resume:
            checkpoint = load_checkpoint(out, TEACHER_FORMAT)
            _check_resumable(checkpoint, config, dataset, out)
        elif not config.overwrite:
            raise FileExistsError(f"{out} already exists: pass --resume to continue that run or --overwrite to replace it")
    elif config.resume:
        log.warning("no checkpoint at %s yet: starting from scratch", out)

    torch.manual_seed(config.seed)
    c, _, _ = dataset.input_shape
    model = create_model(config.arch, num_classes=dataset.num_classes, in_channels=c, **config.arch_kwargs)
    layout = training_memory_format(model, device)  # channels_last where torch trains it safely
    model = model.to(device, memory_format=layout)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )
    scheduler = _make_scheduler(optimizer, config)
    precision = Precision.for_device(config.precision, device)
    scaler = precision.loss_scaler()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    train_loader = make_loader(dataset, "train", config.batch_size, train=True, seed=config.seed, limit=config.limit,
                               contract=contract, workers=config.workers)
    test_loader = make_loader(dataset, "test", config.batch_size, train=False, limit=config.limit, contract=contract,
                              workers=config.workers)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["rng"]["loader"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"])
        log.info("resuming %s after epoch %d of %d", out, start_epoch, config.epochs)
        if start_epoch >= config.epochs:
            log.info("%s already finished all %d epochs", out, config.epochs)
            if config.log:
                atomic_write_jsonl(config.log, history)
            return checkpoint

    params = count_parameters(model)
    log.info("training %s (%d parameters) on %s (%d train / %d test images) on %s in %s",
             config.arch, params, dataset.name, train_loader.num_samples, test_loader.num_samples, device, precision.name)
    for epoch in range(start_epoch, config.epochs):
        synchronize(device)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        # Running sums stay on the device; they are read back only for the progress bar.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not config.progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x = to_layout(x, device, layout)
            y = y.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.step(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if config.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{int(correct) / seen:.4f}", refresh=False)
        bar.close()
        synchronize(device)  # the training pass's clock must include the queued GPU work
        train_seconds = time.perf_counter() - started
        loss_sum, correct = float(loss_sum), int(correct)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss is {loss_sum}); try a lower --lr")
        skipped = scaler.take_skipped() if scaler is not None else 0
        if skipped:
            log.warning("epoch %d: %d of %d fp16 steps skipped (gradients overflowed); loss scale now %g",
                        epoch + 1, skipped, len(train_loader), scaler.scale)
        scheduler.step()
        test = evaluate(model, test_loader, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "lr": lr,
            "seconds": round(time.perf_counter() - started, 3),
            "images_per_s": round(seen / train_seconds, 1) if train_seconds > 0 else None,
            "precision": precision.name,
        }
        if scaler is not None:
            record.update(skipped_steps=skipped, loss_scale=scaler.scale)
        history.append(record)
        log.info("epoch %d/%d: train loss %.4f acc %.4f, test loss %.4f acc %.4f (%.1f s)", record["epoch"],
                 config.epochs, record["train_loss"], record["train_acc"], record["test_loss"], record["test_acc"], record["seconds"])
        checkpoint = {
            "format": TEACHER_FORMAT,
            "arch": model.arch,
            "state_dict": cpu_state_dict(model),
            "feature_layer": model.feature_layer,
            "num_features": model.num_features,
            "params": params,
            "dataset": dataset.meta(),
            "input_contract": contract.to_dict(),
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "loader": train_loader.state_dict(),
            },
            "config": config.to_dict(),
            "history": history,
            "metrics": {**record, "params": params, "train_seconds": round(sum(r["seconds"] for r in history), 3)},
        }
        save_checkpoint(checkpoint, out)
        if config.log:
            atomic_write_jsonl(config.log, history)
    assert checkpoint is not None
    return checkpoint

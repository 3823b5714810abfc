"""`nonn train-students` and `nonn evaluate`: thin wrappers over nonn.students.train / .evaluate."""

from __future__ import annotations

import argparse
import logging
import os
import time

from nonn.cli.common import (
    add_data_args,
    add_json_arg,
    add_normalize_arg,
    add_precision_arg,
    add_seed_arg,
    add_torch_device_arg,
    add_workers_arg,
    default_workers,
    emit_json,
    positive_int,
    summary_line,
)
from nonn.cli.deprecation import add_alias

TRAIN_EPILOG = """\
examples:
  nonn train-students --teacher runs/fmnist/teacher.pt --partition runs/fmnist/partition-k2.json \\
      --arch wrn-16-1 --dataset fashion-mnist --epochs 30 --out runs/fmnist/students-k2.pt
  # heterogeneous devices: one architecture per student, options after a colon
  nonn train-students ... --arch wrn-16-1,wrn-10-1:width=8
  # robust to a lost device: zero each student's vector with probability 0.2 while training
  nonn train-students ... --student-dropout 0.2
  # ablations with the same recipe
  nonn train-students ... --baseline single-kd|random-partition|no-at
  # several processes (gloo on CPU, nccl on GPU); --sync-bn for BatchNorm over the global batch
  torchrun --nproc_per_node 2 -m nonn train-students ... --device cuda --sync-bn

The checkpoint (format nonn.students/1) is written atomically after every epoch, with the
metrics log beside it (<out>.metrics.jsonl: loss terms, train/test accuracy, accuracy with
each student zeroed, images/s). After a kill, the same command with --resume continues: on CPU
exactly as an uninterrupted run; on CUDA with every rank's random state restored, though not
bit for bit (cuDNN kernels do not sum in a fixed order). Under torchrun each rank's BatchNorm
normalises over its own share of the batch unless --sync-bn (CUDA only).
"""


def _add_teacher_args(parser: argparse.ArgumentParser, required: bool) -> None:
    what = "" if required else " (optional: also report the teacher's accuracy)"
    parser.add_argument("--teacher", default=None, help="nonn teacher checkpoint (nonn.teacher/1)" + what)
    parser.add_argument("--teacher-factory", default=None, help="bring your own teacher: package.module:function returning an nn.Module")
    parser.add_argument("--weights", default=None, help="state_dict file (or nonn checkpoint) for --teacher-factory")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-students",
        help="train K students jointly (KD + activation transfer)",
        description="Train the K NoNN students of a partition jointly against a frozen teacher.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_teacher_args(train, required=True)
    train.add_argument("--partition", required=True, help="partition.json (nonn.partition/1) giving the K filter groups")
    train.add_argument("--force", action="store_true", help="use a partition made for another teacher (different fingerprint)")
    train.add_argument("--layer", default=None, help="teacher feature layer (default: the partition's)")
    add_data_args(train, fallback="the data set the partition (or the teacher checkpoint) records")
    add_normalize_arg(train, "what the teacher checkpoint or the partition records, else auto")
    train.add_argument("--arch", default="wrn-16-1",
                       help="student backbone for every student, or a comma list with one per student; options as "
                            "NAME:key=value, e.g. wrn-10-1:width=8 (default: wrn-16-1)")
    train.add_argument("-K", "--num-students", type=positive_int, default=None, help="expected number of students K (checked against the partition)")
    add_alias(train, "--students", "-K/--num-students", dest="num_students", type=positive_int)
    train.add_argument("--epochs", type=positive_int, default=10, help="epochs (default: 10)")
    train.add_argument("--batch-size", type=positive_int, default=128, help="global mini-batch size (default: 128)")
    train.add_argument("--lr", type=float, default=0.05, help="initial SGD learning rate (default: 0.05)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    train.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    train.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                       help="learning-rate schedule per epoch: cosine to zero, or StepLR (default: cosine)")
    train.add_argument("--step-size", type=positive_int, default=20, help="StepLR step in epochs (default: 20, the prototype's)")
    train.add_argument("--gamma", type=float, default=0.2, help="StepLR factor (default: 0.2)")
    train.add_argument("--alpha", type=float, default=0.9, help="KD weight alpha (default: 0.9)")
    train.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default: 4)")
    train.add_argument("--kd-scale", type=float, default=1.0,
                       help="extra factor on the KL term; 2 reproduces the prototype's 2*alpha*T^2 (default: 1)")
    train.add_argument("--at", choices=("pooled", "spatial", "none"), default="pooled",
                       help="activation transfer: pooled (prototype), spatial (attention maps per student), none (default: pooled)")
    train.add_argument("--beta", type=float, default=None, help="activation-transfer weight (default: 1e4 pooled, 1e3 spatial)")
    train.add_argument("--student-dropout", type=float, default=0.0,
                       help="probability of zeroing a student's vector, per training image; never all students (default: 0)")
    train.add_argument("--baseline", choices=("single-kd", "random-partition", "no-at"), default=None,
                       help="train an ablation instead: one student of the same size with KD only; a random partition "
                            "with the same group sizes; or no activation transfer")
    add_seed_arg(train)
    train.add_argument("--limit", type=positive_int, default=None, help="use only the first N training images")
    train.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on only the first N test images")
    add_torch_device_arg(train)
    add_precision_arg(train)
    train.add_argument("--no-amp", action="store_true", help=argparse.SUPPRESS)  # old spelling of --precision fp32
    train.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on CUDA: BatchNorm statistics over the whole global batch (SyncBatchNorm) "
                            "instead of each rank's share")
    train.add_argument("--out", required=True, help="students checkpoint to write (e.g. runs/fmnist/students.pt)")
    train.add_argument("--metrics", default=None, help="JSON-lines metrics file (default: <out>.metrics.jsonl)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out (same settings required)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    add_workers_arg(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train_students)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="accuracy of trained students, whole and with devices missing",
        description="Evaluate a students checkpoint on a test split: ensemble accuracy, the teacher's (with "
                    "--teacher), accuracy with each single student missing and, for K >= 4, each pair missing.",
    )
    evaluate.add_argument("--students", required=True, help="students checkpoint (nonn.students/1)")
    add_data_args(evaluate, fallback="the data set the checkpoint records")
    _add_teacher_args(evaluate, required=False)
    add_normalize_arg(evaluate, "the students checkpoint's; the teacher is fed the same way")
    evaluate.add_argument("--batch-size", type=positive_int, default=256, help="batch size (default: 256)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="only the first N test images")
    evaluate.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=None,
                          help="also report each pair of students missing (default: when K >= 4)")
    add_torch_device_arg(evaluate)
    add_json_arg(evaluate, "figures ('accuracy' is a fraction)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=run_evaluate)


def run_train_students(args: argparse.Namespace) -> int:
    import torch

    from nonn.students.train import StudentsConfig, train_students

    started = time.perf_counter()
    if args.no_amp:
        logging.getLogger("nonn").warning("--no-amp is deprecated and will be removed: use --precision fp32")
        args.precision = "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    config = StudentsConfig(
        partition=args.partition,
        out=args.out,
        teacher=args.teacher,
        teacher_factory=args.teacher_factory,
        weights=args.weights,
        layer=args.layer,
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_size=None if args.image_size is None else list(args.image_size),
        normalize=None if args.normalize is None else str(args.normalize),
        force=args.force,
        arch=args.arch,
        num_students=args.num_students,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        step_size=args.step_size,
        gamma=args.gamma,
        alpha=args.alpha,
        temperature=args.temperature,
        kd_scale=args.kd_scale,
        at=args.at,
        beta=args.beta,
        student_dropout=args.student_dropout,
        baseline=args.baseline,
        seed=args.seed,
        train_limit=args.limit,
        eval_limit=args.eval_limit,
        device=args.device,
        precision=args.precision,
        sync_bn=args.sync_bn,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        metrics=args.metrics,
        workers=default_workers(args.data_workers),
    )
    result = train_students(config)
    if int(os.environ.get("RANK", "0")) == 0:
        params = result["params_per_student"]
        epoch = result["history"][-1]["epoch"] if result["history"] else 0
        detail = (f"{len(params)} student(s) of at most {max(params):,} parameters, the teacher "
                  f"{result['teacher_student_ratio']:.1f}x larger; epoch {epoch}/{result['epochs']}")
        worst = result.get("worst_accuracy_one_lost")
        lost = "" if worst is None else f", {worst:.4f} with the worst student lost"
        print(summary_line("train-students", result["out"], detail, f"ensemble test accuracy {result['accuracy']:.4f}{lost}", started))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from nonn.students.evaluate import evaluate_students

    report = evaluate_students(
        args.students,
        args.dataset,
        data_dir=args.data_dir,
        image_size=args.image_size,
        normalize=args.normalize,
        teacher=args.teacher,
        teacher_factory=args.teacher_factory,
        weights=args.weights,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        pairs=args.pairs,
        progress=not args.no_progress,
    )
    if args.json != "-":
        print(report.summary())
    if args.json:
        emit_json(args.json, report.to_dict())
    return 0

"""`nonn train-teacher` and `nonn eval-teacher`: thin wrappers over nonn.students.teacher."""

from __future__ import annotations

import argparse
import json
import time

from nonn.cli import CLIError
from nonn.cli.common import (
    add_data_args,
    add_normalize_arg,
    add_precision_arg,
    add_seed_arg,
    add_torch_device_arg,
    add_workers_arg,
    default_workers,
    positive_int,
    summary_line,
)
from nonn.cli.deprecation import add_alias

TRAIN_EPILOG = """\
examples:
  nonn train-teacher --dataset fashion-mnist --arch wrn-16-2 --epochs 30 --out runs/fmnist/teacher.pt \\
      --metrics runs/fmnist/teacher.jsonl
  # after a crash or kill, the same command with --resume continues exactly where it stopped
  nonn train-teacher --dataset fashion-mnist --arch wrn-16-2 --epochs 30 --out runs/fmnist/teacher.pt --resume
  nonn train-teacher --dataset digits --arch cnn-small --epochs 2 --limit 256 --out /tmp/t.pt --overwrite

The checkpoint (format nonn.teacher/1) is written atomically after every epoch; the log has one
JSON object per epoch: epoch, train_loss, train_acc, test_loss, test_acc, lr, seconds (with the
evaluation), images_per_s (training pass alone), precision.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-teacher",
        help="train a teacher CNN with SGD (resumable, checkpoint every epoch)",
        description="Train a teacher CNN from the model zoo on an image data set.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(train)
    add_normalize_arg(train, "dataset; recorded in the checkpoint, so later stages feed the teacher the same way")
    train.add_argument("--arch", default="wrn-16-2", help="model name: wrn-D-K (D = 6n + 4) or cnn-small (default: wrn-16-2)")
    train.add_argument("--width", type=positive_int, default=None, help="base width of the model (WRN default 16, cnn-small 32)")
    train.add_argument("--dropout", type=float, default=None, help="dropout inside each block / before the classifier (default: none)")
    train.add_argument("--epochs", type=positive_int, default=10, help="epochs to train (default: 10)")
    train.add_argument("--batch-size", type=positive_int, default=128, help="mini-batch size (default: 128)")
    train.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate (default: 0.1)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    train.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default: 5e-4)")
    train.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum (default: on)")
    train.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                       help="per-epoch learning-rate schedule: cosine to zero, or step (x0.2 at 30/60/80%% of the epochs) (default: cosine)")
    add_seed_arg(train)
    add_torch_device_arg(train)
    add_precision_arg(train)
    train.add_argument("--out", required=True, help="checkpoint file to write (e.g. runs/fmnist/teacher.pt)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out (same settings required)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    train.add_argument("--metrics", default=None, help="JSON-lines metrics file, one record per epoch (default: none)")
    add_alias(train, "--log", "--metrics", dest="metrics")
    train.add_argument("--limit", type=positive_int, default=None, help="use only the first N images of each split (quick trials)")
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    add_workers_arg(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train_teacher)

    evaluate = subparsers.add_parser(
        "eval-teacher",
        help="test accuracy of a teacher (nonn checkpoint or bring-your-own module)",
        description="Evaluate a teacher on the test split of a data set and print JSON.",
    )
    evaluate.add_argument("--teacher", default=None, help="nonn teacher checkpoint (nonn.teacher/1)")
    evaluate.add_argument("--teacher-factory", default=None, help="package.module:function returning your nn.Module")
    evaluate.add_argument("--weights", default=None, help="state_dict file (or nonn checkpoint) for --teacher-factory")
    add_data_args(evaluate, fallback="the one the teacher was trained on")
    add_normalize_arg(evaluate, "what the checkpoint recorded; auto for a teacher without a record")
    evaluate.add_argument("--batch-size", type=positive_int, default=256, help="batch size (default: 256)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="only the first N test images")
    add_torch_device_arg(evaluate)
    evaluate.set_defaults(func=run_eval_teacher)


def run_train_teacher(args: argparse.Namespace) -> int:
    from nonn.students.teacher import TeacherConfig, train_teacher

    started = time.perf_counter()
    arch_kwargs = {k: v for k, v in (("width", args.width), ("dropout", args.dropout)) if v is not None}
    config = TeacherConfig(
        dataset=args.dataset, data_dir=args.data_dir, image_size=None if args.image_size is None else list(args.image_size),
        normalize=str(args.normalize or "dataset"), arch=args.arch, arch_kwargs=arch_kwargs, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        nesterov=args.nesterov, schedule=args.schedule, seed=args.seed, device=args.device, precision=args.precision, out=args.out,
        resume=args.resume, overwrite=args.overwrite, log=args.metrics, limit=args.limit, threads=args.threads,
        workers=default_workers(args.data_workers), progress=not args.no_progress,
    )
    checkpoint = train_teacher(config)
    m = checkpoint["metrics"]
    detail = f"{checkpoint['arch']['name']}, {m['params']:,} parameters; epoch {checkpoint['epoch']}/{args.epochs}"
    print(summary_line("train-teacher", args.out, detail, f"test accuracy {m['test_acc']:.4f}, test loss {m['test_loss']:.4f}",
                       started))
    return 0


def run_eval_teacher(args: argparse.Namespace) -> int:
    from nonn.students.data import resolve_data
    from nonn.students.loader import make_loader
    from nonn.students.normalization import teacher_contract
    from nonn.students.teacher import evaluate, resolve_device
    from nonn.students.teacher_loading import load_teacher

    if (args.teacher is None) == (args.teacher_factory is None):
        raise CLIError("give exactly one of --teacher CHECKPOINT or --teacher-factory package.module:function")
    device = resolve_device(args.device)
    teacher = load_teacher(args.teacher, factory=args.teacher_factory, weights=args.weights, map_location=device)
    source = args.teacher or args.weights or args.teacher_factory
    dataset = resolve_data(args.dataset, args.data_dir, args.image_size, [(teacher.dataset, source)])
    contract = teacher_contract(args.normalize, dataset, teacher, device=device)
    loader = make_loader(dataset, "test", args.batch_size, train=False, limit=args.limit, contract=contract)
    result = evaluate(teacher.model, loader, device)
    print(json.dumps({"dataset": dataset.name, "test_loss": result["loss"], "test_acc": result["acc"],
                      "normalize": contract.normalize, "mean": list(contract.mean), "std": list(contract.std),
                      "params": teacher.params, "fingerprint": teacher.fingerprint}))
    return 0

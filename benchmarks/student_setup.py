"""The setup the student-training benchmarks share: one teacher, K students, the same data.

Imported by train_speed.py and student_epoch_profile.py (run as scripts, so this folder is on
sys.path): the command-line arguments that describe that setup, and the interleaved filter
groups both use in place of a real partition (speed does not depend on which filters go where).
"""

from __future__ import annotations

import argparse


def add_setup_args(parser: argparse.ArgumentParser, *, repeat: int, repeat_help: str, threads: int) -> None:
    """--dataset, --data-dir, --teacher-arch, --arch, --students, --images, --batch-size, --repeat, --threads."""
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--teacher-arch", default="wrn-16-2")
    parser.add_argument("--arch", default="wrn-10-1:width=10", help="student backbone")
    parser.add_argument("--students", type=int, default=2)
    parser.add_argument("--images", type=int, default=2048, help="training images per pass")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=repeat, help=repeat_help)
    parser.add_argument("--threads", type=int, default=threads)


def interleaved_groups(num_filters: int, students: int) -> list[list[int]]:
    """Filter k, k + K, k + 2K, ... to student k."""
    return [list(range(k, num_filters, students)) for k in range(students)]

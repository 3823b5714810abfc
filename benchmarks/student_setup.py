"""The setup the student-training benchmarks share: one teacher, K students, the same data.

Imported by train_speed.py and student_epoch_profile.py (run as scripts, so this folder is on
sys.path): the command-line arguments that describe that setup, the interleaved filter groups
both use in place of a real partition (speed does not depend on which filters go where), and
the students' training step written out plainly (the work train_students does per batch).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


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


def students_step(ensemble, optimizer, x, y, t_logits, t_map, partition_order, alpha=0.9, temperature=4.0, beta=1e4) -> None:
    """One step of the students on a batch the frozen teacher has seen: KD on its logits, pooled
    activation transfer on its feature map (channels in `partition_order`), backward, SGD."""
    pooled = [student(x) for student in ensemble.students]
    s = torch.cat(pooled, dim=1)
    logits = ensemble.head(s)
    kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                  reduction="batchmean", log_target=True) * temperature**2
    loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits, y)
    t_p = t_map.mean(dim=(2, 3))[:, partition_order]
    loss = loss + beta * (F.normalize(s, dim=1) - F.normalize(t_p, dim=1)).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

"""Training layout: channels_last where torch trains it safely, batches with exact strides."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nonn.students.layout import to_layout, training_memory_format
from nonn.students.models import create_model
from nonn.students.teacher import TeacherConfig, train_teacher
from nonn.students.train import StudentsConfig, train_students

from students_testing import make_npz, make_partition, make_teacher

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_narrow_strided_1x1_convolutions_train_in_the_default_layout_on_cpu():
    assert training_memory_format(create_model("wrn-16-1", 10, 1), CPU) == torch.channels_last
    assert training_memory_format(create_model("wrn-16-1", 10, 1, width=8), CPU) == torch.channels_last
    narrow = create_model("wrn-16-1", 10, 1, width=4)  # a 1x1 stride-2 shortcut over 4 channels
    assert training_memory_format(narrow, CPU) == torch.contiguous_format
    assert training_memory_format(narrow, torch.device("cuda")) == torch.channels_last  # a oneDNN problem only
    assert training_memory_format(nn.Sequential(nn.Conv2d(4, 8, 1)), CPU) == torch.channels_last  # stride 1 is fine


def test_batches_get_the_exact_strides_of_the_layout():
    # One channel: these strides fit both layouts, and made oneDNN choose channels_last by itself.
    ambiguous = torch.rand(16, 8, 8, 1).permute(0, 3, 1, 2)
    assert ambiguous.is_contiguous() and ambiguous.stride() == (64, 1, 8, 1)
    plain = to_layout(ambiguous, CPU, torch.contiguous_format)
    assert plain.stride() == (64, 64, 8, 1) and torch.equal(plain, ambiguous)
    last = to_layout(torch.rand(4, 3, 5, 5), CPU, torch.channels_last)
    assert last.stride() == (75, 1, 15, 3)
    ready = torch.rand(2, 3, 4, 4)
    assert to_layout(ready, CPU, torch.contiguous_format) is ready  # no copy when nothing changes


def test_narrow_wrn_students_and_teacher_train_on_one_thread(one_thread, tmp_path):
    # Before the layout choice these runs aborted the process ("corrupted double-linked list").
    data = make_npz(tmp_path / "bars.npz")
    teacher = make_teacher(tmp_path / "teacher.pt", data)
    partition = make_partition(tmp_path / "partition.json", teacher)
    result = train_students(StudentsConfig(
        partition=str(partition), out=str(tmp_path / "s.pt"), teacher=str(teacher), dataset=str(data),
        arch="wrn-10-1:width=4", epochs=2, batch_size=16, beta=10.0, device="cpu", progress=False,
    ))
    assert len(result["history"]) == 2
    checkpoint = train_teacher(TeacherConfig(dataset=str(data), arch="wrn-10-1", arch_kwargs={"width": 4}, epochs=2,
                                             batch_size=16, lr=0.05, device="cpu", out=str(tmp_path / "t.pt"), progress=False))
    assert checkpoint["epoch"] == 2

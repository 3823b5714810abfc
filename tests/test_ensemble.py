"""The student ensemble: structure, head over concatenated vectors, masks, student dropout."""

import pytest
import torch

from nonn.students.ensemble import (
    Student,
    StudentEnsemble,
    StudentSpec,
    build_ensemble,
    parse_arch_list,
    sample_presence,
)

GROUPS = [[3, 0, 5], [1, 2], [4, 6, 7, 8]]
THIN = ("cnn-small", {"width": 4})


def tiny_ensemble(groups=GROUPS, out_hw=(4, 4)):
    torch.manual_seed(0)
    return build_ensemble([THIN] * len(groups), groups, num_classes=5, in_channels=1, out_hw=out_hw).eval()


def test_student_outputs_pooled_vector_of_its_group_size_at_teacher_resolution():
    ens = tiny_ensemble()
    x = torch.rand(2, 1, 8, 8)
    for student, group in zip(ens.students, GROUPS):
        fmap = student.feature_map(x)
        assert fmap.shape == (2, len(group), 4, 4)
        assert (fmap >= 0).all()  # bridge ends in ReLU
        torch.testing.assert_close(student(x), fmap.mean(dim=(2, 3)))
    # A smaller teacher map: pooled by an integer factor; a larger one: bilinear upsampling.
    assert tiny_ensemble(out_hw=(2, 2)).students[0].feature_map(x).shape[-2:] == (2, 2)
    assert tiny_ensemble(out_hw=(5, 7)).students[0].feature_map(x).shape[-2:] == (5, 7)


def test_forward_equals_head_applied_to_concatenated_student_outputs():
    ens = tiny_ensemble()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        vectors = torch.cat([s(x) for s in ens.students], dim=1)
        expected = vectors @ ens.head.weight.T + ens.head.bias
        torch.testing.assert_close(ens(x), expected)
        assert ens.head.in_features == sum(len(g) for g in GROUPS)


def test_forward_with_mask_zeroes_absent_students():
    ens = tiny_ensemble()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        vecs = [s(x) for s in ens.students]
        vecs_missing_1 = [vecs[0], torch.zeros_like(vecs[1]), vecs[2]]
        expected = ens.head(torch.cat(vecs_missing_1, dim=1))
        torch.testing.assert_close(ens.forward_with_mask(x, torch.tensor([True, False, True])), expected)
        torch.testing.assert_close(ens.forward_with_mask(x, torch.ones(3, dtype=torch.bool)), ens(x))
        # Per-sample mask: sample 0 loses student 1, the others have all.
        per_sample = torch.ones(3, 3, dtype=torch.bool)
        per_sample[0, 1] = False
        out = ens.forward_with_mask(x, per_sample)
        torch.testing.assert_close(out[0], expected[0])
        torch.testing.assert_close(out[1:], ens(x)[1:])
        with pytest.raises(ValueError, match="presence mask"):
            ens.forward_with_mask(x, torch.ones(2, dtype=torch.bool))


def test_student_dropout_never_zeroes_all_students():
    gen = torch.Generator().manual_seed(0)
    for k in (2, 3, 4):
        mask = sample_presence(20000, k, 0.9, generator=gen)
        assert mask.shape == (20000, k)
        assert mask.any(dim=1).all(), "some sample lost every student"
        assert (~mask).any(), "dropout with p=0.9 never dropped anything"
    mask = sample_presence(5000, 4, 0.25, generator=gen)
    dropped = 1.0 - mask.float().mean().item()
    assert 0.2 < dropped < 0.3
    assert sample_presence(10, 3, 0.0).all()
    assert sample_presence(10, 1, 0.5).all()
    with pytest.raises(ValueError, match="dropout"):
        sample_presence(10, 2, 1.0)


def test_student_dropout_is_reproducible_with_a_generator():
    a = sample_presence(64, 4, 0.5, torch.Generator().manual_seed(3))
    b = sample_presence(64, 4, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_rebuild_from_specs_and_state_dict_gives_same_outputs():
    ens = tiny_ensemble()
    specs = [StudentSpec.from_dict(s.spec.to_dict()) for s in ens.students]
    clone = StudentEnsemble([Student(spec) for spec in specs], ens.groups, 5).eval()
    clone.load_state_dict(ens.state_dict())
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), ens(x))


def test_backbone_classifier_is_dropped_and_every_parameter_is_used():
    ens = tiny_ensemble().train()
    out = ens.forward_train(torch.rand(4, 1, 8, 8), need_maps=True)
    (out.logits.sum() + sum(m.sum() for m in out.maps)).backward()
    unused = [n for n, p in ens.named_parameters() if p.grad is None]
    assert unused == []
    assert len(out.pooled) == 3 and len(out.maps) == 3
    assert sum(ens.params_per_student()) + ens.head_parameters() == sum(p.numel() for p in ens.parameters())


def test_heterogeneous_students_and_arch_parsing():
    archs = parse_arch_list("cnn-small:width=4,wrn-10-1:width=4", 2)
    assert archs == [("cnn-small", {"width": 4}), ("wrn-10-1", {"width": 4})]
    ens = build_ensemble(archs, [[0, 1], [2]], num_classes=3, in_channels=1, out_hw=(2, 2))
    assert ens(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert ens.students[1].spec.backbone["name"] == "wrn-10-1"
    assert parse_arch_list("wrn-16-1", 3) == [("wrn-16-1", {})] * 3
    with pytest.raises(ValueError, match="partition has 3 groups"):
        parse_arch_list("a,b", 3)
    with pytest.raises(ValueError, match="key=value"):
        parse_arch_list("wrn-16-1:width", 1)


def test_group_size_mismatch_is_rejected():
    student = Student(StudentSpec({"name": "cnn-small", "num_classes": 2, "in_channels": 1, "kwargs": {"width": 4}}, 3, (2, 2)))
    with pytest.raises(ValueError, match="group has 2 filters"):
        StudentEnsemble([student], [[0, 1]], 2)


def test_evaluation_with_missing_students_matches_masked_forward():
    from nonn.students.evaluate import evaluate_ensemble

    groups = [[0, 1], [2], [3, 4], [5]]
    ens = tiny_ensemble(groups)
    torch.manual_seed(1)
    batches = [(torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))) for _ in range(3)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    report = evaluate_ensemble(ens, batches)

    def acc(present):
        with torch.no_grad():
            return (ens.forward_with_mask(x, torch.tensor(present)).argmax(1) == y).float().mean().item()

    assert report.num_images == 18 and report.num_students == 4
    assert report.accuracy == pytest.approx(acc([True] * 4))
    assert report.missing_one["student_2"] == pytest.approx(acc([True, True, False, True]))
    assert len(report.missing_two) == 6  # every pair for K >= 4
    assert report.missing_two["student_0+student_3"] == pytest.approx(acc([False, True, True, False]))
    assert report.to_dict()["worst_missing_one"] == min(report.missing_one.values())

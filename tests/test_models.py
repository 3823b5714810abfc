"""The model registry: parameter counts, the feature/head contract, rebuilding from arch."""

import pytest
import torch

from nonn.students.models import count_parameters, create_model, list_models, register_model


@pytest.mark.parametrize(
    "name, expected",
    [("wrn-16-1", 175_066), ("wrn-16-2", 691_674), ("wrn-40-1", 563_930), ("wrn-40-2", 2_243_546), ("wrn-40-4", 8_949_210)],
)
def test_wide_resnet_parameter_counts_match_the_reference(name, expected):
    assert count_parameters(create_model(name, num_classes=10, in_channels=3)) == expected


@pytest.mark.parametrize(
    "name, kwargs, in_channels, size",
    [
        ("wrn-10-1", {"width": 8}, 1, 8),
        ("wrn-16-2", {}, 1, 28),
        ("wrn-22-1", {"width": 4, "dropout": 0.1}, 3, 17),
        ("cnn-small", {"width": 8}, 3, 32),
    ],
)
def test_features_head_and_logits_agree(name, kwargs, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=in_channels, **kwargs).eval()
    x = torch.randn(3, in_channels, size, size)
    feats = model.forward_features(x)
    assert feats.ndim == 4 and feats.shape[:2] == (3, model.num_features)
    assert (feats >= 0).all(), "features are taken after the final ReLU"
    logits = model(x)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(model.forward_head(feats), logits)

    # The named feature layer's output is exactly the feature map (captured by a hook).
    captured = []
    handle = dict(model.named_modules())[model.feature_layer].register_forward_hook(lambda m, i, o: captured.append(o))
    model(x)
    handle.remove()
    assert len(captured) == 1
    torch.testing.assert_close(captured[0], feats)


def test_arch_rebuilds_the_same_model():
    model = create_model("wrn-10-1", num_classes=4, in_channels=1, width=6, dropout=0.2)
    rebuilt = create_model(**model.arch)
    assert rebuilt.arch == model.arch
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes


def test_thin_students_are_small_next_to_the_teacher():
    teacher = count_parameters(create_model("wrn-16-2", in_channels=1))
    student = count_parameters(create_model("wrn-10-1", in_channels=1, width=8))
    assert student * 20 <= teacher


def test_bad_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        create_model("wrn-15-2")
    with pytest.raises(ValueError, match="unknown model 'resnet-9'.*wrn-D-K"):
        create_model("resnet-9")
    with pytest.raises(ValueError, match="does not accept options"):
        create_model("cnn-small", depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn-small", num_classes=0)


def test_registry_lists_and_accepts_new_models():
    assert {"cnn-small", "wrn-16-1", "wrn-40-4"} <= set(list_models())

    @register_model("test-linear")
    def _linear(num_classes, in_channels, **kw):  # noqa: ARG001 - registry signature
        return torch.nn.Linear(in_channels, num_classes)

    model = create_model("test-linear", num_classes=2, in_channels=5)
    assert model.arch["name"] == "test-linear" and "test-linear" in list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-linear")(_linear)

"""Specification of the DARN network (LiverTumorDARNLib.models).

Behaviour tests use a tiny 3-level model on a 32^3 volume; only the size budget tests build the
default model.
"""

import pytest
import torch
import torch.nn.functional as F

from LiverTumorDARNLib.models import DARN, Aggregation, build_model, export_torchscript

# Inference ships TorchScript on purpose (Slicer loads it without our code); torch >= 2.10 warns.

ORDERS = ["spa_sem", "sem_spa"]
TINY = dict(in_channels=1, num_classes=3, encoder_widths=(4, 8, 16), pyramid_width=4)
SIDE = 32


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DARN(**{**TINY, **overrides})


def volume(side=SIDE, seed=1):
    return torch.randn(1, 1, side, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("order", ORDERS)
def test_output_has_num_classes_channels_on_the_input_grid(order):
    model = tiny_model(order=order).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 32, 16, 48))
    assert logits.shape == (2, 3, 32, 16, 48)


def test_the_two_orders_compute_different_functions_from_the_same_weights():
    spa_sem = tiny_model(seed=0, order="spa_sem").eval()
    sem_spa = tiny_model(seed=0, order="sem_spa").eval()
    weights_a, weights_b = spa_sem.state_dict(), sem_spa.state_dict()
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    with torch.no_grad():
        x = volume()
        assert not torch.allclose(spa_sem(x), sem_spa(x), atol=1e-4)


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="order"):
        tiny_model(order="sem_sem")


def test_an_input_not_divisible_by_the_pyramid_scale_is_refused():
    model = tiny_model().eval()  # 3 levels: sides must be multiples of 4
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 1, 32, 30, 32))


def test_the_scripted_model_also_refuses_an_input_not_divisible_by_the_pyramid_scale():
    scripted = torch.jit.script(tiny_model().eval())
    with pytest.raises(Exception, match="divisible by 4"):
        scripted(torch.zeros(1, 1, 32, 32, 30))


@pytest.mark.parametrize("order", ORDERS)
def test_exported_torchscript_computes_the_same_logits_as_the_eager_model(order, tmp_path):
    model = tiny_model(order=order)
    path = tmp_path / "darn.pt"
    export_torchscript(model, path)
    loaded = torch.jit.load(str(path))
    x = volume()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_forward_with_auxiliary_returns_main_logits_then_one_map_per_coarser_level():
    model = tiny_model(deep_supervision=True).train()
    x = volume()
    with torch.no_grad():
        outputs = model.forward_with_auxiliary(x)
        main = model(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 32, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
    assert torch.equal(outputs[0], main)


def test_forward_with_auxiliary_gives_only_main_logits_in_eval_mode():
    model = tiny_model(deep_supervision=True).eval()
    with torch.no_grad():
        outputs = model.forward_with_auxiliary(volume())
    assert len(outputs) == 1


def test_scripted_forward_with_auxiliary_matches_eager(tmp_path):
    model = tiny_model(deep_supervision=True).train()
    path = tmp_path / "train.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path)).train()
    x = volume()
    with torch.no_grad():
        eager, scripted = model.forward_with_auxiliary(x), loaded.forward_with_auxiliary(x)
    assert len(scripted) == len(eager) == 3
    assert all(torch.allclose(s, e, atol=1e-5) for s, e in zip(scripted, eager))


@pytest.mark.parametrize("order", ORDERS)
def test_every_parameter_receives_a_gradient(order):
    model = tiny_model(order=order, deep_supervision=True).train()
    sum(o.square().mean() for o in model.forward_with_auxiliary(volume(side=16))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_aggregation_is_one_1x1_conv_of_the_concatenated_upsampled_levels():
    torch.manual_seed(0)
    aggregation = Aggregation(num_levels=3, channels=4, num_classes=3, negative_slope=0.01)
    levels = [torch.randn(1, 4, s, s, s) for s in (16, 8, 4)]
    size = levels[0].shape[2:]
    stacked = torch.cat([F.interpolate(t, size=size, mode="trilinear", align_corners=False) for t in levels], 1)
    weight = torch.cat([aggregation.project_finest.weight] + [p.weight for p in aggregation.project_coarser], 1)
    expected = aggregation.classifier(aggregation.block(F.conv3d(stacked, weight, aggregation.project_finest.bias)))
    with torch.no_grad():
        assert torch.allclose(aggregation(levels), expected, atol=1e-5)


def test_default_model_has_fewer_than_two_million_parameters():
    assert sum(p.numel() for p in DARN().parameters()) < 2_000_000


def test_default_model_torchscript_file_is_under_8_mib(tmp_path):
    path = tmp_path / "darn.pt"
    export_torchscript(DARN(), path)
    assert path.stat().st_size < 8 * 2**20


def test_build_model_from_a_config_reproduces_the_architecture():
    config = dict(
        in_channels=2, num_classes=4, encoder_widths=[4, 8, 16, 32], pyramid_width=8,
        order="sem_spa", deep_supervision=True, reduction=2, attention_kernel_size=5,
    )
    built, direct = build_model(config).state_dict(), DARN(**config).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in direct.items()}

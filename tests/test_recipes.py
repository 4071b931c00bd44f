"""Recipes: the paper's supplementary Table 1 values, overrides, validation, and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from l2bn.train.optim import lr_factor
from l2bn.train.recipes import PAPER_SEEDS, RECIPES, default_recipe_name, get_recipe, list_recipes, warm_restart_factor


@pytest.mark.parametrize(
    "name,lr,wd,bs,epochs,schedule",
    [
        ("cifar-resnet", 0.1, 5e-4, 128, 200, "cosine"),
        ("cifar-vgg", 0.1, 5e-4, 128, 200, "cosine"),
        ("cifar-densenet", 0.1, 1e-4, 64, 300, "step"),
        ("cifar-regnet", 0.5, 5e-4, 512, 200, "cosine"),
        ("cifar-resnext", 0.1, 5e-4, 128, 300, "cosine"),
        ("imagenet-resnet", 0.2, 5e-5, 256, 100, "cosine"),
    ],
)
def test_paper_table1_presets(name, lr, wd, bs, epochs, schedule):
    r = RECIPES[name]
    assert (r.lr, r.weight_decay, r.batch_size, r.epochs, r.schedule) == (lr, wd, bs, epochs, schedule)
    assert r.momentum == 0.9 and r.nesterov  # SGD, Nesterov momentum 0.9 everywhere
    if name.startswith("cifar"):
        assert r.seeds == PAPER_SEEDS == (121, 122, 123, 124, 125)


def test_special_recipe_details():
    assert RECIPES["cifar-densenet"].milestones == (150, 225) and RECIPES["cifar-densenet"].gamma == 0.1
    regnet = RECIPES["cifar-regnet"]
    assert (regnet.warmup_epochs, regnet.mixup_alpha, regnet.label_smoothing) == (5, 0.5, 0.1)
    assert RECIPES["cifar-resnet"].mixup_alpha == 0 and RECIPES["cifar-resnet"].warmup_epochs == 0
    assert {"digits-quick", "fashion-mnist-quick"} <= set(list_recipes())


def test_default_recipe_per_dataset_and_family():
    assert default_recipe_name("digits", "resnet20") == "digits-quick"
    assert default_recipe_name("fashion-mnist", "resnet20") == "fashion-mnist-quick"
    assert default_recipe_name("imagenet", "resnet50") == "imagenet-resnet"
    assert default_recipe_name("cifar100", "resnet56") == "cifar-resnet"
    assert default_recipe_name("cifar100", "resnext29_8x64d") == "cifar-resnext"
    assert default_recipe_name("cifar100", "densenet_bc100_12") == "cifar-densenet"
    assert default_recipe_name("cifar100", "vgg16_bn") == "cifar-vgg"
    assert default_recipe_name("cifar10", "regnetx_200mf") == "cifar-regnet"


def test_overrides_copy_and_ignore_none():
    r = get_recipe("cifar-densenet", lr=0.05, milestones=[10, 20], epochs=None)
    assert r.lr == 0.05 and r.milestones == (10, 20) and r.epochs == 300
    assert RECIPES["cifar-densenet"].lr == 0.1  # presets are not modified


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "need lr > 0"),
        ({"warmup_epochs": 300}, "warmup_epochs must be in"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"milestones": [20, 10]}, "milestones must be increasing"),
        ({"momentum": 0.0}, "nesterov needs momentum"),
        ({"bogus": 1}, r"unknown recipe field\(s\) \['bogus'\]"),
    ],
)
def test_bad_values_are_rejected_with_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        get_recipe("cifar-resnet", **overrides)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ValueError, match="known recipes: .*cifar-resnet"):
        get_recipe("cifar-foo")


def test_cosine_with_warmup_formula():
    r = get_recipe("cifar-regnet")  # 5 warm-up epochs, 200 epochs, cosine to 0
    assert lr_factor(r, 0.0) == pytest.approx(0.0, abs=1e-6)
    assert lr_factor(r, 2.5) == pytest.approx(0.5, rel=1e-6)
    assert lr_factor(r, 5.0) == pytest.approx(1.0)
    for t in (7.0, 50.0, 102.5, 180.0):
        assert lr_factor(r, t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 5) / 195)))
    assert lr_factor(r, 200.0) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_formula():
    r = get_recipe("cifar-densenet")
    assert lr_factor(r, 149.99) == 1.0
    assert lr_factor(r, 150.0) == pytest.approx(0.1)
    assert lr_factor(r, 224.5) == pytest.approx(0.1)
    assert lr_factor(r, 225.0) == pytest.approx(0.01)
    assert lr_factor(get_recipe("cifar-resnet", schedule="constant"), 123.0) == 1.0


def test_schedule_drives_a_real_optimizer_per_step():
    r = get_recipe("cifar-resnet", epochs=4, lr=0.2)
    steps_per_epoch = 5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=r.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(r, s / steps_per_epoch))
    seen = []
    for _ in range(4 * steps_per_epoch):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 20)) for s in range(20)]
    assert seen == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_default_recipe_comes_from_the_registry_family(monkeypatch):
    """The family is the model registry's, not a guess from the name; a family without a preset is an error."""
    from l2bn.models import registry

    entry = registry.get_model_entry("resnet20")
    monkeypatch.setitem(registry._MODELS, "vggish_resnet", dataclasses.replace(entry, name="vggish_resnet"))
    assert default_recipe_name("cifar100", "vggish_resnet") == "cifar-resnet"  # the name says vgg, the family resnet
    monkeypatch.setitem(registry._MODELS, "mystery", dataclasses.replace(entry, name="mystery", family=None))
    with pytest.raises(ValueError, match=r"no cifar recipe for model 'mystery' \(family None\); pass --recipe"):
        default_recipe_name("cifar10", "mystery")
    assert default_recipe_name("digits", "mystery") == "digits-quick"  # quick presets fit every model
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        default_recipe_name("cifar10", "nope")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        default_recipe_name("svhn", "resnet20")


@pytest.mark.parametrize("field", ["lr", "weight_decay", "mixup_alpha", "gamma", "label_smoothing", "momentum"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got {value}"):
        get_recipe("cifar-resnet", **{field: value})


def test_gamma_and_metrics_max_batches_ranges():
    with pytest.raises(ValueError, match=r"gamma .* must be > 0, got -0.1"):
        get_recipe("cifar-densenet", gamma=-0.1)
    with pytest.raises(ValueError, match="metrics_max_batches must be >= 1"):
        get_recipe("cifar-resnet", metrics_max_batches=0)


def _keras_warm_restart_lrs(epochs: int, nbatch: int, max_lr: float, min_lr: float) -> list[float]:
    """The learning rate before every batch, replaying Hu et al.'s ``LR_WarmRestart`` callback
    (MihawkHu/DCASE2020_task1, task1a/10class/fcnn/DCASE_training_functions.py) step by step."""
    restarts, tmult, start, lrs = [3.0, 7.0, 15.0, 31.0, 63.0, 127.0, 255.0], 2, 0, []
    for epoch in range(epochs):
        current = epoch if epoch + 1 < restarts[0] else epoch + 1
        if current in restarts:
            start, tmult = current, 2 * tmult
        for batch in range(nbatch):
            pts = current + batch / nbatch - start
            lrs.append(min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(pts / tmult * math.pi)))
    return lrs


@pytest.mark.parametrize("preset, model", [("tau2020-fcnn", "fcnn"), ("tau2020-resnet", "asc_resnet17")])
def test_warm_restarts_match_the_keras_callback(preset, model):
    recipe = get_recipe(preset)
    assert default_recipe_name("tau2020", model) == preset
    nbatch = 7
    expected = _keras_warm_restart_lrs(recipe.epochs, nbatch, 0.1, 1e-5)
    ours = [recipe.lr * warm_restart_factor(recipe, step / nbatch) for step in range(recipe.epochs * nbatch)]
    assert max(abs(a - b) for a, b in zip(ours, expected)) < 1e-12
    # restarts after epochs 2, 6, 14, 30, 62, 126: the rate jumps back to the maximum there
    for epoch in (2, 6, 14, 30, 62) + ((126,) if recipe.epochs > 126 else ()):
        assert ours[epoch * nbatch] == pytest.approx(0.1) and ours[epoch * nbatch - 1] < 0.002


def test_tau2020_presets():
    resnet, fcnn = get_recipe("tau2020-resnet"), get_recipe("tau2020-fcnn")
    for r in (resnet, fcnn):
        assert (r.batch_size, r.lr, r.min_lr, r.momentum, r.nesterov) == (32, 0.1, 1e-5, 0.9, False)
        assert (r.schedule, r.mixup_alpha, r.mixup_per_sample, r.seeds) == ("cosine-restarts", 0.4, True, PAPER_SEEDS)
    assert (resnet.epochs, resnet.weight_decay, resnet.weight_decay_scope, resnet.spec_masks) == (126, 2e-3, "conv", False)
    assert (fcnn.epochs, fcnn.weight_decay, fcnn.spec_masks) == (254, 0.0, True)
    assert default_recipe_name("tau2020", "fsfcnn") == "tau2020-fcnn"
    assert warm_restart_factor(fcnn, 254.5) == pytest.approx(1e-4)  # past the last cycle: min_lr


def test_recipe_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="weight_decay_scope must be one of"):
        get_recipe("tau2020-resnet", weight_decay_scope="norms")
    with pytest.raises(ValueError, match=r"min_lr must be in \[0, lr=0.1\), got 0.5"):
        get_recipe("tau2020-fcnn", min_lr=0.5)
    with pytest.raises(ValueError, match="restart_cycles must be positive"):
        get_recipe("tau2020-fcnn", restart_cycles=(2, 0))
    assert get_recipe("tau2020-fcnn", restart_cycles=[1, 2]).restart_cycles == (1, 2)


def test_lr_factor_runs_the_warm_restarts():
    recipe = get_recipe("tau2020-fcnn")
    for t in (0.0, 1.3, 2.0, 5.99, 100.25, 253.9):
        assert lr_factor(recipe, t) == warm_restart_factor(recipe, t)
    assert lr_factor(recipe, 2.0) == 1.0 and lr_factor(recipe, 1.999) < 0.01

"""Recipes: the paper's supplementary Table 1 values, overrides, validation, and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from l2bn.train.optim import build_scheduler
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


def written_out_factor(recipe, t: float) -> float:
    """The schedule as l2bn wrote it by hand before torch's schedulers (fractional epoch t, stepped per batch)."""
    if t < recipe.warmup_epochs:
        return (t + 1e-8) / recipe.warmup_epochs
    if recipe.schedule == "cosine-restarts":
        return warm_restart_factor(recipe, t - recipe.warmup_epochs)
    if recipe.schedule == "cosine":
        span = recipe.epochs - recipe.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - recipe.warmup_epochs) / span)))
    if recipe.schedule == "step":
        return recipe.gamma ** sum(1 for m in recipe.milestones if math.floor(t + 1e-9) >= m)
    return 1.0


def scheduled_lrs(recipe, steps_per_epoch: int) -> list[float]:
    """The rate of every training step (and the one after the last), as the engine steps the schedule."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=recipe.lr, momentum=0.9, nesterov=True)
    sched = build_scheduler(opt, recipe, steps_per_epoch)
    seen = []
    for _ in range(recipe.epochs * steps_per_epoch):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen + [opt.param_groups[0]["lr"]]


SCHEDULE_VARIANTS = [
    *[(name, {}) for name in RECIPES],
    ("cifar-densenet", {"warmup_epochs": 3, "milestones": (4, 9), "epochs": 12}),
    ("cifar-resnet", {"schedule": "constant", "warmup_epochs": 2, "epochs": 6}),
    ("tau2020-fcnn", {"warmup_epochs": 2}),
]


@pytest.mark.parametrize("name, overrides", SCHEDULE_VARIANTS)
def test_torch_schedulers_give_the_written_out_rates(name, overrides):
    recipe = get_recipe(name, **overrides)
    steps_per_epoch = 7
    seen = scheduled_lrs(recipe, steps_per_epoch)
    expected = [recipe.lr * written_out_factor(recipe, s / steps_per_epoch) for s in range(len(seen))]
    assert seen == pytest.approx(expected, rel=1e-8, abs=1e-15 * recipe.lr)


def test_cosine_with_warmup_formula():
    r = get_recipe("cifar-regnet", lr=1.0)  # 5 warm-up epochs, 200 epochs, cosine to 0
    lrs = scheduled_lrs(r, 4)
    assert lrs[0] == pytest.approx(0.0, abs=1e-6)
    assert lrs[10] == pytest.approx(0.5, rel=1e-6)
    assert lrs[20] == pytest.approx(1.0)
    for t in (7.0, 50.0, 102.5, 180.0):
        assert lrs[int(4 * t)] == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 5) / 195)))
    assert lrs[800] == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_formula():
    r = get_recipe("cifar-densenet", lr=1.0)
    lrs = scheduled_lrs(r, 2)
    assert lrs[299] == 1.0
    assert lrs[300] == pytest.approx(0.1)
    assert lrs[449] == pytest.approx(0.1)
    assert lrs[450] == pytest.approx(0.01)
    assert set(scheduled_lrs(get_recipe("cifar-resnet", schedule="constant", epochs=5), 3)) == {0.1}
    with pytest.raises(ValueError, match="after the 5 warm-up epochs, got \\(5, 9\\)"):
        get_recipe("cifar-densenet", warmup_epochs=5, milestones=(5, 9))


def test_schedule_drives_a_real_optimizer_per_step():
    r = get_recipe("cifar-resnet", epochs=4, lr=0.2)
    seen = scheduled_lrs(r, 5)
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 20)) for s in range(20)]
    assert seen[:-1] == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)


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


def test_the_scheduler_runs_the_warm_restarts():
    recipe = get_recipe("tau2020-fcnn")
    lrs = scheduled_lrs(recipe, 4)
    for t in (0.0, 1.25, 2.0, 5.75, 100.25, 253.75):
        assert lrs[int(4 * t)] == recipe.lr * warm_restart_factor(recipe, t)
    assert lrs[8] == recipe.lr and lrs[7] < 0.01

"""The optimizer registry: one table read by the factory, the listing, the precision rules and the CLI."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import largebatch
from largebatch.optim.registry import OPTIMIZERS, optimizer_info, optimizer_names
from largebatch.train.precision import optimizer_overrides


def test_every_name_and_alias_builds_its_rows_class_with_its_options():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    for name in optimizer_names():
        info = optimizer_info(name)
        opt = largebatch.create_optimizer(name, model)
        assert type(opt) is info.cls
        for key, value in info.options.items():
            assert opt.defaults[key] == value, (name, key)


def test_aliases_case_and_dashes_resolve_to_one_row():
    assert optimizer_info("lamb") is optimizer_info("PAPER") is OPTIMIZERS["paper"]
    assert optimizer_info("lars") is OPTIMIZERS["lars_paper"] and optimizer_info("Torch-Optimizer").name == "torch_optimizer"
    assert optimizer_names()[:2] == ["lamb", "lars"] and len(set(optimizer_names())) == len(optimizer_names())


@pytest.mark.parametrize("name,exc", [("apex", ValueError), ("", ValueError), (5, TypeError), (None, TypeError)])
def test_unknown_names_name_the_choices(name, exc):
    with pytest.raises(exc, match=r"Invalid optimizer name: .* \(allowed: lamb \| lars \| paper"):
        optimizer_info(name)
    with pytest.raises(exc, match="Invalid optimizer name"):
        largebatch.create_optimizer(name, [torch.nn.Parameter(torch.zeros(1))])


def test_families_labels_and_precision_rules_come_from_the_rows():
    assert set(optimizer_names(family="lamb")) == {"lamb", "paper", "nvlamb", "torch_optimizer", "timm",
                                                    "authors_resnet"}
    assert optimizer_names(family="adamw") == ["adamw"]
    assert len({info.label for info in OPTIMIZERS.values()}) == len(OPTIMIZERS)
    for name, info in OPTIMIZERS.items():
        if info.master_weights:
            assert optimizer_overrides("bf16", name) == {"master_weights": True}
        else:
            with pytest.raises(ValueError, match="bf16"):
                optimizer_overrides("bf16", name)
    assert set(largebatch.PRESETS) == {n for n, i in OPTIMIZERS.items() if i.cls in (largebatch.Lamb, largebatch.Lars)}


def test_presets_cli_lists_the_registry():
    proc = subprocess.run([sys.executable, "-m", "largebatch.cli.main", "presets", "--json"],
                          capture_output=True, text=True, timeout=120)
    table = json.loads(proc.stdout)
    assert list(table) == list(OPTIMIZERS)
    assert table["paper"]["aliases"] == ["lamb"] and table["adamw"]["master_weights"] is False
    assert table["larc"]["groups"] == {"no_weight_decay_if": "bias_or_norm", "no_trust_ratio_if": "bias_or_norm"}

"""wegen/rules.py: the one home of seeds, sizes, decode/sampling bounds, the edit-mask rule and the shared
widgets; and the source checks that nothing outside it redefines them or reaches into the engine's privates."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from wegen import decoder, rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(*folders):
    for folder in folders:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, ROOT), f.read()


def test_rules_import_nothing_heavy():
    code = "import sys, wegen.rules; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_seed_range_and_wrapping():
    assert rules.seed_rows(5, 3) == [5, 6, 7]
    assert rules.seed_rows(rules.MAX_SEED, 3) == [rules.MAX_SEED, 0, 1]
    assert rules.check_seed(0) == 0 and rules.check_seed(rules.MAX_SEED) == rules.MAX_SEED
    for bad in (-1, rules.MAX_SEED + 1, 1.0, True, "3", None):
        with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.2\*\*64-1"):
            rules.check_seed(bad)
    with pytest.raises(ValueError, match=r"^--seed must be"):
        rules.seed_rows(-1, 2, "--seed")


@pytest.mark.parametrize("call, match", [
    (lambda: rules.check_size(100, 64), "width must be a positive multiple of 8 up to 4096, got 100"),
    (lambda: rules.check_size(64, 4104), "height must be a positive multiple of 8 up to 4096, got 4104"),
    (lambda: rules.check_size(True, 64), "width must be"),
    (lambda: rules.check_steps(0), r"steps must be an integer in 1\.\.1000, got 0"),
    (lambda: rules.check_steps(True), "steps must be an integer"),
    (lambda: rules.check_decode_args(2, -0.5, 1.0), r"cfg \(guidance_scale\) must be >= 0"),
    (lambda: rules.check_decode_args(2, float("nan"), 1.0), r"cfg \(guidance_scale\) must be a finite number"),
    (lambda: rules.check_decode_args(2, float("inf"), 1.0), r"cfg \(guidance_scale\) must be a finite number"),
    (lambda: rules.check_strength(1.5), r"strength must be in 0\.\.1"),
    (lambda: rules.check_feather(257), r"feather must be an integer in 0\.\.256 pixels, got 257"),
    (lambda: rules.check_sampling(-1, 1.0, 8), "temperature must be >= 0"),
    (lambda: rules.check_sampling(0, 0, 8), r"top_p must be in \(0, 1\]"),
    (lambda: rules.check_sampling(0, 1, True), "max_new_tokens must be a positive integer"),
])
def test_checks_name_the_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_edit_threshold_for_nodes_chat_and_decoder():
    mask = torch.full((1, 8, 8), rules.EDIT_THRESHOLD)  # exactly on the threshold: nothing is edited
    assert rules.empty_mask_rows(mask) == [0]
    assert float(decoder.feather_weight(mask, 0).max()) == 0.0
    mask[0, 2, 3] = 0.51
    assert rules.empty_mask_rows(mask) == [] and float(decoder.feather_weight(mask, 0).sum()) == 1.0
    with pytest.raises(ValueError, match=r"mask row\(s\) \[1\] are empty \(no value > 0\.5\)"):
        rules.check_consistency(torch.zeros(2, 8, 8, 3), torch.cat([mask, mask * 0]), 0.5, 4, 8, 8)


def test_widget_keeps_option_order_and_refuses_unknown_options():
    kind, opts = rules.widget("seed", "tip", default=42, control_after_generate=False)
    assert kind == "INT" and list(opts) == ["default", "min", "max", "control_after_generate", "tooltip"]
    assert opts["default"] == 42 and opts["max"] == rules.MAX_SEED and opts["control_after_generate"] is False
    assert rules.widget("steps")[1]["tooltip"] == rules.STEPS_TIP
    with pytest.raises(ValueError, match="needs a tooltip"):
        rules.widget("strength")
    with pytest.raises(ValueError, match=r"has no options \['maximum'\]"):
        rules.widget("steps", maximum=3)
    choices, opts = rules.widget("feature_slice")
    assert choices == ["official", "aligned", "checkpoint"] and opts["default"] == rules.CHECKPOINT_DEFAULT


def test_no_second_home_for_the_rules():
    """The seed range, the 0.5 edit threshold and the decode bounds are written only in wegen/rules.py."""
    patterns = {"MAX_SEED literal": r"0x[fF]{16}|1 << 64",
                "edit threshold": r"mask\w* > 0\.5|EDIT_THRESHOLD = ",
                "size rule": r"% 8\b|MAX_SIDE = ", "steps bound": r"<= 1000\b"}
    found = []
    for path, text in _sources("wegen", "nodes"):
        if path == os.path.join("wegen", "rules.py"):
            continue
        for name, pattern in patterns.items():
            found += [f"{path}: {name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert found == []


def test_nothing_outside_the_engine_calls_its_private_methods():
    private = re.compile(r"\b(?:engine|eng|e|self\.engine|fresh_engine)\._[a-z]\w*")
    found = [f"{path}: {m.group(0)}" for path, text in _sources("wegen", "nodes", "bench", "tests")
             if path != os.path.join("wegen", "engine.py") for m in private.finditer(text)]
    assert found == []

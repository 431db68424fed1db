"""`python -m wegen eval-toy` (wegen/toyeval.py): the figures, the floors, the command line.

Scoring is checked on stand-in engines whose answers are known (a perfect one, one that ignores edits, one
that draws nothing), the whole path end to end on a tiny random checkpoint, and the shipped toy checkpoint
against its floors (marker `toy_eval`, skipped when checkpoints/wegen-toy is absent).
"""
from __future__ import annotations

import itertools
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from wegen import cli, loading, toyeval
from wegen import toyworld as tw

RECOMMENDED = {"steps": 2, "cfg": 2.0, "width": 64, "height": 64, "feature_slice": "aligned"}
SHIPPED = os.path.join(loading.BUNDLED_DIR, "wegen-toy")


def _picture(attrs: dict | None) -> torch.Tensor:
    img = tw.render(tw.Scene(**attrs)) if attrs else tw.render(tw.Scene("small", "red", "square", "center", "gray"))
    out = torch.from_numpy(img).float() / 255.0
    if attrs is None:  # nothing drawn: the background only
        out[:] = out[0, 0]
    return out


class OracleEngine:
    """Draws exactly what a full description says, reads pictures by the rules, reconstructs perfectly.

    mode "perfect"; "lazy": chat turns ignore edits; "wrong": they change the attribute to another value than
    asked; "blank": every picture is the background alone; "echo": the first rewrite is the prompt itself; "drift": the
    first rewrite changes a given attribute.
    Records the settings and seed of every call.
    """

    def __init__(self, mode="perfect"):
        self.mode, self.calls, self.sessions = mode, [], {}
        self.recommended = dict(RECOMMENDED, steps=3)  # not the decode defaults: every call must pass them

    def _record(self, kind, seed, **settings):
        self.calls.append((kind, seed, settings))

    def _draw(self, attrs):
        return _picture(None if self.mode == "blank" else attrs)

    def generate(self, prompts, seed, steps, cfg, width, height, feature_slice):
        for s in seed:
            self._record("generate", s, steps=steps, cfg=cfg, width=width, height=height, feature_slice=feature_slice)
        return torch.stack([self._draw(tw.parse_description(p)) for p in prompts]), None

    def understand(self, images, question, max_new_tokens, seed):
        assert question == tw.QUESTION and images.shape == (1, 64, 64, 3)
        return tw.describe(tw.read(images[0].numpy()))

    def reconstruct(self, images, seed, steps, cfg, width, height):
        for s in seed:
            self._record("reconstruct", s, steps=steps, cfg=cfg, width=width, height=height)
        return torch.stack([self._draw(tw.read(img.numpy())) for img in images])

    def chat_turn(self, engine, root, name, message, *, seed, steps, cfg, width, height, feature_slice):
        self._record("chat", seed, steps=steps, cfg=cfg, width=width, height=height, feature_slice=feature_slice)
        key = (root, name)
        if key not in self.sessions:
            self.sessions[key] = tw.parse_description(message)
        elif self.mode != "lazy":
            attribute, value = tw.parse_edit(message)
            if self.mode == "wrong":  # another value where there is one (sizes have two: left as they were)
                value = next((v for v in tw.CHOICES[attribute] if v not in (value, self.sessions[key][attribute])),
                             self.sessions[key][attribute])
            self.sessions[key] = dict(self.sessions[key], **{attribute: value})
        return SimpleNamespace(image=self._draw(self.sessions[key])[None])

    def rewrite_prompt(self, engine, prompt, n, *, seed, max_new_tokens):
        given = tw.parse_description(prompt)
        free = [a for a in tw.ATTRIBUTES if not given[a]]
        fills = [dict(given, **dict(zip(free, values))) for values in itertools.product(*(tw.CHOICES[a] for a in free))]
        fills = random.Random(seed).sample(fills, n)
        if self.mode == "drift":
            a = next(a for a in tw.ATTRIBUTES if given[a])
            fills[0] = dict(fills[0], **{a: next(v for v in tw.CHOICES[a] if v != given[a])})
        prompts = [tw.describe(f) for f in fills]
        return SimpleNamespace(prompts=[prompt] + prompts[1:] if self.mode == "echo" else prompts)


@pytest.fixture
def oracle(monkeypatch):
    def make(mode="perfect"):
        engine = OracleEngine(mode)
        monkeypatch.setattr(toyeval.chat, "chat_turn", engine.chat_turn)
        monkeypatch.setattr(toyeval.rewrite, "rewrite_prompt", engine.rewrite_prompt)
        return engine
    return make


def test_a_perfect_engine_scores_one_everywhere_with_its_recommended_settings(oracle):
    engine = oracle()
    result = toyeval.run_eval(engine, n=6, seed=5)
    figures = result["figures"]
    assert list(figures) == list(toyeval.FIGURES) and list(result["counts"]) == list(toyeval.FIGURES)
    assert figures["rewrite.distinct_of_6"] == 6.0
    assert all(v == 1.0 for k, v in figures.items() if k != "rewrite.distinct_of_6" and not k.startswith("diic.")), \
        figures
    assert figures["diic.precision"] is not None  # the DIIC run's own quality is tests/test_diic.py's business
    assert result["counts"]["t2i.all_five"] == 6 and result["counts"]["rewrite.valid"] == 3 * toyeval.REWRITES
    assert result["counts"]["rewrite.t2i_all_five"] == 3 * toyeval.REWRITES
    assert result["settings"] == engine.recommended
    chat_calls = [c for c in engine.calls if c[0] == "chat"]
    assert len(chat_calls) == 3 * 6  # three turns per session
    for kind, _, settings in engine.calls:
        assert settings == {k: engine.recommended[k] for k in settings}, (kind, settings)
    seeds = [s for _, s, _ in engine.calls]
    assert len(set(seeds)) == len(seeds)  # a seed of its own per item
    assert set(result["seconds"]) == {"t2i", "edit", "chain", "understand", "reconstruct", "rewrite", "diic"}


def test_the_same_seed_gives_the_same_items_another_seed_others(oracle):
    first, again, other = oracle(), oracle(), oracle()
    toyeval.run_eval(first, n=3, seed=1)
    toyeval.run_eval(again, n=3, seed=1)
    toyeval.run_eval(other, n=3, seed=2)
    assert first.calls == again.calls and first.calls != other.calls


def test_an_engine_that_ignores_edits_keeps_everything_and_changes_nothing(oracle):
    figures = toyeval.run_eval(oracle("lazy"), n=8, seed=0)["figures"]
    assert figures["edit.change_made"] == 0.0 and figures["chain.all_five"] == 0.0
    assert figures["edit.others_kept"] == 1.0
    assert all(figures[f"edit.kept.{a}"] == 1.0 for a in tw.ATTRIBUTES)
    assert figures["t2i.all_five"] == 1.0


def test_an_engine_that_edits_the_right_attribute_wrongly_makes_no_change(oracle):
    figures = toyeval.run_eval(oracle("wrong"), n=8, seed=0)["figures"]
    assert figures["edit.change_made"] == 0.0 and figures["chain.all_five"] == 0.0
    assert figures["edit.others_kept"] == 1.0


def test_partial_rewrites_are_invalid_and_never_drawn_drifting_ones_do_not_keep(oracle):
    engine = oracle("echo")
    result = toyeval.run_eval(engine, n=4, seed=0)
    figures, counts = result["figures"], result["counts"]
    assert figures["rewrite.valid"] == round(5 / 6, 4) and figures["rewrite.keeps_given"] == 1.0
    assert figures["rewrite.distinct_of_6"] == 5.0
    assert counts["rewrite.t2i_all_five"] == 2 * 5 and figures["rewrite.t2i_all_five"] == 1.0
    drift = toyeval.run_eval(oracle("drift"), n=4, seed=0)["figures"]
    assert drift["rewrite.valid"] == 1.0 and drift["rewrite.keeps_given"] == round(5 / 6, 4)


def test_pictures_without_an_object_are_wrong_and_keep_nothing(oracle):
    figures = toyeval.run_eval(oracle("blank"), n=6, seed=0)["figures"]
    for key in ("t2i.all_five", "edit.change_made", "edit.others_kept", "chain.all_five", "reconstruct.all_five",
                "rewrite.t2i_all_five", *(f"edit.kept.{a}" for a in tw.ATTRIBUTES[:4])):
        assert figures[key] == 0.0, key
    assert figures["rewrite.valid"] == figures["understand.all_five"] == 1.0  # the texts are still right


def test_a_rewrite_call_that_gives_up_counts_as_six_invalid_rewrites(oracle, monkeypatch):
    engine = oracle()

    def gives_up(*args, **kwargs):
        raise ValueError("got only 2 distinct non-empty rewrites")

    monkeypatch.setattr(toyeval.rewrite, "rewrite_prompt", gives_up)
    result = toyeval.run_eval(engine, n=2, seed=0)
    assert result["figures"]["rewrite.valid"] == 0.0 and result["counts"]["rewrite.valid"] == toyeval.REWRITES
    assert result["figures"]["rewrite.t2i_all_five"] is None and result["counts"]["rewrite.t2i_all_five"] == 0


def test_check_floors_flags_figures_below_and_passes_those_above():
    result = {"figures": {"t2i.all_five": 0.4, "edit.change_made": 0.9, "rewrite.t2i_all_five": None}}
    assert toyeval.check_floors(result, {"t2i.all_five": 0.3, "edit.change_made": 0.9}) == []
    below = toyeval.check_floors(result, {"t2i.all_five": 0.5, "edit.change_made": 0.5})
    assert len(below) == 1 and below[0].startswith("t2i.all_five 0.400 < 0.500")
    assert toyeval.check_floors(result, {"rewrite.t2i_all_five": 0.1}) == ["rewrite.t2i_all_five n/a < 0.100"]
    assert toyeval.check_floors(result, {"rewrite.t2i_all_five": 0.0}) == []
    assert set(toyeval.FLOORS) <= set(toyeval.FIGURES)


def test_table_marks_figures_below_their_floor(oracle):
    result = toyeval.run_eval(oracle("lazy"), n=2, seed=0)
    table = toyeval.format_table(result, {"edit.change_made": 0.5, "edit.others_kept": 0.5})
    rows = {line.split()[0]: line for line in table.splitlines()[2:-1]}
    assert rows["edit.change_made"].endswith(" <") and not rows["edit.others_kept"].endswith(" <")
    assert len(rows) == len(toyeval.FIGURES)


# Command line -----------------------------------------------------------------------------------------

@pytest.fixture
def no_engine(monkeypatch):
    """Loading an engine fails the test: bad inputs must be refused before any work."""
    from wegen.engine import WeGenEngine

    def refuse(*args, **kwargs):
        raise AssertionError("an engine was loaded")
    monkeypatch.setattr(WeGenEngine, "load", refuse)


@pytest.mark.parametrize("extra, words", [
    (["--n", "0"], "--n must be"),
    (["--n", "-3"], "--n must be"),
    (["--seed", "-1"], "--seed must be"),
    (["--device", "nowhere"], "--device"),
    (["--checkpoint", "/nonexistent/wegen-ckpt"], "checkpoint folder not found"),
])
def test_cli_bad_inputs_exit_2_with_one_line(no_engine, capsys, tmp_path, extra, words):
    argv = ["eval-toy", "--checkpoint", str(tmp_path), *extra]  # tmp_path: not a checkpoint, checked last
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_cli_unwritable_json_exits_2(no_engine, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / loading.CONVERTED_CONFIG).write_text("{}")  # found as a checkpoint (never loaded)
    assert cli.main(["eval-toy", "--checkpoint", str(tmp_path / "ckpt"), "--json", str(blocker / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be written" in err


def test_cli_default_checkpoint_missing_exits_2(no_engine, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "BUNDLED_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval-toy", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "toy checkpoint" in err and "train-toy" in err


def test_cli_floors_exit_1_listing_the_figures_below(oracle, monkeypatch, capsys, tmp_path):
    from wegen.engine import WeGenEngine

    monkeypatch.setattr(WeGenEngine, "load", classmethod(lambda cls, *a, **k: OracleEngine("lazy")))
    monkeypatch.setattr(toyeval, "FLOORS", {"edit.change_made": 0.5, "edit.others_kept": 0.5})
    oracle("lazy")
    argv = ["eval-toy", "--checkpoint", "/tmp", "--n", "2", "--device", "cpu"]
    monkeypatch.setattr(toyeval, "_check_checkpoint", lambda checkpoint: None)
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--floors"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: 1 figure(s) below floor: edit.change_made 0.000 < 0.500"), err


# The real engine --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_converted(tiny_ckpt, tmp_path_factory):
    """The tiny random checkpoint, converted, recommending 2 steps at 64x64 (the eval must use them)."""
    dst = loading.convert(tiny_ckpt, str(tmp_path_factory.mktemp("toyeval") / "tiny"))
    path = os.path.join(dst, loading.CONVERTED_CONFIG)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["recommended"] = RECOMMENDED
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return dst


def _run_cli(argv, capsys) -> tuple[int, dict, str]:
    rc = cli.main(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1]), out


def test_eval_runs_end_to_end_on_a_tiny_checkpoint(tiny_converted, tmp_path, capsys, one_thread):
    out_json = tmp_path / "sub" / "eval.json"
    rc, line, out = _run_cli(["eval-toy", "--checkpoint", tiny_converted, "--n", "2", "--seed", "7",
                              "--json", str(out_json), "--device", "cpu", "--dtype", "fp32"], capsys)
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result == line and not [p for p in os.listdir(out_json.parent) if p != "eval.json"]
    assert list(result["figures"]) == list(toyeval.FIGURES)
    assert result["settings"] == RECOMMENDED and result["n"] == 2 and result["seed"] == 7
    for key, value in result["figures"].items():
        top = toyeval.REWRITES if key == "rewrite.distinct_of_6" else 1.0
        assert value is None or 0.0 <= value <= top, (key, value)
    counts = result["counts"]
    assert counts["t2i.all_five"] == counts["edit.change_made"] == counts["chain.all_five"] == 2
    assert counts["understand.valid"] == counts["reconstruct.all_five"] == 2
    assert counts["rewrite.valid"] == toyeval.REWRITES and counts["rewrite.distinct_of_6"] == 1
    assert result["figures"]["diic.precision"] is not None
    assert "t2i.all_five" in out and all(v >= 0 for v in result["seconds"].values())


@pytest.mark.integration
@pytest.mark.toy_eval
def test_shipped_toy_checkpoint_meets_its_floors(tmp_path, capsys, one_thread):
    if not os.path.isfile(os.path.join(SHIPPED, loading.CONVERTED_CONFIG)):
        pytest.skip(f"no shipped toy checkpoint at {SHIPPED}")
    rc, result, out = _run_cli(["eval-toy", "--n", "12", "--floors", "--json", str(tmp_path / "toy.json")], capsys)
    assert rc == 0, capsys.readouterr().err + out
    assert list(result["figures"]) == list(toyeval.FIGURES) and result["counts"]["t2i.all_five"] == 12

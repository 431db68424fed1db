"""Prompt Self-Rewriting (extension): determinism, K distinct, one batched decode, re-sampling, caps, errors, CLI."""
from __future__ import annotations

import json

import pytest

from wegen import rewrite
from wegen.mllm import RowResult

TOKENS = 8  # tiny model: gibberish text; short keeps the tests fast


def _rewrite(engine, prompt="a cat", n=4, **kw):
    kw.setdefault("max_new_tokens", TOKENS)
    return rewrite.rewrite_prompt(engine, prompt, n, **kw)


def test_same_seed_same_rewrites_other_seed_others(engine):
    a = _rewrite(engine, n=3, seed=7)
    b = _rewrite(engine, n=3, seed=7)
    c = _rewrite(engine, n=3, seed=8)
    assert a.prompts == b.prompts and a.seeds == b.seeds
    assert a.prompts != c.prompts


def test_k_distinct_nonempty_capped(engine):
    r = _rewrite(engine, n=5, seed=3, max_chars=24)
    assert len(r.prompts) == 5
    keys = {rewrite.dedupe_key(p) for p in r.prompts}
    assert len(keys) == 5 and all(r.prompts) and all(len(p) <= 24 for p in r.prompts)
    assert all("\n" not in p for p in r.prompts)
    assert [rec["index"] for rec in r.records()] == list(range(5))


def test_all_k_in_one_batched_decode(engine, monkeypatch):
    calls = []
    real = engine.generate_tokens

    def spy(rows_ids, rows_features, settings, seeds, callback):
        calls.append((len(rows_ids), list(seeds), settings.allow_image, settings.temperature))
        return real(rows_ids, rows_features, settings, seeds, callback)

    monkeypatch.setattr(engine, "generate_tokens", spy)
    r = _rewrite(engine, n=4, seed=100, temperature=1.5, top_p=0.9)
    assert calls[0] == (4, [100, 101, 102, 103], False, 1.5)
    assert len(calls) == r.rounds


def test_keep_original_is_first_and_distinct(engine):
    r = _rewrite(engine, "  a   red  fox ", n=3, seed=1, keep_original=True)
    assert r.prompts[0] == "a red fox" and r.seeds[0] is None
    assert r.records()[0]["original"] is True
    assert len({rewrite.dedupe_key(p) for p in r.prompts}) == 3


def _scripted(engine, monkeypatch, rounds):
    """engine.generate_tokens returns scripted replies (one list per round); records the seeds asked for."""
    asked = []
    replies = iter(rounds)

    def fake_decode(rows_ids, rows_features, settings, seeds, callback):
        texts = next(replies)
        assert len(texts) == len(rows_ids) == len(seeds)
        asked.append(list(seeds))
        return [RowResult(ids=[i]) for i in range(len(texts))], texts

    def decode(rows_ids, rows_features, settings, seeds, callback):
        results, texts = fake_decode(rows_ids, rows_features, settings, seeds, callback)
        for r, t in zip(results, texts):
            r.ids = [t]
        return results

    monkeypatch.setattr(engine, "generate_tokens", decode)
    monkeypatch.setattr(engine, "reply_text", lambda ids: ids[0])
    return asked


def test_duplicates_and_empties_resampled_with_fresh_seeds(engine, monkeypatch):
    asked = _scripted(engine, monkeypatch, [["A cat", "a   CAT", "", "dog <img> "], ["cow", "Dog"], ["bird"]])
    r = rewrite.rewrite_prompt(engine, "x", 4, seed=10)
    assert r.prompts == ["A cat", "dog", "cow", "bird"]
    assert asked == [[10, 11, 12, 13], [14, 15], [16]]
    assert r.seeds == [10, 13, 14, 16] and r.rounds == 3


def test_duplicate_of_kept_original_is_resampled(engine, monkeypatch):
    asked = _scripted(engine, monkeypatch, [["A CAT", "tiger"], ["lion"]])
    r = rewrite.rewrite_prompt(engine, "a cat", 3, seed=0, keep_original=True)
    assert r.prompts == ["a cat", "tiger", "lion"] and asked == [[0, 1], [2]]


def test_still_short_after_max_rounds_is_a_clear_error(engine, monkeypatch):
    _scripted(engine, monkeypatch, [["same", "same"], ["same"]])
    with pytest.raises(ValueError, match=r"only 1 distinct .* n=2 after 2 batched decodes"):
        rewrite.rewrite_prompt(engine, "x", 2, seed=0, max_rounds=2)


def test_finalize_cleans_and_caps():
    assert rewrite.finalize("<img>Prompt:  \"a big\n red\x07 barn\" </img>", 100) == "a big red barn"
    assert rewrite.finalize("one two three four five", 13) == "one two three"
    assert rewrite.finalize("abcdefghijklmnop", 8) == "abcdefgh"


def test_template_is_editable_and_braces_are_kept(engine, monkeypatch):
    assert rewrite.build_request("Make {prompt} grand {style}", " a {b} ") == "Make a {b} grand {style}"
    seen = []
    real = engine.generate_tokens

    def spy(rows_ids, *args):
        seen.append(engine.tokenizer.decode(rows_ids[0]))
        return real(rows_ids, *args)

    monkeypatch.setattr(engine, "generate_tokens", spy)
    _rewrite(engine, "a lighthouse", n=1, template="Describe {prompt} as an oil painting.")
    assert "Describe a lighthouse as an oil painting." in seen[0] and "[INST]" in seen[0]


@pytest.mark.parametrize("kw, match", [
    (dict(n=0), r"n \(number of rewrites, K\) must be an integer in 1\.\.256, got 0"),
    (dict(n=-2), r"got -2"),
    (dict(n=2.0), r"n \(number of rewrites"),
    (dict(temperature=-0.1), r"temperature must be a number >= 0 .*got -0\.1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be in"),
    (dict(max_new_tokens=0), r"max_new_tokens must be"),
    (dict(max_chars=2), r"max_chars .* >= 8, got 2"),
    (dict(template="no placeholder"), r"template must be a string containing \{prompt\} exactly once"),
    (dict(temperature=0.0, n=3), r"temperature 0 decodes greedily"),
    (dict(seed=-1), r"seed must be an integer in 0\.\.2\*\*64-1, got -1"),
    (dict(max_rounds=0), r"max_rounds"),
    (dict(prompt="  "), r"prompt must be a non-empty string"),
])
def test_bad_inputs_fail_before_any_decode(engine, monkeypatch, kw, match):
    monkeypatch.setattr(engine, "generate_tokens", _never)
    args = dict(prompt="a cat", n=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        rewrite.rewrite_prompt(engine, args.pop("prompt"), args.pop("n"), **args)


def _never(*args, **kwargs):
    raise AssertionError("decode must not run for bad input")


def test_greedy_single_rewrite_allowed(engine):
    a = _rewrite(engine, n=1, temperature=0.0, seed=1)
    b = _rewrite(engine, n=1, temperature=0.0, seed=99)
    assert a.prompts == b.prompts  # greedy ignores the seed


def test_cli_rewrite_prints_one_json_line_per_rewrite(engine, tiny_ckpt, capsys):
    from wegen.cli import main

    rc = main(["rewrite", "--checkpoint", tiny_ckpt, "--dtype", "fp32", "--device", "cpu", "--prompt", "a cat",
               "-n", "3", "--seed", "5", "--max-new-tokens", str(TOKENS)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == [0, 1, 2] and records[0]["seed"] == 5
    assert [r["prompt"] for r in records] == _rewrite(engine, n=3, seed=5).prompts


@pytest.mark.parametrize("extra, match", [
    (["-n", "0"], "n (number of rewrites, K) must be an integer in 1..256, got 0"),
    (["-n", "2", "--temperature", "-1"], "temperature must be a number >= 0"),
    (["-n", "2", "--template", "@/nonexistent/template.txt"], "--template @/nonexistent/template.txt: cannot read"),
])
def test_cli_rewrite_bad_input_exit_2(tiny_ckpt, capsys, extra, match):
    from wegen.cli import main

    rc = main(["rewrite", "--checkpoint", tiny_ckpt, "--prompt", "a cat", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1

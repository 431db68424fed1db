"""Diversity sweeps (extension): batching == singles, memory budget, sweep.json replay bit for bit, resume, CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from host_stubs import InterruptProcessingException
from wegen import sweep as sw

PROMPTS = ["a cat", "a red bicycle on a long road at dusk", "tree"]
SEEDS = [5, 9]
FAST = sw.SweepSettings(steps=2, width=64, height=64)  # 3 x 2 = 6 images of 64 px, 2 Euler steps


@pytest.fixture(scope="module")
def one_batch(engine):
    """The sweep with every stage in a single batch (the default budget fits the tiny model)."""
    return sw.sweep(engine, PROMPTS, SEEDS, FAST)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _u8(image: torch.Tensor) -> np.ndarray:
    return np.clip(255.0 * image.numpy() + 0.5, 0, 255).astype(np.uint8)


def test_result_layout_is_prompt_major(one_batch):
    r = one_batch
    assert r.images.shape == (6, 64, 64, 3) and r.images.dtype == torch.float32
    assert r.prompts == [p for p in PROMPTS for _ in SEEDS] and r.seeds == SEEDS * 3
    assert r.captions[3] == f"#1 seed 9: {PROMPTS[1]}"
    assert r.features.shape == (3, 64, 112)
    assert r.contact_sheet.ndim == 4 and r.contact_sheet.shape[0] == 1 and r.contact_sheet.shape[-1] == 3
    assert r.manifest["encode_batches"] == [[0, 1, 2]] and r.manifest["decode_batches"] == [list(range(6))]


def test_batched_equals_sequential(engine, one_batch):
    for k, prompt in enumerate(PROMPTS):
        single = engine.encode(prompt, seed=FAST.encode_seed + k).features[0]
        assert (single - one_batch.features[k]).abs().max() < 1e-5
        for s, seed in enumerate(SEEDS):
            image = engine.decode_pixels(single[None], seed=seed, steps=2, width=64, height=64)[0]
            assert (image - one_batch.images[k * 2 + s]).abs().max() < 1e-4


def test_diversity_figures(one_batch):
    d = one_batch.diversity
    assert set(d) == {"features_cosine", "features_rms", "pixels_rms", "n_prompts", "n_images"}
    assert d["features_cosine"] > 0 and d["features_rms"] > 0 and d["pixels_rms"] > 0
    same = sw.diversity(one_batch.features[:1].repeat(3, 1, 1), one_batch.images[:1].repeat(4, 1, 1, 1))
    assert same["features_cosine"] < 1e-9 and same["features_rms"] == 0 and same["pixels_rms"] == 0
    f = torch.zeros(2, 64, 112)
    f[0, 0, 0], f[1, 0, 1] = 1.0, 1.0  # orthogonal: cosine distance 1
    white_black = torch.stack([torch.ones(8, 8, 3), torch.zeros(8, 8, 3)])
    d2 = sw.diversity(f, white_black)
    assert d2["features_cosine"] == pytest.approx(1.0) and d2["pixels_rms"] == pytest.approx(1.0)


def test_memory_budget_bounds_the_batches(engine):
    info = sw.engine_info(engine)
    small, big = sw.item_bytes(info, 64, 64, 2.0), sw.item_bytes(info, 256, 256, 2.0)
    assert 0 < small < big and sw.item_bytes(info, 64, 64, 1.0) <= small
    budget_mb = (3 * small) // 2 ** 20 + 1  # room for 3, not 4
    settings = sw.SweepSettings(steps=2, width=64, height=64, memory_budget_mb=budget_mb)
    fits = budget_mb * 2 ** 20 // small
    plan = sw.make_plan(info, PROMPTS, [1, 2, 3, 4], settings)
    assert all(len(b) <= fits for b in plan.decode_batches) and max(map(len, plan.decode_batches)) == fits
    assert sum(plan.decode_batches, []) == list(range(12))
    capped = sw.make_plan(info, PROMPTS, [1, 2, 3, 4], sw.SweepSettings(width=64, height=64, max_batch=5))
    assert [len(b) for b in capped.decode_batches] == [5, 5, 2]
    tiny = sw.make_plan(info, PROMPTS, [1], sw.SweepSettings(width=64, height=64, memory_budget_mb=1))
    assert tiny.decode_batches == [[0], [1], [2]] or small <= 2 ** 20


@pytest.fixture(scope="module")
def written(engine, tmp_path_factory):
    """The sweep written to a folder in 3 decode batches of 2: (result, out dir)."""
    out = str(tmp_path_factory.mktemp("sweep") / "full")
    return sw.sweep(engine, PROMPTS, SEEDS, BATCHES_OF_2, out_dir=out), out


BATCHES_OF_2 = sw.SweepSettings(steps=2, width=64, height=64, max_batch=2)


def test_sweep_json_reproduces_an_image_bit_for_bit(engine, written):
    result, out = written
    manifest = sw.load_manifest(os.path.join(out, "sweep.json"))
    assert manifest["decode_batches"] == [[0, 1], [2, 3], [4, 5]]
    for key in ("prompts", "seeds", "settings", "engine", "items", "encode_batches", "diversity"):
        assert key in manifest
    assert manifest["items"][3]["prompt"] == PROMPTS[1] and manifest["items"][3]["seed"] == 9
    again = sw.reproduce(engine, manifest, 3)
    assert torch.equal(again[0], result.images[3])
    assert np.array_equal(_u8(again[0]), _png(os.path.join(out, manifest["items"][3]["file"])))
    assert os.path.isfile(os.path.join(out, "contact_sheet.png"))
    with pytest.raises(ValueError, match=r"index must be an item of the sweep, 0\.\.5, got 6"):
        sw.reproduce(engine, manifest, 6)


def test_cli_replay_writes_the_same_png(written, tiny_ckpt, tmp_path, capsys):
    from wegen.cli import main

    _, out = written
    manifest = sw.load_manifest(out)
    rc = main(["sweep", "--replay", os.path.join(out, "sweep.json"), "--index", "4", "--checkpoint", tiny_ckpt,
               "--out", str(tmp_path / "again.png")])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(_png(tmp_path / "again.png"), _png(os.path.join(out, manifest["items"][4]["file"])))


class _Interrupt(Exception):
    pass


def _stop_after_first_batch(done, total):
    raise _Interrupt


class _Counting(sw.LocalExecutor):
    def __init__(self, engine):
        super().__init__(engine)
        self.encoded = self.decoded = 0

    def encode(self, jobs, settings):
        for out in super().encode(jobs, settings):
            self.encoded += 1
            yield out

    def decode(self, jobs, settings):
        for out in super().decode(jobs, settings):
            self.decoded += 1
            yield out


def test_resume_skips_finished_batches_and_matches_an_uninterrupted_run(engine, written, tmp_path):
    full, full_dir = written
    out = str(tmp_path / "cut")
    with pytest.raises(_Interrupt):
        sw.sweep(engine, PROMPTS, SEEDS, BATCHES_OF_2, out_dir=out, progress=_stop_after_first_batch)
    manifest = sw.load_manifest(out)
    assert [it["done"] for it in manifest["items"]] == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="already holds a sweep.json; pass resume"):
        sw.sweep(engine, PROMPTS, SEEDS, BATCHES_OF_2, out_dir=out)
    counting = _Counting(engine)
    resumed = sw.run_sweep(counting, PROMPTS, SEEDS, BATCHES_OF_2, out_dir=out, resume=True)
    assert counting.encoded == 0 and counting.decoded == 2  # features read back, 2 of 3 batches decoded
    assert sw.load_manifest(out)["status"] == "done"
    for it in manifest["items"]:
        assert np.array_equal(_png(os.path.join(out, it["file"])), _png(os.path.join(full_dir, it["file"])))
    assert torch.equal(resumed.images[2:], full.images[2:])
    assert resumed.diversity == full.diversity


def test_resume_with_other_settings_is_refused(engine, written, monkeypatch):
    _, out = written
    monkeypatch.setattr(engine, "encode", _never)
    other = sw.SweepSettings(steps=3, width=64, height=64, max_batch=2)
    with pytest.raises(ValueError, match="cannot resume .*its settings differs"):
        sw.sweep(engine, PROMPTS, SEEDS, other, out_dir=out, resume=True)
    with pytest.raises(ValueError, match="its seeds differs"):
        sw.sweep(engine, PROMPTS, [5, 6], BATCHES_OF_2, out_dir=out, resume=True)


@pytest.mark.parametrize("text, base, seeds", [("3", 10, [10, 11, 12]), ("7,42,1000", 0, [7, 42, 1000]),
                                               ("42,", 0, [42]), (" 2 ", 0, [0, 1])])
def test_parse_seeds(text, base, seeds):
    assert sw.parse_seeds(text, base) == seeds


@pytest.mark.parametrize("text, match", [("abc", "seeds must be a count .* or a comma list"),
                                         ("0", r"seeds count must be in 1\.\."), ("1,1", "must be distinct"),
                                         ("-3,4", r"each seed must be an integer in 0\.\.2\*\*64-1, got -3"),
                                         (",", "at least one seed")])
def test_parse_seeds_errors(text, match):
    with pytest.raises(ValueError, match=match):
        sw.parse_seeds(text)


@pytest.mark.parametrize("prompts, seeds, settings, match", [
    ([], [1], FAST, "prompts must be a non-empty list"),
    (["ok", " "], [1], FAST, "prompts must be a non-empty list of non-empty strings"),
    (["ok"], [], FAST, "at least one seed"),
    (["ok"], [1], sw.SweepSettings(steps=0, width=64, height=64), r"steps must be an integer in 1\.\.1000"),
    (["ok"], [1], sw.SweepSettings(steps=2, width=60, height=64), "width must be a positive multiple of 8"),
    (["ok"], [1], sw.SweepSettings(steps=2, memory_budget_mb=0), "memory_budget_mb must be a positive"),
    (["ok"], [1], sw.SweepSettings(steps=2, max_batch=0), "max_batch must be a positive"),
])
def test_bad_sweep_inputs(engine, prompts, seeds, settings, match, monkeypatch):
    monkeypatch.setattr(engine, "decode_pixels", _never)
    with pytest.raises(ValueError, match=match):
        sw.sweep(engine, prompts, seeds, settings)


def _never(*args, **kwargs):
    raise AssertionError("nothing may run for bad input")


def test_contact_sheet_captions_fit_and_wrap():
    from wegen.images import _wrap, contact_sheet

    images = torch.rand(5, 32, 48, 3)
    sheet = contact_sheet(images, [f"caption {i} " + "word " * 30 for i in range(5)], columns=2)
    assert sheet.shape[0] == 1 and sheet.shape[2] == 2 * (192 + 12) and sheet.shape[1] % 3 == 0
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(draw, "word " * 40 + "averyveryveryverylongwordthatcannotfit", ImageFont.load_default(size=12), 80, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    with pytest.raises(ValueError, match="N captions"):
        contact_sheet(images, ["one"], columns=2)


def test_cli_sweep_writes_pngs_sheet_and_manifest(engine, tiny_ckpt, tmp_path, capsys):
    from wegen.cli import main
    from wegen.rewrite import rewrite_prompt

    out = str(tmp_path / "cli")
    args = ["sweep", "--checkpoint", tiny_ckpt, "--dtype", "fp32", "--device", "cpu", "--prompt", "a cat", "-n", "2",
            "--seeds", "3,4", "--seed", "11", "--max-new-tokens", "6", "--steps", "2", "--size", "64", "--out", out]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["images"] == 4 and line["seeds"] == [3, 4] and "pixels_rms" in line["diversity"]
    manifest = sw.load_manifest(out)
    expected = rewrite_prompt(engine, "a cat", 2, seed=11, max_new_tokens=6)
    assert manifest["prompts"] == expected.prompts and manifest["rewrite"]["seeds"] == expected.seeds
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == \
        sorted([it["file"] for it in manifest["items"]] + ["contact_sheet.png"])
    assert main(args) == 2 and "add --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # everything done: nothing to redo, same manifest
    assert sw.load_manifest(out)["items"] == manifest["items"]


@pytest.mark.parametrize("extra, match", [
    (["-n", "0", "--seeds", "2"], "n (number of rewrites, K) must be an integer in 1..256, got 0"),
    (["-n", "2", "--seeds", "x"], "seeds must be a count"),
    (["-n", "2", "--temperature", "-0.5"], "temperature must be a number >= 0"),
    (["-n", "2", "--memory-budget", "0"], "memory_budget_mb must be a positive integer"),
    (["--seeds", "2"], "sweep needs --checkpoint DIR, --prompt TEXT, -n K and --out DIR"),
])
def test_cli_sweep_bad_input_exit_2(tiny_ckpt, tmp_path, capsys, extra, match):
    from wegen.cli import main

    rc = main(["sweep", "--checkpoint", tiny_ckpt, "--prompt", "a cat", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o" / "sweep.json")


def test_cli_sweep_ray_flag_reaches_the_ray_executor(engine, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """--ray [ADDRESS] and --ray-workers go to RayExecutor (stood in here by a local executor), which is closed."""
    import wegen.ray_sweep
    from wegen import cli

    seen = {}

    class FakeRay(sw.LocalExecutor):
        def __init__(self, checkpoint, address=None, *, dtype, device, workers, offload, **engine_kw):
            seen.update(checkpoint=checkpoint, address=address, workers=workers)
            assert offload == "none" and engine_kw == {"preset": "comfyui", "weight_dtype": "default"}
            super().__init__(engine)

        def close(self):
            seen["closed"] = True

    monkeypatch.setattr(wegen.ray_sweep, "RayExecutor", FakeRay)
    argv = ["sweep", "--checkpoint", tiny_ckpt, "--prompt", "a cat", "-n", "1", "--keep-original", "--seeds", "1",
            "--steps", "2", "--size", "64", "--out", str(tmp_path / "a")]
    rc = cli.main(argv + ["--ray", "ray://head:10001", "--ray-workers", "3"])
    assert rc == 0, capsys.readouterr().err
    assert seen == {"checkpoint": tiny_ckpt, "address": "ray://head:10001", "workers": 3, "closed": True}
    assert sw.load_manifest(str(tmp_path / "a"))["prompts"] == ["a cat"]
    cli._sweep_executor(cli.build_parser().parse_args(argv + ["--ray"]))
    assert seen["address"] is None and seen["workers"] is None  # bare --ray: a local Ray instance
    assert cli.build_parser().parse_args(argv).ray is None


def test_cli_sweep_ray_missing_is_a_clear_error(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import sys

    from wegen.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = main(["sweep", "--checkpoint", tiny_ckpt, "--prompt", "a cat", "-n", "1", "--keep-original",
               "--seeds", "1", "--out", str(tmp_path / "o"), "--ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "sweep --ray needs Ray" in err and "pip install" in err


# Nodes (stand-in ComfyUI host) ---------------------------------------------------------------------


@pytest.fixture
def model(comfy_host):
    from ComfyUI_WeGen.nodes.loader import WeGenLoader

    return WeGenLoader().load("tiny", "fp32", "cpu")[0]


def test_rewrite_node_outputs_a_string_list(pack_engine, model, comfy_host):
    from ComfyUI_WeGen.nodes.sweep import WeGenPromptSelfRewrite
    from ComfyUI_WeGen.wegen.rewrite import DEFAULT_TEMPLATE, rewrite_prompt

    node = WeGenPromptSelfRewrite
    assert node.OUTPUT_IS_LIST == (True,) and node.RETURN_TYPES == ("STRING",)
    assert node.INPUT_TYPES()["required"]["template"][1]["default"] == DEFAULT_TEMPLATE
    out = node().rewrite(model, "a cat", 3, 4, 0.9, 0.95, 6, 400, False, DEFAULT_TEMPLATE, unique_id="7")
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0] == rewrite_prompt(pack_engine, "a cat", 3, seed=4, max_new_tokens=6).prompts
    assert comfy_host.texts[-1][0] == "7" and comfy_host.texts[-1][1].startswith("1. ")
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        node().rewrite(model, "a cat", 3, 4, -1.0, 0.95, 6, 400, False, DEFAULT_TEMPLATE)


def test_sweep_node_returns_batch_list_and_sheet_and_saves_the_folder(pack_engine, model, comfy_host):
    from ComfyUI_WeGen.nodes import host as node_host
    from ComfyUI_WeGen.nodes.sweep import WeGenDiversitySweep
    from ComfyUI_WeGen.wegen import sweep as pack_sw  # the nodes' copy of the engine

    node = WeGenDiversitySweep
    assert node.INPUT_IS_LIST and node.OUTPUT_IS_LIST == (False, True, False) and node.OUTPUT_NODE
    out = node().sweep([model], ["a cat\n\n a dog "], [3], [2], [2], [2.0], [64], [64], [4096], [16],
                       ["wegen/sweeps/t"], unique_id=["9"])
    images, prompts, sheet = out["result"]
    assert images.shape == (4, 64, 64, 3) and sheet.shape[0] == 1 and sheet.shape[-1] == 3
    assert prompts == ["a cat", "a cat", "a dog", "a dog"]
    shown = out["ui"]["wegen_sweep"][0]
    assert shown["subfolder"] == "wegen/sweeps/t_00001" and shown["columns"] == 2 and shown["seeds"] == [3, 4] * 2
    folder = os.path.join(node_host.output_directory(), shown["subfolder"])
    assert all(os.path.isfile(os.path.join(folder, f)) for f in shown["images"] + ["contact_sheet.png", "sweep.json"])
    assert "pixels rms" in comfy_host.texts[-1][1] and comfy_host.updates, "progress reaches the ProgressBar"
    direct = pack_sw.sweep(pack_engine, ["a cat", "a dog"], [3, 4], pack_sw.SweepSettings(steps=2, width=64, height=64))
    assert torch.equal(images, direct.images)
    again = node().sweep([model], ["x"], [3], [1], [2], [2.0], [64], [64], [4096], [16], ["wegen/sweeps/t"])
    assert again["ui"]["wegen_sweep"][0]["subfolder"] == "wegen/sweeps/t_00002"  # each run: a new folder


def test_sweep_node_interrupt_stops_it(model, comfy_host):
    from ComfyUI_WeGen.nodes.sweep import WeGenDiversitySweep

    comfy_host.interrupt_at_update = 3
    with pytest.raises(InterruptProcessingException):
        WeGenDiversitySweep().sweep([model], ["a cat"], [3], [2], [2], [2.0], [64], [64], [4096], [16],
                                    ["wegen/sweeps/i"])


@pytest.mark.parametrize("change, match", [
    (dict(seed=[1, 2]), "seed must be a single value, got a list of 2; only prompts may be a list"),
    (dict(prompts=[" ", ""]), "prompts is empty"),
    (dict(save_to=["../escape"]), "save_to must be a folder prefix inside the output folder"),
    (dict(seeds=[0]), r"seeds \(how many seeds per prompt\) must be an integer in 1\.\.256, got 0"),
    (dict(width=[60]), "width must be a positive multiple of 8"),
])
def test_sweep_node_bad_inputs(model, comfy_host, change, match, monkeypatch):
    from ComfyUI_WeGen.nodes.sweep import WeGenDiversitySweep
    from ComfyUI_WeGen.wegen import sweep as pack_sw

    monkeypatch.setattr(pack_sw, "sweep", _never)
    kwargs = dict(model=[model], prompts=["a cat"], seed=[3], seeds=[2], steps=[2], cfg=[2.0], width=[64],
                  height=[64], memory_budget_mb=[4096], max_batch=[16], save_to=["wegen/sweeps/b"])
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        WeGenDiversitySweep().sweep(**kwargs)

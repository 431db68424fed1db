"""Training the toy WeGen (wegen.train): every stage runs and learns on small data, resumes bit-identically, exports
a checkpoint the engine loads. The stage-2 conversations (wegen.toydata) are tested in test_toydata.py.

All of it runs at the toy's real sizes for a few small-batch steps on one CPU thread (a few seconds a stage).
"""
import contextlib
import functools
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from wegen import diic, loading, toydata
from wegen import toyworld as W
from wegen.prompting import WeGenTokenizer
from wegen.train import common, export, stage1, stage2, tower
from wegen.train.toymodel import RECOMMENDED, SCHEDULER_TOY, train_toy_tokenizer

SEED = 0
BANK_SCENES = list(range(0, len(toydata.SCENES), 81))  # 12 scenes: a quick bank
REAL_PER_SCENE = 3


@contextlib.contextmanager
def recording():
    """{stage: [losses dict per step]} of every run_steps loop inside the block."""
    log = {}
    original = common.Progress.update

    def update(self, step, losses):
        log.setdefault(self.stage, []).append(dict(losses))
        return original(self, step, losses)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common.Progress, "update", update)
        yield log


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A working folder with every stage done for 2 small-batch steps (the inputs of the later stages)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("toy"))
    with recording() as losses:
        train_toy_tokenizer(os.path.join(out, "tokenizer"), SEED)
        tower.train_tower(out, 2, SEED, batch=8)
        tower.train_vae(out, 2, SEED, batch=4)
        tower.build_bank(out, SEED, real_per_scene=REAL_PER_SCENE, scenes=BANK_SCENES)
        tower.build_latents(out)
        diic.run(5, os.path.join(out, "diic"), seed=SEED)
        stage1.train_unet(out, 2, SEED, batch=4)
        stage2.train_mllm(out, 2, SEED, batch=2)
    yield SimpleNamespace(out=out, losses=losses)
    torch.set_num_threads(threads)


def _linked(toy, folder, names) -> str:
    """A fresh working folder holding links to the toy folder's finished inputs."""
    os.makedirs(folder)
    for name in names:
        os.symlink(os.path.join(toy.out, name), os.path.join(folder, name))
    return str(folder)


# StageState, lr schedule ---------------------------------------------------------------------------

def test_stage_state_save_load_restores_step_generators_weights_and_optimiser(tmp_path):
    def fresh(seed):
        state = common.StageState(seed, "probe")
        torch.manual_seed(1)
        net = torch.nn.Linear(3, 2)
        return state, net, torch.optim.AdamW(net.parameters(), lr=0.1)

    state, net, opt = fresh(7)
    for _ in range(3):
        state.rng.random(), torch.rand(2, generator=state.gen)
        net(torch.randn(4, 3, generator=state.gen)).sum().backward()
        opt.step()
        state.step += 1
    path = str(tmp_path / "probe.pt")
    state.save(path, {"net": net}, opt, extra={"note": 1})

    again, net2, opt2 = fresh(7)
    assert again.step == 0 and again.rng.getstate() != state.rng.getstate()
    assert again.load(path, {"net": net2}, opt2) == {"note": 1}
    assert again.step == 3
    assert again.rng.getstate() == state.rng.getstate()
    assert torch.equal(again.gen.get_state(), state.gen.get_state())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 3
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # both continue with the same draws
    assert again.rng.random() == state.rng.random()
    assert torch.equal(torch.rand(3, generator=again.gen), torch.rand(3, generator=state.gen))
    # weights only, as the next stage reads them
    _, net3, _ = fresh(0)
    assert common.load_modules(path, {"net": net3}) == {"note": 1}
    assert torch.equal(net3.weight, net.weight)
    with pytest.raises(ValueError, match="holds stage 'probe', not 'other'"):
        common.StageState(7, "other").load(path, {"net": net2}, opt2)
    assert not os.path.exists(path + ".tmp")


def test_stage_seeds_differ_by_seed_and_stage():
    assert common.stage_seed(0, "tower") == common.stage_seed(0, "tower")
    assert len({common.stage_seed(s, n) for s in (0, 1) for n in ("tower", "vae", "stage1")}) == 6


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    lrs = [common.cosine_lr(s, 100, 1.0, 10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.05) and common.cosine_lr(500, 100, 1.0, 10) == pytest.approx(0.05)


# Every stage runs, learns, and resumes bit-identically -----------------------------------------------

def test_every_stage_ran_and_saved(toy):
    for stage, name in (("tower", "tower.pt"), ("vae", "vae.pt"), ("stage1", "stage1.pt"), ("stage2", "stage2.pt")):
        data = torch.load(os.path.join(toy.out, name), map_location="cpu", weights_only=False)
        assert data["stage"] == stage and data["step"] == 2, stage
        assert len(toy.losses[stage]) == 2
        assert all(torch.isfinite(torch.tensor(v)) for losses in toy.losses[stage] for v in losses.values())
    assert set(toy.losses["tower"][0]) == {"ce", "patch"} and set(toy.losses["stage2"][0]) == {"ce", "mse", "cos"}
    assert torch.load(os.path.join(toy.out, "stage2.pt"), weights_only=False)["extra"]["feature_std"] > 0


@pytest.mark.integration
def test_tower_loss_falls(tmp_path):
    with recording() as log:
        tower.train_tower(str(tmp_path), 12, SEED, batch=16, lr=3e-2)
    ce, patch = [x["ce"] for x in log["tower"]], [x["patch"] for x in log["tower"]]
    assert sum(ce[-4:]) / 4 < 0.8 * sum(ce[:4]) / 4, ce
    assert sum(patch[-4:]) / 4 < 0.5 * sum(patch[:4]) / 4, patch


def _vae_error(path, x):
    vae = tower.new_vae()
    if path:
        common.load_modules(path, {"vae": vae})
    with torch.no_grad():
        return F.l1_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


@pytest.mark.integration
def test_vae_reconstruction_improves(tmp_path, one_thread):
    rng = random.Random(1)
    x = toydata.to_pixels(toydata.render_batch([W.random_scene(rng) for _ in range(8)])).permute(0, 3, 1, 2) * 2 - 1
    torch.manual_seed(common.stage_seed(SEED, "vae-init"))  # the VAE train_vae starts from
    before = _vae_error(None, x)
    path = tower.train_vae(str(tmp_path), 8, SEED, batch=4, lr=2e-2)
    after = _vae_error(path, x)
    assert after < before - 0.02, (before, after)


@pytest.mark.integration
def test_unet_learns_the_clean_latents(toy, tmp_path):
    """Stage 1's prediction target is the clean latent (prediction_type "sample"): the error on a fixed batch falls."""
    out = _linked(toy, tmp_path / "w", ["bank.pt", "latents.pt"])
    bank = torch.load(os.path.join(out, "bank.pt"))
    bank.update(torch.load(os.path.join(out, "latents.pt")))
    g = torch.Generator().manual_seed(0)
    x0, ctx = bank["latents"][:16], bank["real"][:16]
    t = torch.randint(0, 1000, (16,), generator=g)
    a = stage1.alphas_cumprod(SCHEDULER_TOY)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
    added = {"text_embeds": ctx.mean(1), "time_ids": torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(16, 6)}

    def error(path):
        torch.manual_seed(common.stage_seed(SEED, "stage1-init"))
        unet = stage1.new_unet()
        if path:
            common.load_modules(path, {"unet": unet})
        with torch.no_grad():
            return F.mse_loss(unet(x_t, t, ctx, added_cond_kwargs=added).sample, x0).item()

    before = error(None)
    with recording() as log:
        path = stage1.train_unet(out, 8, SEED, batch=8, lr=3e-2)
    assert len(log["stage1"]) == 8
    assert error(path) < 0.5 * before


@pytest.mark.integration
def test_mllm_losses_fall(toy, tmp_path):
    out = _linked(toy, tmp_path / "w", ["tokenizer", "tower.pt", "bank.pt", "diic"])
    tokenizer = WeGenTokenizer(os.path.join(out, "tokenizer"))
    data = stage2.Data(out, tokenizer, 64)
    rng = random.Random(0)
    batches = [data.batch(rng, 4) for _ in range(3)]

    def ce(path):
        torch.manual_seed(common.stage_seed(SEED, "stage2-init"))
        model = stage2.new_mllm(tokenizer.vocab_size)
        if path:
            common.load_modules(path, {"mllm": model})
        with torch.no_grad():
            return sum(stage2.losses(model, b, data.feature_std, None, "cpu")["ce"].item() for b in batches) / 3

    before = ce(None)
    path = stage2.train_mllm(out, 8, SEED, batch=4, lr=3e-2)
    assert ce(path) < 0.7 * before


class _Interrupted(Exception):
    pass


STAGE_RUNS = {  # stage -> (checkpoint, inputs from the toy folder, run(out, steps))
    "tower": ("tower.pt", [], lambda out, n: tower.train_tower(out, n, SEED, batch=4)),
    "vae": ("vae.pt", [], lambda out, n: tower.train_vae(out, n, SEED, batch=2)),
    "stage1": ("stage1.pt", ["bank.pt", "latents.pt"], lambda out, n: stage1.train_unet(out, n, SEED, batch=4)),
    "stage2": ("stage2.pt", ["tokenizer", "tower.pt", "bank.pt", "diic"],
               lambda out, n: stage2.train_mllm(out, n, SEED, batch=2)),
}


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.integration
@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_resumed_run_is_bit_identical(toy, tmp_path, monkeypatch, stage):
    """6 steps in one go == 4 steps, a kill during step 5 (after the save at 4), then a resumed run to 6.

    (4 + 2: stage 2's feed noise generator is first drawn from in step 4 with this seed, so its state matters.)"""
    name, inputs, run = STAGE_RUNS[stage]
    monkeypatch.setattr(common, "run_steps", functools.partial(common.run_steps, save_every=4))
    whole = _linked(toy, tmp_path / "whole", inputs)
    run(whole, 6)

    parts = _linked(toy, tmp_path / "parts", inputs)
    original = common.Progress.update

    def killed_at_5(self, step, losses):
        if step == 5:
            raise _Interrupted
        return original(self, step, losses)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common.Progress, "update", killed_at_5)
        with pytest.raises(_Interrupted):
            run(parts, 6)
    saved = torch.load(os.path.join(parts, name), weights_only=False)
    assert saved["step"] == 4
    with recording() as log:
        run(parts, 6)
    assert len(log[stage]) == 2  # steps 5 and 6 only

    a = torch.load(os.path.join(whole, name), weights_only=False)
    b = torch.load(os.path.join(parts, name), weights_only=False)
    assert a["step"] == b["step"] == 6
    assert a["rng"] == b["rng"]
    _same(a["gen"], b["gen"], "gen")
    _same(a["modules"], b["modules"], "modules")
    _same(a["optimizer"], b["optimizer"], "optimizer")
    _same(a["extra"], b["extra"], "extra")
    changed = [k for k, v in a["modules"][next(iter(a["modules"]))].items()
               if v.is_floating_point() and not torch.equal(v, saved["modules"][next(iter(a["modules"]))][k])]
    assert changed, "steps 5 and 6 changed no weight"


def test_finished_stage_is_not_trained_again(toy):
    before = os.path.getmtime(os.path.join(toy.out, "tower.pt"))
    with recording() as log:
        tower.train_tower(toy.out, 2, SEED, batch=8)
    assert "tower" not in log and os.path.getmtime(os.path.join(toy.out, "tower.pt")) == before


# Bank and latents ------------------------------------------------------------------------------------

def test_bank_and_latents(toy):
    bank = torch.load(os.path.join(toy.out, "bank.pt"))
    width = 64
    assert bank["canonical"].shape == (len(toydata.SCENES), 64, width)
    nonzero = [k for k in range(len(toydata.SCENES)) if bank["canonical"][k].abs().sum() > 0]
    assert nonzero == BANK_SCENES
    n = len(BANK_SCENES) * REAL_PER_SCENE
    assert bank["real"].shape == (n, 64, width) and bank["real_scene"].tolist() == [
        k for k in BANK_SCENES for _ in range(REAL_PER_SCENE)]
    assert bank["feature_std"] == pytest.approx(float(bank["real"].std()))
    # canonical = the mean over the 25 jitters; a real row = the tower's features of that jittered picture
    net = tower.new_tower(torch.Generator())
    common.load_modules(os.path.join(toy.out, "tower.pt"), {"tower": net})
    net.eval()
    k = BANK_SCENES[1]
    scenes = [W.Scene(**toydata.SCENES[k].attributes(), dx=dx, dy=dy) for dx, dy in toydata.jitters()]
    with torch.no_grad():
        feats = tower.tower_features(net, toydata.to_pixels(toydata.render_batch(scenes)))
        torch.testing.assert_close(bank["canonical"][k], feats.mean(0), rtol=1e-4, atol=1e-5)
        row = REAL_PER_SCENE
        dx, dy = bank["real_jitter"][row].tolist()
        one = tower.tower_features(net, toydata.to_pixels(toydata.render_batch(
            [W.Scene(**toydata.SCENES[k].attributes(), dx=dx, dy=dy)])))
        torch.testing.assert_close(bank["real"][row], one[0], rtol=1e-4, atol=1e-5)
    latents = torch.load(os.path.join(toy.out, "latents.pt"))
    assert latents["latents"].shape == (n, 4, 8, 8)
    assert float(latents["latents"].std()) == pytest.approx(1.0, rel=1e-4)
    assert latents["scaling_factor"] > 0


# Export -> the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(toy):
    dst = os.path.join(toy.out, "export")
    export.export(toy.out, dst, steps={"tower": 1000, "vae": 700, "stage1": 3000, "stage2": 3000}, seed=SEED)
    return dst


def test_export_is_fp16_converted_layout_with_recommended(toy, exported):
    from safetensors import safe_open

    with open(os.path.join(exported, loading.CONVERTED_CONFIG)) as f:
        config = json.load(f)
    assert config["format"] == "wegen-converted" and config["recommended"] == RECOMMENDED
    assert config["recommended"]["feature_slice"] == "aligned"
    assert config["scheduler"]["prediction_type"] == "sample"
    # the card: the steps each stage really ran (read from its checkpoint), and what the recipe asked for
    assert config["source"]["steps"] == {"tower": 2, "vae": 2, "stage1": 2, "stage2": 2}
    assert config["source"]["recipe_steps"] == {"tower": 1000, "vae": 700, "stage1": 3000, "stage2": 3000}
    scaling = torch.load(os.path.join(toy.out, "latents.pt"))["scaling_factor"]
    assert config["vae"]["scaling_factor"] == pytest.approx(scaling)
    assert loading.resolve_checkpoint(exported) == ("converted", os.path.abspath(exported))

    trained = {"eva.safetensors": ("tower.pt", "tower"), "mllm.safetensors": ("stage2.pt", "mllm"),
               "unet.safetensors": ("stage1.pt", "unet"), "vae.safetensors": ("vae.pt", "vae")}
    n_bytes = 0
    for name in loading.CONVERTED_FILES:
        state = torch.load(os.path.join(toy.out, trained[name][0]), weights_only=False)["modules"][trained[name][1]]
        with safe_open(os.path.join(exported, name), "pt") as f:
            keys = [k for k in f.keys() if not k.startswith(loading.PAD_PREFIX)]
            assert sorted(keys) == sorted(state)
            for k in keys:
                t = f.get_tensor(k)
                want = state[k].half() if state[k].is_floating_point() else state[k]
                assert t.dtype == want.dtype and torch.equal(t, want), (name, k)
                n_bytes += t.numel() * t.element_size()
        assert all(not t.is_floating_point() or t.dtype == torch.float16
                   for t in loading.load_safetensors(os.path.join(exported, name)).values())
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(exported) for f in fs)
    assert n_bytes < total < n_bytes + 2 * 2**20  # fp16 weights + headers, padding, tokenizer
    assert total < 20 * 2**20
    assert os.path.isfile(os.path.join(exported, "tokenizer", "tokenizer.model"))
    assert loading.recommended_settings(exported) == {**loading.RELEASE_SETTINGS, **RECOMMENDED}


@pytest.mark.integration
def test_engine_loads_the_export_and_runs_every_path(toy, exported, one_thread):
    from wegen.engine import WeGenEngine

    engine = WeGenEngine.load(exported, dtype="fp32", device="cpu")
    assert engine.report.layout == "converted"
    assert engine.recommended == {**loading.RELEASE_SETTINGS, **RECOMMENDED}
    assert engine.scheduler.config.prediction_type == "sample"
    assert engine.decoder_cfg.default_size == 64 and engine.mllm_cfg.feature_dim == 64
    # the engine's vision path is the tower's training path (fp16-rounded weights)
    net = tower.new_tower(torch.Generator())
    common.load_modules(os.path.join(toy.out, "tower.pt"), {"tower": net})
    net.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    pixels = toydata.to_pixels(toydata.render_batch([toydata.SCENES[5], toydata.SCENES[600]]))
    with torch.no_grad():
        torch.testing.assert_close(engine.encode_images(pixels), tower.tower_features(net.eval(), pixels),
                                   rtol=1e-4, atol=1e-4)
    r = engine.recommended
    images, cond = engine.generate("a large red circle at the top left on a white background", seed=1, steps=3,
                                   cfg=r["cfg"], width=r["width"], height=r["height"],
                                   feature_slice=r["feature_slice"])
    assert images.shape == (1, 64, 64, 3) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
    assert cond.features.shape == (1, 64, 64)
    text = engine.understand(pixels[:1], W.QUESTION, max_new_tokens=6)
    assert isinstance(text, str)
    rec = engine.reconstruct(pixels[:1], seed=0, steps=2)
    assert rec.shape == (1, 64, 64, 3) and torch.isfinite(rec).all()


# The orchestrator and its CLI ----------------------------------------------------------------------

def test_train_toy_checks_its_arguments(tmp_path):
    from wegen.train.run import train_toy

    with pytest.raises(ValueError, match="--stage must be among .*got towr"):
        train_toy(str(tmp_path), ["towr"])
    with pytest.raises(ValueError, match="--steps takes STAGE=N"):
        train_toy(str(tmp_path), ["tower"], {"tower": 0})
    with pytest.raises(ValueError, match="--steps takes STAGE=N"):
        train_toy(str(tmp_path), ["tower"], {"bank": 3})
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        train_toy(str(tmp_path), ["tower"], device="tpu")
    assert os.listdir(tmp_path) == []


def test_train_toy_cli_bad_arguments_exit_2(capsys, tmp_path):
    from wegen.cli import main

    assert main(["train-toy", str(tmp_path / "w"), "--stage", "nope"]) == 2
    assert "--stage must be among" in capsys.readouterr().err
    assert main(["train-toy", str(tmp_path / "w"), "--steps", "tower=many"]) == 2
    assert "--steps takes STAGE=N, got 'tower=many'" in capsys.readouterr().err


@pytest.mark.integration
def test_train_toy_skips_done_stages_and_exports(toy, tmp_path):
    from wegen.train.run import train_toy

    out = _linked(toy, tmp_path / "w", ["tokenizer", "tower.pt", "vae.pt", "bank.pt", "latents.pt", "diic",
                                        "stage1.pt", "stage2.pt"])
    with recording() as log:
        dst = train_toy(out, ["tokenizer", "tower", "vae", "bank", "latents", "diic", "stage1", "stage2", "export"],
                        {"tower": 2, "vae": 2, "stage1": 2, "stage2": 2})
    assert log == {}  # every stage was already at its step count
    assert dst == os.path.join(out, "wegen-toy") and loading.resolve_checkpoint(dst)[0] == "converted"
    assert "stage export done" in open(os.path.join(out, "train.log")).read()
    # `--stage export` on its own (default steps): the card still says what the stages ran
    train_toy(out, ["export"])
    with open(os.path.join(dst, loading.CONVERTED_CONFIG)) as f:
        source = json.load(f)["source"]
    assert source["steps"] == {"tower": 2, "vae": 2, "stage1": 2, "stage2": 2}
    assert source["recipe_steps"]["stage1"] > 2


# Stage 2 data batches (the losses: tests/test_train_stage2.py) --------------------------------------

def test_data_batches_line_up_ids_blocks_and_masks(toy):
    tokenizer = WeGenTokenizer(os.path.join(toy.out, "tokenizer"))
    data = stage2.Data(toy.out, tokenizer, 64)
    image_ids = tokenizer.image_token_ids(64)
    assert data.n_bank == len(BANK_SCENES) * REAL_PER_SCENE
    assert data.real.shape[0] > data.n_bank  # + the DIIC frames
    rng = random.Random(5)
    for _ in range(8):
        batch = data.batch(rng, 3)
        ids, mask, lm = batch["ids"], batch["mask"], batch["loss_mask"]
        assert ids.shape == mask.shape == lm.shape and not (lm & (mask == 0)).any()
        assert not lm[:, -1].any() and (lm.sum(1) > 0).all()
        n_blocks = (ids == image_ids.start).sum().item()
        assert n_blocks == len(batch["blocks"])
        for b, s, feats, _ in batch["blocks"]:
            assert ids[b, s - 1] == image_ids.start and ids[b, s:s + 64].tolist() == list(image_ids.slots)
            assert feats.shape == (64, 64)

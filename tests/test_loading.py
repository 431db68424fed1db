"""Checkpoint layouts: make-tiny, the official loading rules, convert, and every broken-checkpoint error."""
import hashlib
import os
import shutil

import pytest
import torch

from wegen import loading
from wegen.engine import WeGenEngine
from wegen.loading import CheckpointError
from wegen.tiny import make_tiny


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, dst)
    return str(dst)


def test_make_tiny_is_deterministic_small_and_official_layout(tiny_ckpt, tmp_path):
    again = make_tiny(str(tmp_path / "again"), seed=0)
    other = make_tiny(str(tmp_path / "other"), seed=1)
    assert _digest(again) == _digest(tiny_ckpt)
    assert _digest(other) != _digest(tiny_ckpt)
    assert _size(tiny_ckpt) < 50 * 2**20
    assert all(os.path.isfile(p) for p in loading.required_official_files(tiny_ckpt))
    assert os.path.isfile(os.path.join(tiny_ckpt, loading.STAGE2_FILE))


def test_final_bin_wins_and_keys_are_reported(engine, tiny_ckpt):
    final = torch.load(os.path.join(tiny_ckpt, loading.FINAL_FILE), weights_only=True)
    stage2 = torch.load(os.path.join(tiny_ckpt, loading.STAGE2_FILE), weights_only=True)
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final[key], stage2[key])
    assert torch.equal(engine.mllm.llm.model.layers[0].self_attn.q_proj.weight, final[key])
    ignored = dict(engine.report.ignored)
    assert "llm.model.layers.0.self_attn.rotary_emb.inv_freq" in ignored
    assert "input_resampler.avgpoolquery.scale" in ignored
    assert engine.report.unexpected == []
    # vocabulary size comes from the tensor (the Llama folder's config.json says the pre-resize 600)
    assert engine.mllm.llm.config.vocab_size == engine.tokenizer.vocab_size == 930


def test_unexpected_agent_keys_are_reported_not_dropped(ckpt_copy):
    path = os.path.join(ckpt_copy, loading.FINAL_FILE)
    sd = torch.load(path, weights_only=True)
    sd["mystery.weight"] = torch.zeros(2)
    torch.save(sd, path)
    eng = WeGenEngine(loading.load_parts(ckpt_copy))
    assert "mystery.weight" in eng.report.unexpected


def test_missing_llm_weight_is_named(ckpt_copy):
    os.remove(os.path.join(ckpt_copy, loading.STAGE2_FILE))
    path = os.path.join(ckpt_copy, loading.FINAL_FILE)
    sd = torch.load(path, weights_only=True)
    del sd["llm.model.layers.1.mlp.down_proj.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj.weight"):
        WeGenEngine(loading.load_parts(ckpt_copy))


def test_checkpoint_accepts_folder_parent_and_converted(tiny_ckpt, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    os.symlink(tiny_ckpt, parent / loading.OFFICIAL_DIRNAME)
    assert loading.resolve_checkpoint(str(parent)) == ("official", str(parent / loading.OFFICIAL_DIRNAME))
    assert loading.resolve_checkpoint(tiny_ckpt)[0] == "official"
    converted = loading.convert(tiny_ckpt, str(tmp_path / "converted"))
    assert loading.resolve_checkpoint(converted) == ("converted", converted)
    with pytest.raises(CheckpointError, match="not a WeGen checkpoint"):
        loading.resolve_checkpoint(str(tmp_path))


def test_converted_layout_gives_bit_identical_outputs(tiny_ckpt, tmp_path, engine):
    converted = WeGenEngine.load(loading.convert(tiny_ckpt, str(tmp_path / "conv")), dtype="fp32")
    assert converted.report.layout == "converted"
    ref = torch.rand(1, 50, 60, 3, generator=torch.Generator().manual_seed(3))
    a_img, a = engine.generate("a fox", ref, seed=5, steps=2, width=64, height=64)
    b_img, b = converted.generate("a fox", ref, seed=5, steps=2, width=64, height=64)
    assert torch.equal(a.features, b.features) and torch.equal(a_img, b_img)


def test_sidecar_overrides_yaml_constants(ckpt_copy):
    with open(os.path.join(ckpt_copy, loading.SIDECAR_FILE), "w") as f:
        f.write('{"n_gen_tokens": 16}')
    eng = WeGenEngine(loading.load_parts(ckpt_copy))
    assert eng.encode("a fox").features.shape == (1, 16, 112)
    with open(os.path.join(ckpt_copy, loading.SIDECAR_FILE), "w") as f:
        f.write('{"n_gen_tokenz": 16}')
    with pytest.raises(CheckpointError, match="unknown keys"):
        loading.load_parts(ckpt_copy)
    with open(os.path.join(ckpt_copy, loading.SIDECAR_FILE), "w") as f:
        f.write('{"image_size": 224}')
    with pytest.raises(CheckpointError, match="448px"):
        loading.load_parts(ckpt_copy)


def test_partial_checkpoint_names_the_missing_file(ckpt_copy):
    os.remove(os.path.join(ckpt_copy, loading.EVA_FILE))
    with pytest.raises(CheckpointError, match=r"missing .*EVA-CLIP/visual\.pt"):
        loading.load_parts(ckpt_copy)


@pytest.mark.parametrize("rel", [loading.FINAL_FILE, f"{loading.UNET_DIR}/{loading.UNET_FILE}"])
def test_truncated_weights_are_a_clear_error(ckpt_copy, rel):
    path = os.path.join(ckpt_copy, rel)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        loading.load_parts(ckpt_copy)


def test_corrupt_weights_are_a_clear_error(ckpt_copy):
    with open(os.path.join(ckpt_copy, loading.EVA_FILE), "wb") as f:
        f.write(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        loading.load_parts(ckpt_copy)


class NotATensor:
    pass


def test_pickle_needing_code_is_refused(ckpt_copy):
    torch.save({"weights": NotATensor()}, os.path.join(ckpt_copy, loading.FINAL_FILE))
    with pytest.raises(CheckpointError, match="refused to load .*weights_only"):
        loading.load_parts(ckpt_copy)


# A checkpoint's recommended settings, bundled checkpoints by name (extensions) -----------------------------

@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    return loading.convert(tiny_ckpt, str(tmp_path_factory.mktemp("conv") / "conv"))


def with_recommended(converted, folder, recommended):
    """A converted checkpoint (links to `converted`'s files) whose wegen_config.json says `recommended`."""
    import json

    os.makedirs(folder)
    for name in os.listdir(converted):
        if name != loading.CONVERTED_CONFIG:
            os.symlink(os.path.join(converted, name), os.path.join(folder, name))
    with open(os.path.join(converted, loading.CONVERTED_CONFIG)) as f:
        config = json.load(f)
    config["recommended"] = recommended
    with open(os.path.join(folder, loading.CONVERTED_CONFIG), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_recommended_settings_of_the_release_and_of_a_converted_checkpoint(tiny_ckpt, converted, tmp_path, engine):
    release = {"steps": 50, "cfg": 2.0, "feature_slice": "official"}
    assert loading.recommended_settings(tiny_ckpt) == release  # official layout: the release's settings
    assert loading.recommended_settings(converted) == release  # converted without an entry: the same
    assert engine.decoder_cfg.default_size == 256  # the UNet's own size
    assert engine.recommended == {**release, "width": 256, "height": 256}
    own = {"steps": 7, "cfg": 3.5, "width": 48, "height": 32, "feature_slice": "aligned"}
    ckpt = with_recommended(converted, tmp_path / "own", own)
    assert loading.recommended_settings(ckpt) == own
    assert WeGenEngine(loading.load_parts(ckpt)).recommended == own
    partial = with_recommended(converted, tmp_path / "partial", {"steps": 9})
    assert loading.recommended_settings(partial) == {**release, "steps": 9}


@pytest.mark.parametrize("bad, message", [
    ({"stepz": 20}, "keys among"),
    ([20, 2.0], "must be an object"),
    ({"steps": 0}, "steps must be an integer in 1..1000"),
    ({"steps": 1001}, "steps must be an integer in 1..1000"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"cfg": -1}, "cfg must be a finite number >= 0"),
    ({"cfg": "2"}, "cfg must be a finite number"),
    ({"cfg": float("nan")}, "cfg must be a finite number"),
    ({"width": 100}, "width must be a positive multiple of 8"),
    ({"height": 0}, "height must be a positive multiple of 8"),
    ({"feature_slice": "x"}, "feature_slice must be 'official' or 'aligned', got 'x'"),
])
def test_bad_recommended_entries_name_the_file(converted, tmp_path, bad, message):
    ckpt = with_recommended(converted, tmp_path / "bad", bad)
    path = os.path.join(ckpt, loading.CONVERTED_CONFIG)
    for read in (loading.recommended_settings, loading.load_parts):
        with pytest.raises(CheckpointError) as e:
            read(ckpt)
        assert str(e.value).startswith(path + ": ") and message in str(e.value)


@pytest.fixture
def bundled(converted, tmp_path, monkeypatch):
    """checkpoints/ with one converted checkpoint `mytoy`, a folder that is none and a stray file."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    os.symlink(converted, root / "mytoy")
    (root / "empty").mkdir()
    (root / "README").write_text("x")
    monkeypatch.setattr(loading, "BUNDLED_DIR", str(root))
    return str(root / "mytoy")


def test_bundled_checkpoints_by_name(bundled, tiny_ckpt, tmp_path, monkeypatch):
    assert loading.bundled_checkpoints() == {"mytoy": bundled}
    assert loading.resolve_checkpoint("mytoy") == ("converted", os.path.abspath(bundled))
    assert loading.recommended_settings("mytoy") == loading.RELEASE_SETTINGS
    with pytest.raises(CheckpointError, match=r"checkpoint folder not found: .*a bundled name: mytoy\)"):
        loading.resolve_checkpoint("wegen-nope")
    # a folder of that name where the command runs wins over the bundled one
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    os.symlink(tiny_ckpt, cwd / "mytoy")
    monkeypatch.chdir(cwd)
    assert loading.resolve_checkpoint("mytoy")[0] == "official"
    monkeypatch.setattr(loading, "BUNDLED_DIR", str(tmp_path / "absent"))
    assert loading.bundled_checkpoints() == {}
    with pytest.raises(CheckpointError, match=r"a bundled name: none\)"):
        loading.resolve_checkpoint("wegen-nope")

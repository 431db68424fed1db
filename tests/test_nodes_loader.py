"""WeGen Loader (nodes/loader.py) under the stand-in ComfyUI host: checkpoint lists, the bundled checkpoint,
the cached engine, bad inputs."""
from __future__ import annotations

import os

import pytest
from ComfyUI_WeGen.nodes import host
from ComfyUI_WeGen.nodes.loader import WeGenLoader


@pytest.fixture(scope="session")
def engine(pack_engine):
    """The nodes' copy of the engine (ComfyUI_WeGen.wegen): the one their loader caches."""
    return pack_engine


# Loader --------------------------------------------------------------------------------------------

def test_loader_lists_checkpoint_folders(comfy_host, tmp_path, tiny_ckpt):
    import os

    extra = tmp_path / "extra"
    (extra / "not_a_checkpoint").mkdir(parents=True)
    os.symlink(tiny_ckpt, extra / "tiny_copy")
    (extra / "stray_file.txt").write_text("x")
    folder_paths = comfy_host.modules["folder_paths"]
    folder_paths.add_model_folder_path("wegen", str(extra))  # what an extra_model_paths.yaml entry does
    names, opts = WeGenLoader.INPUT_TYPES()["required"]["checkpoint"]
    assert names == ["wegen-toy", "tiny", "tiny_copy"]  # the bundled checkpoint first, with no setup
    assert opts["default"] == "wegen-toy"
    assert os.path.join(comfy_host.models_dir, "wegen") in folder_paths.get_folder_paths("wegen")


def test_loader_finds_the_bundled_checkpoint_by_name(comfy_host):
    from ComfyUI_WeGen.wegen.loading import BUNDLED_DIR

    assert host.find_checkpoint("wegen-toy") == os.path.join(BUNDLED_DIR, "wegen-toy")
    model = WeGenLoader().load("wegen-toy", "fp32", "cpu")[0]
    assert model.checkpoint == os.path.join(BUNDLED_DIR, "wegen-toy")
    assert "wegen-toy" in WeGenLoader.DESCRIPTION


def test_a_model_folder_named_like_a_bundled_checkpoint_replaces_it(comfy_host, tmp_path, tiny_ckpt):
    extra = tmp_path / "extra"
    extra.mkdir()
    os.symlink(tiny_ckpt, extra / "wegen-toy")
    comfy_host.modules["folder_paths"].add_model_folder_path("wegen", str(extra))
    names = WeGenLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    assert names == ["wegen-toy", "tiny"]  # listed once
    assert host.find_checkpoint("wegen-toy") == str(extra / "wegen-toy")


def test_bundled_checkpoint_listed_without_comfyui(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no models/wegen here
    assert host.comfy() is None
    assert host.list_checkpoints()[0] == "wegen-toy"
    assert WeGenLoader.INPUT_TYPES()["required"]["checkpoint"][1]["default"] == "wegen-toy"


def test_loader_returns_handle_to_cached_engine(model, engine):
    assert isinstance(model, host.WeGenModel) and (model.dtype, model.device) == ("fp32", "cpu")
    assert host.load_engine(model) is engine


def test_loader_auto_dtype_shares_the_engine(comfy_host, engine):
    handle = WeGenLoader().load("tiny", "auto", "gpu")[0]  # stand-in host: the "GPU" is the CPU
    assert host.load_engine(handle) is engine


@pytest.mark.parametrize("args, error, words", [
    (("nope", "fp32", "cpu"), FileNotFoundError, ["'nope'", "wegen", "make-tiny"]),
    (("tiny", "int8", "cpu"), ValueError, ["dtype", "'int8'", "fp32"]),
    (("tiny", "fp32", "tpu"), ValueError, ["device", "'tpu'", "offload when idle"]),
    (("", "fp32", "cpu"), ValueError, ["checkpoint", "models/wegen"]),
])
def test_loader_bad_inputs(comfy_host, args, error, words):
    with pytest.raises(error) as e:
        WeGenLoader().load(*args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_loader_names_missing_files(comfy_host, tmp_path):
    broken = tmp_path / "broken"
    (broken / "pretrained").mkdir(parents=True)
    comfy_host.modules["folder_paths"].add_model_folder_path("wegen", str(tmp_path))
    with pytest.raises(ValueError, match="missing .*broken"):
        WeGenLoader().load("broken", "fp32", "cpu")

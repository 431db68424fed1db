"""Checkpoint sanity before allocation: hostile configs (each bound), malformed parts, the memory estimate.

Every case must be refused with one CheckpointError line naming the file and the field, before a module
is built (a config with 10**6 layers used to build for minutes; 10**10 train timesteps tried 40 GB).
"""
import json
import os
import shutil

import pytest
import torch

from wegen import loading
from wegen.cli import main
from wegen.engine import WeGenEngine
from wegen.loading import CheckpointError

LLAMA = f"{loading.LLAMA_DIR}/config.json"
UNET = f"{loading.UNET_DIR}/config.json"
VAE = f"{loading.SDXL_DIR}/vae/config.json"
SCHED = f"{loading.SDXL_DIR}/scheduler/scheduler_config.json"
TOK = loading.TOKENIZER_DIR


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, dst)
    return str(dst)


def patch_json(root, rel, **changes):
    path = os.path.join(root, rel)
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)  # allow_nan: NaN/Infinity are written as json.load accepts them
    return path


HOSTILE = [  # (file, field, value): each bound of each config
    (LLAMA, "num_hidden_layers", 10**6), (LLAMA, "num_hidden_layers", 0), (LLAMA, "hidden_size", 0),
    (LLAMA, "hidden_size", "64"), (LLAMA, "hidden_size", 10**7), (LLAMA, "intermediate_size", 10**9),
    (LLAMA, "num_attention_heads", 0), (LLAMA, "num_attention_heads", 3), (LLAMA, "num_key_value_heads", 3),
    (LLAMA, "num_key_value_heads", 0), (LLAMA, "vocab_size", 10**9), (LLAMA, "max_position_embeddings", 10**9),
    (LLAMA, "max_position_embeddings", 0), (LLAMA, "rms_norm_eps", 0), (LLAMA, "rms_norm_eps", float("nan")),
    (LLAMA, "rope_theta", -1), (LLAMA, "rope_theta", float("inf")), (LLAMA, "hidden_act", "bogus"),
    (LLAMA, "rope_scaling", "abc"), (LLAMA, "rope_scaling", {"type": "bogus", "factor": 2}),
    (LLAMA, "rope_scaling", {"type": "linear", "factor": 0}), (LLAMA, "rope_scaling", {"type": "linear"}),
    (LLAMA, "head_dim", 0), (LLAMA, "some_size", 10**12),
    (SCHED, "num_train_timesteps", 10**10), (SCHED, "num_train_timesteps", 0), (SCHED, "beta_start", -1),
    (SCHED, "beta_end", 0.0001), (SCHED, "beta_schedule", "bogus"), (SCHED, "prediction_type", "bogus"),
    (SCHED, "timestep_spacing", "bogus"), (SCHED, "steps_offset", 5000), (SCHED, "trained_betas", [0.5]),
    (UNET, "block_out_channels", [32] * 100), (UNET, "block_out_channels", []), (UNET, "block_out_channels", [30, 64]),
    (UNET, "layers_per_block", 10**6), (UNET, "transformer_layers_per_block", 10**6),
    (UNET, "attention_head_dim", [0, 4]), (UNET, "attention_head_dim", [3, 4]), (UNET, "sample_size", 10**7),
    (UNET, "cross_attention_dim", 0), (UNET, "act_fn", "bogus"), (UNET, "down_block_types", ["DownBlock2D"]),
    (UNET, "in_channels", 10**5), (UNET, "norm_num_groups", 0),
    (VAE, "latent_channels", 10**6), (VAE, "block_out_channels", [16] * 50), (VAE, "layers_per_block", 10**5),
    (VAE, "scaling_factor", 0), (VAE, "act_fn", "bogus"), (VAE, "sample_size", -1),
]


@pytest.mark.parametrize("rel, key, value", HOSTILE, ids=[f"{r.split('/')[-2]}-{k}-{v}"[:60] for r, k, v in HOSTILE])
def test_hostile_config_is_refused_before_any_weight_is_read(ckpt_copy, monkeypatch, rel, key, value):
    path = patch_json(ckpt_copy, rel, **{key: value})
    monkeypatch.setattr(loading, "load_pickle", lambda p: pytest.fail("weights read before the configs were checked"))
    with pytest.raises(CheckpointError) as err:
        loading.load_parts(ckpt_copy)
    message = str(err.value)
    assert path in message and key.split(".")[0] in message and "\n" not in message


SIDECARS = [([1], "JSON object"), ({"n_gen_tokens": "abc"}, "n_gen_tokens"), ({"n_gen_tokens": 1.5}, "n_gen_tokens"),
            ({"n_gen_tokens": 10**9}, "n_gen_tokens"), ({"n_gen_tokens": 0}, "n_gen_tokens"),
            ({"n_gen_tokens": True}, "n_gen_tokens"), ({"n_query_tokens": 50}, "square"),
            ({"image_size": 10**9}, "image_size"), ({"eva_head_width": 0}, "eva_head_width")]


@pytest.mark.parametrize("content, field", SIDECARS)
def test_bad_sidecar_names_the_file_and_field(ckpt_copy, content, field):
    path = os.path.join(ckpt_copy, loading.SIDECAR_FILE)
    with open(path, "w") as f:
        json.dump(content, f)
    with pytest.raises(CheckpointError, match=field) as err:
        loading.load_parts(ckpt_copy)
    assert path in str(err.value)


def test_converted_config_sections_are_checked(tiny_ckpt, tmp_path):
    conv = loading.convert(tiny_ckpt, str(tmp_path / "conv"))
    path = os.path.join(conv, loading.CONVERTED_CONFIG)
    with open(path) as f:
        cfg = json.load(f)
    cfg["scheduler"]["num_train_timesteps"] = 10**10
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="scheduler: num_train_timesteps"):
        loading.load_parts(conv)
    del cfg["llama"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="llama"):
        loading.load_parts(conv)


# Malformed parts: one line naming the file and the field --------------------------------------------------------

@pytest.mark.parametrize("rel, changes, file, field", [
    (LLAMA, {"intermediate_size": 96}, loading.FINAL_FILE, "mlp.gate_proj.weight"),
    (VAE, {"latent_channels": 8}, "vae/diffusion_pytorch_model.safetensors", "decoder.conv_in.weight"),
    (UNET, {"block_out_channels": [32, 32]}, loading.UNET_FILE, "down_blocks.1"),
])
def test_shape_mismatch_between_config_and_weights_names_file_and_tensor(ckpt_copy, rel, changes, file, field):
    patch_json(ckpt_copy, rel, **changes)
    with pytest.raises(CheckpointError, match="config implies") as err:
        WeGenEngine(loading.load_parts(ckpt_copy))
    assert file in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("rel", [loading.FINAL_FILE, loading.EVA_FILE, loading.SIDECAR_FILE, f"{TOK}/tokenizer.model",
                                 f"{TOK}/added_tokens.json", LLAMA, loading.STAGE2_FILE,
                                 f"{loading.SDXL_DIR}/vae/diffusion_pytorch_model.safetensors"])
def test_a_folder_where_a_file_belongs_is_named(ckpt_copy, rel):
    path = os.path.join(ckpt_copy, rel)
    if os.path.exists(path):
        os.remove(path)
    os.makedirs(path)
    with pytest.raises(ValueError, match="is a folder where") as err:
        WeGenEngine(loading.load_parts(ckpt_copy))
    assert path in str(err.value)


@pytest.mark.parametrize("name, content, match", [
    ("tokenizer.model", b"garbage, not a sentencepiece model", "not a sentencepiece tokenizer model"),
    ("tokenizer.model", b"", "not a sentencepiece tokenizer model"),
    ("added_tokens.json", b"[1, 2]", "object of token"),
    ("added_tokens.json", b'{"<img>": "x"}', "object of token"),
    ("added_tokens.json", b'{"<img>": 5, "</img>": 5}', "share an id"),
    ("added_tokens.json", b"{not json", "cannot read"),
])
def test_garbage_tokenizer_files_name_the_file(ckpt_copy, name, content, match):
    path = os.path.join(ckpt_copy, TOK, name)
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match=match) as err:
        WeGenEngine(loading.load_parts(ckpt_copy))
    assert path in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit, field", [
    (lambda sd: sd.pop("pos_embed"), "pos_embed"),
    (lambda sd: sd.update(pos_embed=torch.zeros(1, 1000, 112)), "square grid"),
    (lambda sd: sd.update({"patch_embed.proj.weight": torch.zeros(112, 3)}), "patch_embed.proj.weight"),
])
def test_malformed_eva_weights_name_the_file(ckpt_copy, edit, field):
    path = os.path.join(ckpt_copy, loading.EVA_FILE)
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=field) as err:
        loading.load_parts(ckpt_copy)
    assert path in str(err.value)


def test_malformed_projection_names_the_file(ckpt_copy):
    for rel in (loading.STAGE2_FILE, loading.FINAL_FILE):
        path = os.path.join(ckpt_copy, rel)
        sd = torch.load(path, weights_only=True)
        sd["input_resampler.proj.weight"] = torch.zeros(64)
        torch.save(sd, path)
    with pytest.raises(CheckpointError, match="input_resampler.proj.weight must be a 2-D weight"):
        loading.load_parts(ckpt_copy)


def test_hostile_checkpoint_on_the_cli_is_one_line_exit_2(capsys, ckpt_copy, tmp_path):
    patch_json(ckpt_copy, LLAMA, num_hidden_layers=10**6)
    code = main(["generate", "--checkpoint", ckpt_copy, "--prompt", "x", "--steps", "1", "--size", "64",
                 "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "num_hidden_layers" in err
    assert not os.path.exists(tmp_path / "a.png")


# Memory: estimated on the meta device, refused when the machine does not have it --------------------------------

def test_memory_estimate_matches_the_built_modules(engine):
    from wegen import checks

    need = checks.estimate_bytes(engine.parts, torch.float32)
    built = sum(t.numel() * 4 for m in (engine.mllm, engine.unet, engine.vae)
                for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())
    assert abs(need["LLM"] + need["UNet"] + need["VAE"] - built) <= 0.01 * built
    assert checks.estimate_bytes(engine.parts, torch.bfloat16)["UNet"] * 2 == need["UNet"]


def test_checkpoint_larger_than_the_ram_is_refused(tiny_ckpt, monkeypatch):
    from wegen import checks

    monkeypatch.setattr(checks, "machine_memory", lambda: 2**20)
    with pytest.raises(CheckpointError, match=r"need about .* GiB in float32 .* this machine has 0\.00 GiB of RAM"):
        WeGenEngine(loading.load_parts(tiny_ckpt))


@pytest.mark.parametrize("offload, free, size, refused", [("none", 2**20, 2**20, True), ("phase", 2**20, 2**20, True),
                                                          ("none", 2**40, 2**40, False),
                                                          ("spread", 2**10, 2**10, False),
                                                          ("none", 2**10, 2**40, False)])
def test_checkpoint_larger_than_the_gpu_is_refused(engine, monkeypatch, caplog, offload, free, size, refused):
    from wegen import checks

    monkeypatch.setattr(checks, "gpu_memory", lambda device: (free, size))
    if refused:
        with pytest.raises(CheckpointError, match=r"GiB; use offload 'phase'"):
            checks.check_memory(engine.parts, torch.device("cuda"), torch.float16, offload)
    else:
        checks.check_memory(engine.parts, torch.device("cuda"), torch.float16, offload)
        assert ("GiB are free now" in caplog.text) == (free < size)  # little free now: a warning only

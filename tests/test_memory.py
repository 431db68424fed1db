"""Memory modes: fp8 weight storage, offload none / idle / phase / sequential, fp8 conversion, and the bytes each
mode keeps on the device at the official dimensions (counted on the meta device, nothing allocated)."""
import json
import os

import pytest
import torch

from wegen import loading, memory
from wegen.engine import WeGenEngine

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red fox"


def _turn(e):
    """Features (with an input image, so EVA runs) and pixels of one turn."""
    image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(0))
    cond = e.encode(PROMPT, images=image)
    return cond.features, e.decode_pixels(cond, seed=3, steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def reference(engine):
    return _turn(engine)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# Tolerances of fp8 storage on the tiny random-weight checkpoint (measured: e4m3 features 0.05 relative L2,
# pixels 0.010 mean abs; e5m2 0.13 and 0.022). Random tiny weights amplify rounding more than a trained model.
FP8_TOL = {"fp8_e4m3fn": (0.12, 0.03), "fp8_e5m2": (0.3, 0.06)}


@pytest.mark.parametrize("weight_dtype", list(FP8_TOL))
def test_fp8_storage_is_close_to_full_precision(tiny_ckpt, reference, weight_dtype):
    e = WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", weight_dtype=weight_dtype)
    fp8 = memory.WEIGHT_DTYPES[weight_dtype]
    q = e.mllm.llm.model.layers[0].self_attn.q_proj
    assert isinstance(q, memory.CastLinear) and q.weight.dtype == fp8
    assert e.unet.dtype == torch.float32 and e.unet.conv_in.weight.dtype == torch.float32  # the first parameter
    assert e.unet.down_blocks[0].resnets[0].conv1.weight.dtype == fp8 and e.vae.decoder.conv_in.weight.dtype != fp8
    features, pixels = _turn(e)
    assert e.eva.blocks[0].attn.qkv.weight.dtype == fp8
    feat_tol, pix_tol = FP8_TOL[weight_dtype]
    assert 0 < _rel(features, reference[0]) < feat_tol
    assert 0 < float((pixels - reference[1]).abs().mean()) < pix_tol


@pytest.mark.parametrize("offload", ["idle", "phase", "sequential"])
def test_offload_modes_equal_none(tiny_ckpt, reference, offload):
    e = WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", offload=offload)
    features, pixels = _turn(e)
    assert torch.equal(features, reference[0]) and torch.equal(pixels, reference[1])


def test_sequential_streams_each_block_through_hooks(tiny_ckpt):
    e = WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", offload="sequential")
    units = {n: memory.stream_units(n, getattr(e, n)) for n in ("mllm", "unet", "eva")}
    assert len(units["mllm"]) == e.mllm.llm.config.num_hidden_layers and len(units["eva"]) == e.eva_cfg.layers
    assert all(getattr(u, memory.STREAMED) for us in units.values() for u in us) and len(units["unet"]) > 6
    visits = []
    handles = [u.register_forward_pre_hook(lambda m, a, n=n: visits.append(n)) for n, us in units.items() for u in us]
    try:
        _turn(e)
    finally:
        for h in handles:
            h.remove()
    assert {"mllm", "unet", "eva"} <= set(visits)
    from wegen import fastdecode

    assert "stream from CPU memory" in fastdecode.llm_unsupported_reason(e.mllm)
    with pytest.raises(ValueError, match="sequential engine stays as it was loaded"):
        e.set_offload("none")


def test_convert_writes_fp8_safetensors_that_load(tiny_ckpt, tmp_path, reference):
    dst = loading.convert(tiny_ckpt, str(tmp_path / "fp8"), weight_dtype="fp8_e4m3fn")
    with open(os.path.join(dst, "unet.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert "F8_E4M3" in kinds and header["conv_in.weight"]["dtype"] != "F8_E4M3"
    with open(os.path.join(dst, loading.CONVERTED_CONFIG), encoding="utf-8") as f:
        assert json.load(f)["weight_dtype"] == "fp8_e4m3fn"
    kept = WeGenEngine.load(dst, dtype="fp32", device="cpu", weight_dtype="fp8_e4m3fn")
    same = WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", weight_dtype="fp8_e4m3fn")
    a, b = _turn(kept), _turn(same)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the file holds what fp8 storage holds
    upcast = WeGenEngine.load(dst, dtype="fp32", device="cpu")  # loads at full precision too
    assert upcast.mllm.llm.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert _rel(_turn(upcast)[0], reference[0]) < FP8_TOL["fp8_e4m3fn"][0]
    again = loading.convert(dst, str(tmp_path / "fp8b"), weight_dtype="fp8_e5m2")  # converted -> fp8 is allowed
    assert os.path.isfile(os.path.join(again, "mllm.safetensors"))
    with pytest.raises(loading.CheckpointError, match="already in the converted layout"):
        loading.convert(dst, str(tmp_path / "x"))


def test_bad_memory_arguments(tiny_ckpt):
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", weight_dtype="fp4")
    with pytest.raises(ValueError, match="offload must be one of"):
        WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", offload="stream")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        loading.convert(tiny_ckpt, "/nonexistent/x", weight_dtype="int8")


# Official dimensions, on the meta device -------------------------------------------------------------------

@pytest.fixture(scope="module")
def table():
    from bench import memory_table

    return memory_table


def test_device_bytes_at_official_dimensions(table):
    bf16 = table.official_modules(torch.bfloat16, "default", torch.bfloat16)
    assert all(t.is_meta for m in bf16.values() for t in (*m.parameters(), *m.buffers()))  # nothing allocated
    llm = memory.module_bytes(bf16["mllm"])[0]
    assert sum(p.numel() for p in bf16["mllm"].parameters()) == 6_741_118_976 + 2 * 7_340_032  # reference 5.3
    assert llm - 2 * (6_741_118_976 + 2 * 7_340_032) < 1024  # bf16 (+ RoPE's inv_freq buffer)
    assert abs(memory.module_bytes(bf16["eva"])[0] - 2 * 4_350_208_256) < 2 * 4e6  # EVA-E/14+ at 448
    none = memory.device_bytes({k: v for k, v in bf16.items() if k != "eva"}, "none")
    phase = memory.device_bytes(bf16, "phase")
    seq = memory.device_bytes(bf16, "sequential")
    assert phase == llm < none and seq < 1.5e9
    act = table.activation_bytes("bf16", "bf16")
    assert table.peak_bytes(bf16, "phase", act)[1] < 16e9  # the 16 GB target at bf16
    fp8 = table.official_modules(torch.bfloat16, "fp8_e4m3fn", torch.bfloat16)
    weights, peak = table.peak_bytes(fp8, "phase", act)
    assert weights < 0.52 * llm and peak < 8e9  # the 8 GB target: fp8 + phase


# Loader node and CLI -----------------------------------------------------------------------------------------

def test_loader_appends_preset_offload_weight_dtype(comfy_host):
    from ComfyUI_WeGen.nodes import host
    from ComfyUI_WeGen.nodes.loader import WeGenLoader

    spec = WeGenLoader.INPUT_TYPES()
    assert list(spec["required"]) == ["checkpoint", "dtype", "device"]  # saved workflows are positional
    assert list(spec["optional"]) == ["preset", "offload", "weight_dtype"]
    assert [spec["optional"][k][1]["default"] for k in spec["optional"]] == ["comfyui", "auto", "default"]
    model = WeGenLoader().load("tiny", "fp32", "cpu", "release", "sequential", "fp8_e5m2")[0]
    e = host.load_engine(model)
    assert (e.preset, e.offload, e.weight_dtype, str(e.device)) == ("release", "none", "fp8_e5m2", "cpu")
    with pytest.raises(ValueError, match="offload must be one of"):
        WeGenLoader().load("tiny", "fp32", "cpu", offload="streaming")
    gpu = type("Host", (), {"mm": type("MM", (), {"get_torch_device": staticmethod(lambda: "cuda:0")}),
                            "model_patcher": object()})()
    assert host.placement("gpu", gpu, "phase") == ("cuda:0", "phase", False)
    assert host.placement("offload when idle", gpu, "sequential") == ("cuda:0", "sequential", False)
    assert host.placement("gpu", gpu, "auto") == ("cuda:0", "none", True)
    assert host.placement("cpu", gpu, "phase") == ("cpu", "none", False)


def test_cli_memory_and_preset_flags(tiny_ckpt, tmp_path, capsys):
    from wegen import cli

    out = str(tmp_path / "a.png")
    args = ["generate", "--checkpoint", tiny_ckpt, "--device", "cpu", "--dtype", "fp32", "--prompt", PROMPT,
            "--steps", "2", "--size", "64", "--out", out]
    assert cli.main(args + ["--preset", "release", "--offload", "sequential", "--weight-dtype", "fp8_e4m3fn"]) == 0
    e = WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", offload="sequential", preset="release",
                         weight_dtype="fp8_e4m3fn")
    assert memory.is_streamed(e.mllm) and os.path.isfile(out)
    dst = str(tmp_path / "fp8")
    assert cli.main(["convert", tiny_ckpt, dst, "--weight-dtype", "fp8_e5m2"]) == 0
    assert cli.main(args + ["--offload", "phase"]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--offload", "nvme"]) == 2
    assert "invalid choice: 'nvme'" in capsys.readouterr().err


def test_gpu_memory_check_counts_fp8_storage_and_sequential(engine, monkeypatch):
    """A GPU between the fp8 and the full-precision size of the largest stage: fp8 + phase fits, phase does not;
    sequential keeps about one block there and is not refused."""
    from wegen import checks

    n = checks.estimate_bytes(engine.parts, torch.float16)
    full = max(n["LLM"], n["UNet"] + n["VAE"], n["EVA"])
    fp8 = max(n["LLM"] // 2, n["UNet"] // 2 + n["VAE"], n["EVA"] // 2)
    size = (full + fp8) // 2  # the largest stage fits in fp8, not in fp16
    monkeypatch.setattr(checks, "gpu_memory", lambda device: (size, size))
    cuda = torch.device("cuda")
    with pytest.raises(loading.CheckpointError, match="use offload 'phase'"):
        checks.check_memory(engine.parts, cuda, torch.float16, "phase")
    checks.check_memory(engine.parts, cuda, torch.float16, "phase", "fp8_e4m3fn")
    checks.check_memory(engine.parts, cuda, torch.float16, "sequential")

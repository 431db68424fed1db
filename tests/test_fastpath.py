"""The fast path equals the plain path: every piece that can run on a CPU is run here against it.

CUDA graph capture itself runs only on a GPU (bench/run.py checks it there and prints the difference);
here the static-KV-cache step runs eagerly on the CPU (fastpath.settings(static_on_cpu=True)), which is
the very code a graph captures. The decode step's own fast path (wegen/fastdecode.py): tests/test_fastdecode.py.
"""
import sys

import pytest
import torch
from decode_helpers import counting_backend as _counting_backend
from decode_helpers import decode as _decode
from decode_helpers import gens as _gens
from decode_helpers import ids as _ids

from wegen import decoder, fastpath, loading, mllm
from wegen import engine as engine_mod
from wegen.engine import WeGenEngine

pytestmark = pytest.mark.usefixtures("one_thread")


# UNet: graphs and the zero-context skip ------------------------------------------------------------

def test_unet_graph_logic_equals_plain(engine, cpu_graphs):
    """One graph per shape, reused with new conditioning (set_condition), a new one for a new shape."""
    kw = dict(steps=2, guidance_scale=3.0, width=64, height=64, output="latents")

    def run(feats, seed, **extra):
        with torch.inference_mode():
            return decoder.generate(engine.unet, engine.vae, engine.scheduler, engine.decoder_cfg, feats, [seed],
                                    **{**kw, **extra})

    f1, f2 = (torch.randn(1, 64, engine.mllm_cfg.feature_dim, generator=torch.Generator().manual_seed(s))
              for s in (1, 2))
    a, b = run(f1, 1), run(f2, 2)
    assert len(cpu_graphs) == 1  # the second call replays the first call's graph with f2's conditioning
    c = run(f1, 1, width=72)
    assert len(cpu_graphs) == 2 and fastpath.describe(unet=engine.unet)["unet"] == "CUDA graph"
    fastpath.release(engine.unet)
    with fastpath.settings(enabled=False):
        torch.testing.assert_close(a, run(f1, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(b, run(f2, 2), rtol=0, atol=1e-6)
        torch.testing.assert_close(c, run(f1, 1, width=72), rtol=0, atol=1e-6)
    assert fastpath.describe(unet=engine.unet)["unet"] == "plain"


def _latents(engine, feats, seeds, **kw):
    kw = {"steps": 3, "guidance_scale": 3.0, "width": 64, "height": 64, **kw}
    with torch.inference_mode():
        return decoder.generate(engine.unet, engine.vae, engine.scheduler, engine.decoder_cfg, feats, seeds,
                                output="latents", **kw)


def _feats(n, engine, seed=0):
    return torch.randn(n, 64, engine.mllm_cfg.feature_dim, generator=torch.Generator().manual_seed(seed))


def test_zero_context_skip_is_bit_identical(engine, monkeypatch):
    """CFG's uncond rows skip cross-attention (output = to_out's bias): the latents equal the full computation."""
    skips = fastpath._skips(engine.unet)
    cross = [m for m in engine.unet.modules() if getattr(m, "is_cross_attention", False)]
    assert len(skips) == len(cross) > 0 and fastpath.describe(unet=engine.unet)["zero_context_skip"] == len(cross)
    seen = []
    real = fastpath.ZeroContextSkip.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        seen.append((self.rows, hidden_states.shape[0]))
        if self.rows:  # the rows it skips really have a zero context
            assert not encoder_hidden_states[:self.rows].any() and encoder_hidden_states[self.rows:].any()
        return real(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(fastpath.ZeroContextSkip, "__call__", spy)
    feats = _feats(2, engine)
    fast = _latents(engine, feats, [1, 2])
    assert seen and all(s == (2, 4) for s in seen)  # B=2 with CFG: rows 0-1 of 4 skipped, every layer
    assert all(p.rows == 0 for p in skips)  # reset after every call
    seen.clear()
    with fastpath.settings(enabled=False):
        plain = _latents(engine, feats, [1, 2])
    assert all(s == (0, 4) for s in seen)  # fast path off: every row computed
    assert torch.equal(fast, plain)
    seen.clear()
    no_cfg = _latents(engine, feats, [1, 2], guidance_scale=1.0)  # no uncond rows: nothing to skip
    assert all(s == (0, 2) for s in seen)
    with fastpath.settings(enabled=False):
        assert torch.equal(no_cfg, _latents(engine, feats, [1, 2], guidance_scale=1.0))


def test_compiled_unet_with_zero_context_skip_equals_plain(engine, monkeypatch):
    """compile=default traces the UNet through ZeroContextSkip (aot_eager here: the same tracing, no codegen)."""
    calls = []
    monkeypatch.setattr(fastpath, "_COMPILE_BACKEND", _counting_backend(calls))
    feats = _feats(1, engine, 8)
    with fastpath.settings(compile="default"):
        fast = _latents(engine, feats, [3])
        assert calls  # the compiled module ran
        no_cfg = _latents(engine, feats, [3], guidance_scale=1.0)  # rows 0: guarded, traced again
    with fastpath.settings(enabled=False):
        torch.testing.assert_close(fast, _latents(engine, feats, [3]), rtol=0, atol=1e-6)
        torch.testing.assert_close(no_cfg, _latents(engine, feats, [3], guidance_scale=1.0), rtol=0, atol=1e-6)


def test_zero_context_skip_only_where_exact():
    from diffusers.models.attention_processor import Attention

    assert fastpath.zero_context_exact(Attention(32, cross_attention_dim=16, heads=2, dim_head=16))
    assert not fastpath.zero_context_exact(Attention(32, heads=2, dim_head=16))  # self-attention
    assert not fastpath.zero_context_exact(Attention(32, cross_attention_dim=16, heads=2, dim_head=16, bias=True))
    assert not fastpath.zero_context_exact(Attention(32, cross_attention_dim=16, heads=2, dim_head=16,
                                                     cross_attention_norm="layer_norm"))
    assert not fastpath.zero_context_exact(Attention(32, cross_attention_dim=16, heads=2, dim_head=16,
                                                     residual_connection=True))
    unet = torch.nn.Sequential(Attention(32, cross_attention_dim=16, heads=2, dim_head=16, bias=True),
                               Attention(32, cross_attention_dim=16, heads=2, dim_head=16))
    assert fastpath.install_zero_context_skip(unet) == 1 and fastpath.install_zero_context_skip(unet) == 0
    assert isinstance(unet[1].processor, fastpath.ZeroContextSkip)
    assert not isinstance(unet[0].processor, fastpath.ZeroContextSkip)


def test_unet_graph_key_holds_the_zero_rows(engine, cpu_graphs):
    """B=1 with CFG and B=2 without both run the UNet on a batch of 2: they must not share a graph."""
    one = _latents(engine, _feats(1, engine, 3), [5])
    two = _latents(engine, _feats(2, engine, 4), [6, 7], guidance_scale=1.0)
    assert len(cpu_graphs) == 2
    fastpath.release(engine.unet)
    with fastpath.settings(enabled=False):
        torch.testing.assert_close(one, _latents(engine, _feats(1, engine, 3), [5]), rtol=0, atol=1e-6)
        torch.testing.assert_close(two, _latents(engine, _feats(2, engine, 4), [6, 7], guidance_scale=1.0),
                                   rtol=0, atol=1e-6)



def test_fast_path_state_lives_in_the_module_and_is_never_copied(engine):
    import copy
    import pickle

    ids = _ids(engine, "a fox")
    with torch.inference_mode(), fastpath.settings(static_on_cpu=True):
        mllm.decode(engine.mllm, [ids], [None], engine.image_ids, mllm.DecodeSettings(), engine.tokenizer.eos_id)
    assert fastpath.describe(engine.mllm)["decode"] == "static cache (eager)"
    assert "_wegen_fastpath" not in "".join(engine.mllm.state_dict())
    small = torch.nn.Linear(2, 2)
    fastpath._cache_of(small)["decoders"] = {"x": object()}
    assert copy.deepcopy(small).__dict__["_wegen_fastpath"] == {}
    assert pickle.loads(pickle.dumps(small)).__dict__["_wegen_fastpath"] == {}
    fastpath.release(engine.mllm, small)
    assert fastpath.describe(engine.mllm)["decode"] == "plain" and fastpath._cache_of(small) == {}



# Decode loop: the cheap CPU wins are exact -------------------------------------------------------

def test_forced_image_steps_compute_no_logits(engine):
    calls = []
    handle = engine.mllm.llm.lm_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        _decode(engine, [_ids(engine, "a fox")])
        assert calls == []  # prompt ends with <img>: every token is forced
        _decode(engine, [_ids(engine, "a fox", force_image=False)], mllm.DecodeSettings(max_new_tokens=3))
        assert calls  # text mode needs logits
    finally:
        handle.remove()


def test_batched_token_choice_equals_per_row_sampling(engine):
    """_pick_tokens (one transfer for all rows) draws what sample_next_token draws row by row."""
    image_ids = engine.image_ids
    h = torch.randn(3, engine.mllm_cfg.hidden, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = mllm.mask_image_ids(engine.mllm.logits(h), image_ids, True)
        for settings in (mllm.DecodeSettings(), mllm.DecodeSettings(temperature=0.7, top_p=0.8)):
            got = mllm._pick_tokens(engine.mllm, h, [0, 2], image_ids, settings, _gens(1, 2, 3))
            ref_gens = _gens(1, 2, 3)
            want = {b: mllm.sample_next_token(logits[b], ref_gens[b], settings.temperature, settings.top_p)
                    for b in (0, 2)}
            assert got == want


# Decoder: UNet runner, channels-last, bf16 -------------------------------------------------------

def test_unet_runner_is_the_plain_call_on_cpu(engine):
    feats = torch.randn(2, 64, engine.mllm_cfg.feature_dim)
    runner = fastpath.unet_runner(engine.unet, feats, {"text_embeds": feats.mean(1),
                                                       "time_ids": decoder.sdxl_time_ids(64, 64, 2, "cpu",
                                                                                        torch.float32)})
    assert isinstance(runner, fastpath.PlainDenoiser)


def test_channels_last_decoder_equals_contiguous(engine):
    """A CPU engine's VAE is channels-last, its UNet NCHW; the other layouts give the same latents and pixels."""
    import copy

    cl = torch.channels_last
    assert engine.vae.decoder.conv_in.weight.is_contiguous(memory_format=cl)
    assert not engine.unet.conv_in.weight.is_contiguous(memory_format=cl)  # channels-last UNet: CUDA only
    unet = copy.deepcopy(engine.unet).to(memory_format=cl)  # what a CUDA engine runs
    vae = copy.deepcopy(engine.vae).to(memory_format=torch.contiguous_format)
    feats = torch.randn(1, 64, engine.mllm_cfg.feature_dim, generator=torch.Generator().manual_seed(4))
    kw = dict(steps=3, guidance_scale=3.0, width=64, height=64)
    with torch.inference_mode():
        a = decoder.generate(engine.unet, engine.vae, engine.scheduler, engine.decoder_cfg, feats, [5], **kw)
        b = decoder.generate(unet, vae, engine.scheduler, engine.decoder_cfg, feats, [5], **kw)
        la = decoder.generate(unet, engine.vae, engine.scheduler, engine.decoder_cfg, feats, [5],
                              output="latents", **kw)
    assert a.shape == (1, 64, 64, 3) and la.shape == (1, 4, 8, 8) and la.is_contiguous()
    assert float((a - b).abs().max()) < 1e-4
    with torch.inference_mode():
        assert float((decoder.decode_latents(engine.vae, engine.decoder_cfg, la) - a).abs().max()) < 1e-4


def test_prepare_decoder_modules_layout_rule():
    def conv():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))

    cl = torch.channels_last
    for device, vae_cl in (("cpu", True), ("cuda", False)):
        unet, vae = conv(), conv()
        fastpath.prepare_decoder_modules(unet, vae, device)
        assert vae[0].weight.is_contiguous(memory_format=cl) is vae_cl
        assert not unet[0].weight.is_contiguous(memory_format=cl)
    unet, vae = conv(), conv()
    with fastpath.settings(enabled=False):
        fastpath.prepare_decoder_modules(unet, vae, "cpu")
    assert not vae[0].weight.is_contiguous(memory_format=cl)


def test_generate_rejects_unknown_output(engine):
    with pytest.raises(ValueError, match="output must be 'images' or 'latents', got 'pixels'"):
        decoder.generate(engine.unet, engine.vae, engine.scheduler, engine.decoder_cfg,
                         torch.zeros(1, 64, engine.mllm_cfg.feature_dim), [0], steps=1, width=64, height=64,
                         output="pixels")


def test_bf16_vae_decode_is_close_to_fp32(engine):
    """The GPU default decodes with a bf16 VAE; its pixels stay within bf16 rounding of fp32."""
    import copy

    vae16 = torch.nn.Module.to(copy.deepcopy(engine.vae), torch.bfloat16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = decoder.decode_latents(engine.vae, engine.decoder_cfg, latents)
        got = decoder.decode_latents(vae16, engine.decoder_cfg, latents)
    assert got.dtype == torch.float32 and float((got - ref).abs().max()) < 0.05


# Engine: offload policies, lazy EVA, spreading ---------------------------------------------------

@pytest.fixture(scope="module")
def fresh_engine(tiny_ckpt):
    return WeGenEngine(loading.load_parts(tiny_ckpt), device="cpu", dtype="fp32")


def test_eva_is_not_built_without_images(fresh_engine):
    fresh_engine.encode("a fox")
    fresh_engine.decode_pixels(fresh_engine.encode("a fox"), steps=1, width=64, height=64)
    assert not fresh_engine.eva_built


def test_phase_offload_keeps_only_the_running_stage_on_the_device(fresh_engine, monkeypatch):
    e = fresh_engine
    where, moves = {}, []

    def recorder(name, module):
        def to(*args, **kwargs):
            target = "cpu" if args and args[0] == "cpu" else "device"
            where[name] = target
            moves.append((name, target))
            return module
        return to

    names = {"mllm": e.mllm, "unet": e.unet, "vae": e.vae}
    for name, m in names.items():
        monkeypatch.setitem(m.__dict__, "to", recorder(name, m))
        where[name] = "cpu"
    monkeypatch.setattr(engine_mod, "_device_of", lambda m: torch.device(
        "cuda" if where.get(next(n for n, x in names.items() if x is m), "cpu") == "device" else "cpu"))
    monkeypatch.setattr(e, "offload", "phase")
    seen = {}
    cond = e.encode("a fox", callback=lambda d: seen.setdefault("tokens", dict(where)))
    e.decode_pixels(cond, steps=1, width=64, height=64, callback=lambda d: seen.setdefault("denoise", dict(where)))
    assert seen["tokens"] == {"mllm": "device", "unet": "cpu", "vae": "cpu"}
    assert seen["denoise"] == {"mllm": "cpu", "unet": "device", "vae": "device"}
    assert where == {"mllm": "cpu", "unet": "device", "vae": "device"}  # the last stage stays until the next
    assert not e.eva_built


def test_offload_policy_errors(fresh_engine, tiny_ckpt):
    with pytest.raises(ValueError, match="offload must be one of"):
        WeGenEngine(loading.load_parts(tiny_ckpt), device="cpu", offload="sometimes")
    with pytest.raises(ValueError, match="offload='spread' spreads the LLM over CUDA GPUs; device is 'cpu'"):
        WeGenEngine(loading.load_parts(tiny_ckpt), device="cpu", offload="spread")
    with pytest.raises(ValueError, match="set_offload switches between"):
        fresh_engine.set_offload("spread")
    fresh_engine.set_offload("phase")
    fresh_engine.set_offload("none")
    assert fresh_engine.offload == "none"


def test_spread_plan_splits_layers_between_gpus(engine):
    pytest.importorskip("accelerate")
    cfg = dict(engine.parts.llama_config)
    model = loading.build_mllm(engine.mllm_cfg, cfg)  # meta device: sizes only
    total = sum(p.numel() * 4 for p in model.parameters())
    plan = fastpath.spread_plan(model, {0: int(total * 0.8), 1: int(total * 0.8), "cpu": 0})
    assert set(plan.values()) == {0, 1}  # neither GPU holds it all; nothing left for the CPU or disk
    assert plan["llm.model.layers.0"] == 0 and plan["llm.model.layers.1"] == 1  # whole decoder layers


def test_spread_needs_accelerate(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match="pip install accelerate"):
        fastpath.spread_plan(torch.nn.Linear(2, 2), {0: 100})


# Settings --------------------------------------------------------------------------------------------

def test_settings_validation_and_env(monkeypatch):
    with pytest.raises(ValueError, match="unknown fast-path settings \\['graphs'\\]"):
        fastpath.configure(graphs=False)
    with pytest.raises(ValueError, match="compile must be one of"):
        fastpath.configure(compile="fast")
    monkeypatch.setenv("WEGEN_FASTPATH", "0")
    monkeypatch.setenv("WEGEN_COMPILE", "max-autotune")
    s = fastpath._settings_from_env()
    assert s.enabled is False and s.compile == "max-autotune"
    monkeypatch.setenv("WEGEN_COMPILE", "turbo")
    assert fastpath._settings_from_env().compile == "off"
    with fastpath.settings(cuda_graphs=False):
        assert fastpath.SETTINGS.cuda_graphs is False
    assert fastpath.SETTINGS.cuda_graphs is True

"""The decode fast path (wegen/fastdecode.py) equals the plain transformers loop: the static KV cache, the
compiled decode step and the decode step's graph, run on the CPU (fastpath.settings(static_on_cpu=True) runs
eagerly the very code a CUDA graph captures; tests/conftest.py's cpu_graphs replays it)."""
import pytest
import torch
from decode_helpers import close as _close
from decode_helpers import counting_backend as _counting_backend
from decode_helpers import decode as _decode
from decode_helpers import gens as _gens
from decode_helpers import ids as _ids

from wegen import fastdecode, fastpath, mllm, prompting

pytestmark = pytest.mark.usefixtures("one_thread")


# Decode: the static cache against the plain transformers loop -------------------------------------

def test_static_cache_decode_equals_plain_b1(engine):
    ids = _ids(engine, "a lighthouse on a cliff")
    plain = _decode(engine, [ids])[0]
    fast = _decode(engine, [ids], static=True)[0]
    assert fast.ids == plain.ids and len(fast.ids) == 65
    assert _close(fast.features, plain.features)


def test_static_cache_is_used_when_forced_and_not_by_default_on_cpu(engine, monkeypatch):
    calls = []
    real = fastdecode.StaticDecoder.step

    def counting(self, x):
        calls.append(x.shape)
        return real(self, x)

    monkeypatch.setattr(fastdecode.StaticDecoder, "step", counting)
    ids = _ids(engine, "a fox")
    _decode(engine, [ids])
    assert calls == []  # CPU default: the plain path
    _decode(engine, [ids], static=True)
    assert len(calls) == 64 and calls[0] == (1, 1, engine.mllm_cfg.hidden)


def test_static_cache_left_padded_batch_equals_plain(engine):
    rows = [_ids(engine, p) for p in ("a fox", "a lighthouse on a cliff at sunset, oil painting", "cat")]
    plain = _decode(engine, rows)
    fast = _decode(engine, rows, static=True)
    for p, f in zip(plain, fast):
        assert f.ids == p.ids
        assert _close(f.features, p.features)


def test_static_cache_text_sampling_equals_plain(engine):
    """Text mode with per-row generators (the rewrite helper's use): same tokens, row by row."""
    rows = [_ids(engine, "describe a cat", force_image=False, task="chat"), _ids(engine, "a dog", force_image=False)]
    settings = mllm.DecodeSettings(max_new_tokens=24, temperature=0.9, top_p=0.9, allow_image=False)
    plain = _decode(engine, rows, settings, gens=_gens(3, 4))
    fast = _decode(engine, rows, settings, static=True, gens=_gens(3, 4))
    assert [r.ids for r in fast] == [r.ids for r in plain]
    assert all(len(r.ids) > 1 for r in plain)


def test_static_cache_with_var_cfg_equals_plain(engine):
    ids = _ids(engine, "a red house")
    settings = mllm.DecodeSettings(var_cfg_scale=3.0)
    assert _close(_decode(engine, [ids], settings, static=True)[0].features,
                  _decode(engine, [ids], settings)[0].features)


def test_static_cache_prefix_reuse_equals_full_prefill(engine):
    """The chat helper's prefix= / keep_prompt_cache= through the static cache: same as a full prefill."""
    history = [prompting.Turn("a house near a river", reply="Here's a painting.", reply_images=1)]
    feats = [torch.randn(1, 64, engine.mllm_cfg.feature_dim, generator=torch.Generator().manual_seed(0))]
    ids1 = _ids(engine, "a house near a river", task="chat")
    ids2 = _ids(engine, "make the sky purple", history=history, task="chat")
    first = _decode(engine, [ids1], keep_prompt_cache=True)[0]
    common = next(i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    prefix = mllm.Prefix(first.prompt_cache, common)
    full = _decode(engine, [ids2], feats=feats)[0]
    fast = _decode(engine, [ids2], feats=feats, static=True, prefix=prefix, keep_prompt_cache=True)[0]
    assert fast.ids == full.ids
    assert _close(fast.features, full.features)
    assert fast.prompt_cache.get_seq_length() == len(ids2)


def test_static_decoder_refuses_to_overflow(engine):
    ids = _ids(engine, "a fox")
    with torch.inference_mode():
        embeds, mask, pos = mllm.build_prefill(engine.mllm, [ids], [None], engine.image_ids, "cpu", torch.float32)
        cache = mllm.new_cache(engine.mllm.llm)
        engine.mllm.forward_hidden(embeds, mask, pos, cache)
        dec = fastdecode.StaticDecoder(engine.mllm, 1, len(ids) + 2, use_graphs=False)
        dec.load(cache, mask, pos[:, -1] + 1)
        x = torch.zeros(1, 1, engine.mllm_cfg.hidden)
        dec.step(x)
        dec.step(x)
        with pytest.raises(RuntimeError, match="static KV cache of .* columns is full"):
            dec.step(x)


# Decode: the compiled step and its graph ----------------------------------------------------------

def test_compiled_decode_step_equals_plain(engine, monkeypatch):
    """compile=default also compiles the static-cache step: one program per 128-column bucket, same results."""
    calls = []
    monkeypatch.setattr(fastpath, "_COMPILE_BACKEND", _counting_backend(calls))
    short = _ids(engine, "a fox")
    long = _ids(engine, "a lighthouse on a cliff at sunset, oil painting, " * 6)
    with fastpath.settings(compile="default"):
        fast_short = _decode(engine, [short], static=True)[0]
        assert len(calls) == 1
        with torch.inference_mode(), fastpath.settings(static_on_cpu=True):
            mllm.decode(engine.mllm, [short], [None], engine.image_ids, mllm.DecodeSettings(), engine.tokenizer.eos_id)
        assert fastpath.describe(engine.mllm)["decode"] == "static cache (eager), compiled layer"
        fastpath.release(engine.mllm)
        assert len(calls) == 1  # a new decoder of the same shapes reuses the compiled program
        fast_long = _decode(engine, [long], static=True)[0]  # reuses the 128-column program, adds 256
        assert len(calls) == 2
    for ids, fast in ((short, fast_short), (long, fast_long)):
        plain = _decode(engine, [ids])[0]
        assert fast.ids == plain.ids and _close(fast.features, plain.features)


def test_compiled_decode_step_with_inductor_equals_plain(engine):
    """The real compiler (inductor's C++ backend on the CPU, ~15 s): same tokens, features to 1e-5."""
    ids = _ids(engine, "a lighthouse")
    with fastpath.settings(compile="default"):
        fast = _decode(engine, [ids], static=True)[0]
    plain = _decode(engine, [ids])[0]
    assert fast.ids == plain.ids and _close(fast.features, plain.features)


def test_compiled_decode_step_falls_back_when_the_compiler_fails(engine, monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(fastpath, "_COMPILE_BACKEND", broken)
    fastpath._LOGGED.discard("deccompile")
    ids = _ids(engine, "a fox")
    with fastpath.settings(compile="default"), caplog.at_level("INFO", logger="wegen.fastpath"):
        fast = _decode(engine, [ids], static=True)[0]
    assert "torch.compile of the decode step failed" in caplog.text
    assert _close(fast.features, _decode(engine, [ids])[0].features)


def test_decode_graph_replay_logic_equals_plain(engine, cpu_graphs):
    """Warm-up, state restore and one graph per 128-column bucket, replayed: the same tokens and features."""
    short = _ids(engine, "a fox")
    long = _ids(engine, "a lighthouse on a cliff at sunset, oil painting, " * 6)
    assert len(short) + 65 < fastdecode.KV_BUCKET < len(long) + 65 < 2 * fastdecode.KV_BUCKET
    for ids, graphs in ((short, 1), (long, 2)):
        cpu_graphs.clear()
        fast = _decode(engine, [ids], static=True)[0]
        plain = _decode(engine, [ids])[0]
        assert len(cpu_graphs) == graphs
        assert fast.ids == plain.ids and _close(fast.features, plain.features)


def test_decode_graph_of_the_compiled_step_equals_plain(engine, cpu_graphs, monkeypatch):
    """The compiled layer inside the captured step: compiled during the warm-up, then replayed."""
    calls = []
    monkeypatch.setattr(fastpath, "_COMPILE_BACKEND", _counting_backend(calls))
    ids = _ids(engine, "a fox in the snow")
    with fastpath.settings(compile="default"):
        fast = _decode(engine, [ids], static=True)[0]
    assert len(cpu_graphs) == 1 and len(calls) == 1
    plain = _decode(engine, [ids])[0]
    assert fast.ids == plain.ids and _close(fast.features, plain.features)


def test_decode_falls_back_when_capture_fails(engine, caplog):
    """On the CPU the real _capture_graph fails (no CUDA streams): the step runs eagerly, results unchanged."""
    ids = _ids(engine, "a fox")
    fastpath._LOGGED.discard("decgraph")
    with fastpath.settings(graphs_on_cpu=True), caplog.at_level("INFO", logger="wegen.fastpath"):
        fast = _decode(engine, [ids], static=True)[0]
    assert "CUDA graph capture of the decode step failed" in caplog.text
    assert _close(fast.features, _decode(engine, [ids])[0].features)


# Decode: when the fast path declines --------------------------------------------------------------

def test_decode_runner_declines_unsafe_cases(engine):
    ids = _ids(engine, "a fox")
    with torch.inference_mode():
        embeds, mask, pos = mllm.build_prefill(engine.mllm, [ids], [None], engine.image_ids, "cpu", torch.float32)
    cache = object()  # never read: every case below declines before loading
    assert fastdecode.decode_runner(engine.mllm, cache, mask, pos[:, -1], 65) is None  # CPU, not forced
    with fastpath.settings(static_on_cpu=True, enabled=False):
        assert fastdecode.decode_runner(engine.mllm, cache, mask, pos[:, -1], 65) is None
    with fastpath.settings(static_on_cpu=True), torch.enable_grad():
        assert fastdecode.decode_runner(engine.mllm, cache, mask, pos[:, -1], 65) is None  # autograd on


def test_unsupported_llm_reasons(engine, monkeypatch):
    assert fastdecode.llm_unsupported_reason(engine.mllm) is None
    monkeypatch.setattr(engine.mllm.llm.model.rotary_emb, "rope_type", "dynamic", raising=False)
    assert "rescales" in fastdecode.llm_unsupported_reason(engine.mllm)
    monkeypatch.undo()
    monkeypatch.setattr(engine.mllm.llm, "hf_device_map", {"": 0}, raising=False)
    assert "accelerate" in fastdecode.llm_unsupported_reason(engine.mllm)
    assert "not a transformers Llama" in fastdecode.llm_unsupported_reason(torch.nn.Linear(2, 2))

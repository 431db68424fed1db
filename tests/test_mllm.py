"""The MLLM decode loop (wegen.mllm) on the tiny checkpoint: against a plain float64 reference, cache/no-cache,
official/aligned slices, top-p, the forced-next rule, text-only mode."""
import pytest
import torch

from wegen import mllm, prompting
from wegen.engine import WeGenEngine


@pytest.fixture(scope="module")
def engine64(tiny_ckpt):
    return WeGenEngine.load(tiny_ckpt, dtype="fp64", device="cpu")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def reference_image_features(m, ids, image_ids, var_cfg_scale=1.0):
    """Straightforward VAR decode: recompute the whole sequence every step, no cache, no batching.

    `ids` ends with <img> (force_image). Returns (official, aligned) features (64, C).
    """
    def last_hidden(seq):
        return m.llm.model(inputs_embeds=torch.stack(seq)[None]).last_hidden_state[0, -1]

    seq = list(m.llm.model.embed_tokens(torch.tensor(ids)))
    uncond = [seq[-1]]  # the unconditional stream starts with the <img> embedding only
    h = last_hidden(seq)
    hs = [h]
    u = last_hidden(uncond)
    for _ in range(image_ids.n):
        guided = u + var_cfg_scale * (h - u) if var_cfg_scale != 1.0 else h
        e = m.input_resampler.proj(m.output_resampler.proj(guided))
        seq.append(e)
        h = last_hidden(seq)
        hs.append(h)
        uncond.append(e)
        u = last_hidden(uncond)
    hs = torch.stack(hs)  # (65, H): <img>, <img_0> .. <img_63>
    return m.output_resampler.proj(hs[1:]), m.output_resampler.proj(hs[:-1])


def _ids(engine, prompt, force_image=True, n_images=0):
    turns = [prompting.Turn(prompt, user_images=n_images)]
    return prompting.prompt_ids(engine.tokenizer, turns, 64, "generate", force_image=force_image)


@pytest.mark.parametrize("var_cfg_scale", [1.0, 3.0])
def test_decode_loop_matches_float64_reference(engine64, var_cfg_scale):
    ids = _ids(engine64, "a lighthouse on a cliff")
    with torch.inference_mode():
        official, aligned = reference_image_features(engine64.mllm, ids, engine64.image_ids, var_cfg_scale)
    cond = engine64.encode("a lighthouse on a cliff", var_cfg_scale=var_cfg_scale)
    assert cond.features.shape == (1, 64, 112)
    assert _rel(cond.features[0].double(), official) < 1e-6
    cond_a = engine64.encode("a lighthouse on a cliff", var_cfg_scale=var_cfg_scale, feature_slice="aligned")
    assert _rel(cond_a.features[0].double(), aligned) < 1e-6


def test_text_mode_matches_reference_greedy_rule(engine64):
    """Without <img>: argmax over logits where slot ids and </img> score 0.0 (release rule)."""
    ids = _ids(engine64, "describe a cat", force_image=False)
    image_ids = engine64.image_ids
    m = engine64.mllm
    expected, seq = [], list(ids)
    with torch.inference_mode():
        for _ in range(12):
            h = m.llm.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
            logits = m.llm.lm_head(h).float()
            logits[list(image_ids.slots)] = 0.0
            logits[image_ids.end] = 0.0
            token = int(logits.argmax())
            expected.append(token)
            seq.append(token)
            if token in (image_ids.start, engine64.tokenizer.eos_id):
                break
        settings = mllm.DecodeSettings(max_new_tokens=12)
        got = mllm.decode(m, [ids], [None], image_ids, settings, engine64.tokenizer.eos_id)[0].ids
    assert got[:len(expected)] == expected


def test_kv_cached_decode_equals_recompute(engine):
    ids = _ids(engine, "a cozy reading corner")
    with torch.inference_mode():
        cached = mllm.decode(engine.mllm, [ids], [None], engine.image_ids, mllm.DecodeSettings(), 2)[0]
        plain = mllm.decode(engine.mllm, [ids], [None], engine.image_ids, mllm.DecodeSettings(use_cache=False), 2)[0]
    assert cached.ids == plain.ids
    assert _rel(cached.features, plain.features) < 1e-5


def test_official_and_aligned_slices_are_one_position_apart(engine):
    official = engine.encode("a red fox").features[0]
    aligned = engine.encode("a red fox", feature_slice="aligned").features[0]
    torch.testing.assert_close(aligned[1:], official[:-1], rtol=0, atol=0)
    assert not torch.allclose(aligned, official)


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = mllm.top_p_filter(logits, 0.7)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert mllm.sample_next_token(logits, None, 0.0, 1.0) == 0


def test_forced_next_rule(engine):
    ids = engine.image_ids
    assert mllm.forced_next(ids.start, ids) == ids.slots[0]
    assert mllm.forced_next(ids.slots[5], ids) == ids.slots[6]
    assert mllm.forced_next(ids.slots[-1], ids) == ids.end
    assert mllm.forced_next(ids.end, ids) is None


def test_text_only_mode_bans_the_whole_image_block(engine):
    ids = engine.image_ids
    logits = torch.zeros(engine.tokenizer.vocab_size)
    official = mllm.mask_image_ids(logits, ids, allow_image=True)
    assert float(official[ids.slots[3]]) == 0.0 and float(official[ids.end]) == 0.0
    banned = mllm.mask_image_ids(logits, ids, allow_image=False)
    for token in (ids.start, ids.end, *ids.slots):
        assert banned[token] == float("-inf")
    result = mllm.decode(engine.mllm, [_ids(engine, "describe", force_image=False)], [None], ids,
                         mllm.DecodeSettings(max_new_tokens=30, temperature=5.0, allow_image=False), 2,
                         [torch.Generator().manual_seed(0)])[0]
    assert not set(result.ids) & {ids.start, ids.end, *ids.slots}

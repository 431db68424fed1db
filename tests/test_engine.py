"""Engine behaviour on the tiny checkpoint: the decode loop against a plain float64 reference,
cache/no-cache, slices, batching, pooling, seeds, the diffusion step math."""
import pytest
import torch

from wegen import decoder, mllm, prompting, vision
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


def test_var_cfg_changes_features(engine):
    plain = engine.encode("a fox").features
    guided = engine.encode("a fox", var_cfg_scale=3.0).features
    assert not torch.allclose(plain, guided)


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


def test_batch_of_three_equals_three_singles(engine):
    prompts = ["a fox", "a lighthouse on a cliff at sunset, oil painting", "cat"]
    batch = engine.encode(prompts).features
    singles = torch.cat([engine.encode(p).features for p in prompts])
    assert batch.shape == (3, 64, 112)
    assert float((batch - singles).abs().max()) < 1e-5


def test_batch_with_reference_images_equals_singles(engine):
    images = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    batch = engine.encode(["keep the fox", "make it blue please"], images).features
    singles = torch.cat([engine.encode(p, images).features for p in ["keep the fox", "make it blue please"]])
    assert float((batch - singles).abs().max()) < 1e-5


def test_eva_pooling_shapes_and_values(engine):
    tokens = torch.randn(2, 1024, 112)
    pooled = vision.avg_pool_tokens(tokens, 64)
    assert pooled.shape == (2, 64, 112)
    grid = tokens.view(2, 32, 32, 112)
    torch.testing.assert_close(pooled[:, 0], grid[:, :4, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[:, 9], grid[:, 4:8, 4:8].mean(dim=(1, 2)))
    assert vision.avg_pool_tokens(pooled, 64).shape == (2, 64, 112)  # 64 tokens: stride 1, unchanged
    feats = engine.encode_images(torch.rand(3, 30, 50, 3))
    assert feats.shape == (3, 64, 112) and feats.dtype == torch.float32
    with pytest.raises(AssertionError, match="square grid"):
        vision.avg_pool_tokens(torch.randn(1, 1000, 8), 64)


def test_preprocess_resizes_to_448_and_normalises():
    x = vision.preprocess(torch.ones(1, 20, 30, 3) * 0.5)
    assert x.shape == (1, 3, 448, 448)
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor((0.5 - 0.48145466) / 0.26862954))


def test_same_seed_same_image_other_seed_other_image(engine):
    cond = engine.encode("a fox")
    a = engine.decode_pixels(cond, seed=7, steps=3, width=64, height=64)
    b = engine.decode_pixels(cond, seed=7, steps=3, width=64, height=64)
    c = engine.decode_pixels(cond, seed=8, steps=3, width=64, height=64)
    assert a.shape == (1, 64, 64, 3) and a.dtype == torch.float32
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decode_batch_equals_singles_and_cfg_changes_output(engine):
    feats = torch.randn(2, 64, 112, generator=torch.Generator().manual_seed(0))
    batch = engine.decode_pixels(feats, seed=[3, 9], steps=2, cfg=4.0, width=64, height=48)
    one = engine.decode_pixels(feats[1:], seed=9, steps=2, cfg=4.0, width=64, height=48)
    assert batch.shape == (2, 48, 64, 3)
    torch.testing.assert_close(batch[1:], one, rtol=0, atol=1e-5)
    no_cfg = engine.decode_pixels(feats[1:], seed=9, steps=2, cfg=1.0, width=64, height=48)
    assert not torch.allclose(one, no_cfg)


def test_euler_step_matches_diffusers_scheduler(engine):
    sched = engine.scheduler
    timesteps, sigmas = decoder.euler_schedule(sched, 10)
    assert int(timesteps[0]) == 901 and int(timesteps[-1]) == 1  # leading spacing, steps_offset 1
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sched.set_timesteps(10)
    torch.testing.assert_close(decoder.scale_model_input(x, float(sigmas[0])),
                               sched.scale_model_input(x, sched.timesteps[0]))
    want = sched.step(eps, sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(decoder.euler_step(x, eps, float(sigmas[0]), float(sigmas[1])), want)
    assert decoder.init_noise_sigma(sigmas, "leading") == pytest.approx(float(sched.init_noise_sigma))


def test_time_ids_and_cfg_mix():
    ids = decoder.sdxl_time_ids(1024, 768, 2, "cpu", torch.float32)
    assert ids.tolist() == [[1024, 768, 0, 0, 1024, 768]] * 2
    u, c = torch.zeros(3), torch.ones(3)
    assert decoder.cfg_mix(u, c, 7.0).tolist() == [7.0] * 3


def test_reconstruct_and_understand(engine):
    image = torch.rand(1, 72, 96, 3)
    out = engine.reconstruct(image, steps=2, width=64, height=64)
    assert out.shape == (1, 64, 64, 3)
    text = engine.understand(image, "What is in this picture?", max_new_tokens=8)
    assert isinstance(text, str)
    sampled = [engine.understand(image, "What is this?", max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]


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


def test_bad_engine_inputs(engine):
    with pytest.raises(ValueError, match="feature_slice"):
        engine.encode("x", feature_slice="middle")
    with pytest.raises(ValueError, match="temperature"):
        engine.encode("x", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        engine.encode("x", top_p=0)
    with pytest.raises(ValueError, match="features must be"):
        engine.decode_pixels(torch.zeros(1, 10, 112))
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        engine.decode_pixels(torch.zeros(1, 64, 112), width=100, height=64)
    with pytest.raises(ValueError, match="steps must be"):
        engine.decode_pixels(torch.zeros(1, 64, 112), steps=0, width=64, height=64)
    with pytest.raises(ValueError, match="mask needs a reference"):
        engine.decode_pixels(torch.zeros(1, 64, 112), mask=torch.ones(1, 64, 64), width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="images must be"):
        engine.encode_images(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="seed must be"):
        engine.decode_pixels(torch.zeros(1, 64, 112), seed=-1, steps=1, width=64, height=64)
    with pytest.raises(RuntimeError, match="no image"):
        engine.encode("x", force_image=False, max_new_tokens=3)


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


# The public engine API (README "Engine API") ----------------------------------------------------------

def test_generate_tokens_and_reply_text_are_what_encode_and_understand_run(engine):
    ids = _ids(engine, "a fox")
    settings = mllm.DecodeSettings(max_new_tokens=512)
    row = engine.generate_tokens([ids], [None], settings, [0])[0]
    cond = engine.encode("a fox")
    assert torch.equal(row.features.float().cpu(), cond.features[0])
    assert engine.reply_text(row.ids) == cond.texts[0]
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    turns = [prompting.Turn(user="what is it?", user_images=1)]
    q = prompting.prompt_ids(engine.tokenizer, turns, engine.mllm_cfg.n_query, "chat")
    text = mllm.DecodeSettings(max_new_tokens=6, allow_image=False)
    row = engine.generate_tokens([q], [engine.encode_images(image)], text, [0])[0]
    assert engine.reply_text(row.ids) == engine.understand(image, "what is it?", max_new_tokens=6)


def test_release_frees_the_prefix_cache_with_the_llm_only(engine):
    from transformers import DynamicCache

    kv = DynamicCache()
    kv.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    engine.prefix_cache.store([1, 2, 3, 4], {}, kv)
    engine.release("unet", "vae", "eva")
    assert len(engine.prefix_cache) >= 1
    engine.release()  # everything
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.nbytes == 0
    with pytest.raises(ValueError, match=r"release takes module names among .*got \['llm'\]"):
        engine.release("llm")
    cond = engine.encode("a fox")  # what was freed is rebuilt on use; the results do not change
    torch.testing.assert_close(cond.features, engine.encode("a fox").features, rtol=0, atol=0)


def test_one_seed_wraps_past_the_last_seed_like_the_nodes(engine):
    from wegen import rules

    feats = torch.randn(2, 64, 112, generator=torch.Generator().manual_seed(0))
    wrapped = engine.decode_pixels(feats, seed=rules.MAX_SEED, steps=1, width=64, height=64)
    explicit = engine.decode_pixels(feats, seed=[rules.MAX_SEED, 0], steps=1, width=64, height=64)
    assert torch.equal(wrapped, explicit)
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.2\*\*64-1, got 18446744073709551616"):
        engine.decode_pixels(feats[:1], seed=[rules.MAX_SEED + 1], steps=1, width=64, height=64)

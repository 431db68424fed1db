"""preset="release": the release's noise, token budget and input preprocessing, each checked against a
straightforward reimplementation of what the release does (written out here), on the CPU in fp32."""
import pytest
import torch

from wegen import decoder, mllm, prompting, vision
from wegen.engine import WeGenEngine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def release(tiny_ckpt):
    return WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", preset="release")


# Noise: diffusers' randn_tensor with the pipeline's `torch.Generator(device).manual_seed(seed)` ------------

def release_noise(seed: int, shape: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    """StableDiffusionXLPipeline.prepare_latents, batch 1: randn_tensor(shape, generator, device, dtype)."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_release_noise_is_the_pipelines_draw(dtype):
    shape = (4, 16, 24)
    got = decoder.initial_noise([42, 7], shape, "device", "cpu", dtype)
    want = torch.cat([release_noise(s, shape, "cpu", dtype) for s in (42, 7)]).float()
    assert torch.equal(got, want)
    from diffusers.utils.torch_utils import randn_tensor  # the release pipeline's own helper

    gens = [torch.Generator("cpu").manual_seed(s) for s in (42, 7)]
    assert torch.equal(got, randn_tensor((2, *shape), generator=gens, device=torch.device("cpu"), dtype=dtype).float())


def test_default_noise_is_cpu_fp32_whatever_the_model_dtype():
    shape = (4, 8, 8)
    got = decoder.initial_noise([3], shape)
    assert got.dtype == torch.float32 and torch.equal(got, release_noise(3, shape, "cpu", torch.float32))
    assert not torch.equal(decoder.initial_noise([3], shape, "device", "cpu", torch.bfloat16), got)
    with pytest.raises(ValueError, match="noise source must be one of"):
        decoder.initial_noise([3], shape, "gpu")


def test_release_engine_draws_noise_on_its_device_in_its_dtype(release, engine, monkeypatch):
    seen = []
    real = decoder.initial_noise

    def spy(seeds, shape, source="cpu", device="cpu", dtype=torch.float32):
        seen.append((source, str(device), dtype))
        return real(seeds, shape, source, device, dtype)

    monkeypatch.setattr(decoder, "initial_noise", spy)
    feats = torch.randn(1, 64, release.mllm_cfg.feature_dim, generator=torch.Generator().manual_seed(0))
    a = release.decode_pixels(feats, seed=5, steps=2, width=64, height=64)
    b = engine.decode_pixels(feats, seed=5, steps=2, width=64, height=64)
    assert seen == [("device", "cpu", torch.float32), ("cpu", "cpu", torch.float32)]
    assert torch.equal(a, b)  # on the CPU in fp32 both draws are the same numbers


# Token budget: every generated token counts, image block included -----------------------------------

def release_greedy(model, ids, image_ids, eos_id, max_new_tokens):
    """The release's VAR greedy search written plainly: recompute the whole sequence each step, image ids scored
    0.0 in text mode, <img_k> forced after <img>, stop at EOS or after max_new_tokens generated tokens."""
    embeds = model.embed_tokens(torch.tensor(ids))[None]
    out = []
    while len(out) < max_new_tokens:
        T = embeds.shape[1]
        h = model.forward_hidden(embeds, torch.ones(1, T, dtype=torch.long), torch.arange(T)[None])[0, -1]
        prev = out[-1] if out else ids[-1]
        forced = mllm.forced_next(prev, image_ids)
        if forced is None:
            logits = model.logits(h)
            logits[[*image_ids.slots, image_ids.end]] = 0.0
            token = int(logits.argmax())
        else:
            token = forced
        out.append(token)
        if token == eos_id:
            break
        nxt = model.feedback_embedding(h) if token in image_ids.slots else model.embed_tokens(torch.tensor([token]))[0]
        embeds = torch.cat([embeds, nxt[None, None]], dim=1)
    return out


@pytest.mark.parametrize("force_image,budget", [(True, 40), (True, 70), (False, 12)])
def test_release_token_budget_counts_every_generated_token(release, force_image, budget):
    ids = prompting.prompt_ids(release.tokenizer, [prompting.Turn("a red fox")], 64, "generate",
                               force_image=force_image)
    settings = mllm.DecodeSettings(max_new_tokens=budget, stop_after_image=False)
    with torch.inference_mode():
        got = release.generate_tokens([ids], [None], settings, [0], None)[0]
        want = release_greedy(release.mllm, ids, release.image_ids, release.tokenizer.eos_id, budget)
    assert got.ids == want
    assert len(want) <= budget and (len(want) == budget or want[-1] == release.tokenizer.eos_id)


def test_default_budget_counts_text_tokens_only(engine, release):
    """40 tokens cannot hold the forced 65-token image block under the release's count; the default's can."""
    assert engine.encode("a red fox", max_new_tokens=40).features.shape[1] == 64
    with pytest.raises(RuntimeError, match="no image for prompt"):
        release.encode("a red fox", max_new_tokens=40)
    torch.testing.assert_close(release.encode("a red fox", max_new_tokens=70).features,
                               engine.encode("a red fox", max_new_tokens=70).features, rtol=0, atol=0)


# Preprocessing: torchvision Resize((448, 448)) = bilinear with antialias, then CLIP normalisation -------

def _triangle_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of an antialiased bilinear (triangle filter) resize, as torchvision's tensor path
    and PIL compute it: support widens with the scale when shrinking, weights normalised per output pixel."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            w[i, j] = max(0.0, 1.0 - abs((j - center + 0.5) / support))
        w[i] /= w[i].sum()
    return w


def release_preprocess(images: torch.Tensor, size: int = 448) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).double()  # (B, 3, H, W)
    wh, ww = _triangle_weights(x.shape[2], size), _triangle_weights(x.shape[3], size)
    x = torch.einsum("oh,bchw,pw->bcop", wh, x, ww)
    mean = torch.tensor(vision.CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(vision.CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


@pytest.mark.parametrize("h,w", [(300, 500), (64, 64), (448, 1000)])
def test_release_resize_is_torchvisions_bilinear_antialias(h, w):
    images = torch.rand(2, h, w, 3, generator=torch.Generator().manual_seed(h + w))
    want = release_preprocess(images)
    # float32 kernel vs a float64 reference: 2e-4 after normalisation is 5e-5 in 0..1 pixels, 1/80 of an 8-bit step
    torch.testing.assert_close(vision.preprocess(images, 448, "bilinear"), want, rtol=0, atol=2e-4)
    assert float((vision.preprocess(images, 448) - want).abs().max()) > 1e-3  # the default (bicubic) differs


def test_release_engine_encodes_the_release_pixels(release, engine):
    size = release.eva_cfg.image_size
    images = torch.rand(1, size + 37, size * 2, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = vision.avg_pool_tokens(release.eva(release_preprocess(images, size)), release.eva_cfg.n_query)
    torch.testing.assert_close(release.encode_images(images), want, rtol=0, atol=1e-4)
    assert float((engine.encode_images(images) - want).abs().max()) > 1e-4


def test_release_preset_dtypes_and_bad_names(tiny_ckpt):
    from wegen.engine import resolve_dtype

    assert resolve_dtype("auto", torch.device("cuda"), "release") == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), "release") == torch.float32
    e = WeGenEngine.load(tiny_ckpt, dtype="bf16", device="cpu", preset="release")
    assert e.vae.dtype == torch.float32 and e.unet.dtype == torch.bfloat16  # the VAE decodes upcast
    with pytest.raises(ValueError, match="preset must be one of"):
        WeGenEngine.load(tiny_ckpt, dtype="fp32", device="cpu", preset="official")

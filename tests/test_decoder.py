"""wegen/decoder.py: the scheduler config's prediction_type is honoured as diffusers' Euler scheduler does.

epsilon (the release's) is untouched; "sample" and "v_prediction" (the toy checkpoint trains on "sample") are
converted to the noise they imply, so every Euler update equals EulerDiscreteScheduler.step's; anything else is
refused before the UNet runs. The training target (wegen.train.stage1) and the engine's reading of it agree.
"""
import pytest
import torch

from wegen import decoder
from wegen.tiny import SDXL_SCHEDULER

TYPES = ("epsilon", "sample", "v_prediction")


def _scheduler(prediction_type, **extra):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(dict(SDXL_SCHEDULER, prediction_type=prediction_type, **extra))


def _fake_model(x_in, t):
    """A deterministic stand-in for the UNet: depends on its input and on the timestep."""
    return torch.tanh(1.3 * x_in) * (0.2 + float(t) / 1000.0) + 0.05 * torch.cos(x_in * float(t) / 100.0)


def test_epsilon_is_the_identity():
    out = torch.randn(2, 4, 8, 8)
    x = torch.randn(2, 4, 8, 8)
    before = out.clone()
    assert decoder.to_epsilon(out, x, 3.5, "epsilon") is out
    assert torch.equal(out, before)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_conversion_formulas(prediction_type):
    """eps = (x - x0) / sigma with x0 = output (sample) or x / (s^2 + 1) - output * s / sqrt(s^2 + 1) (v)."""
    g = torch.Generator().manual_seed(0)
    out, x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    s = 2.0
    x0 = out if prediction_type == "sample" else x / 5.0 - out * (2.0 / 5.0 ** 0.5)
    torch.testing.assert_close(decoder.to_epsilon(out, x, s, prediction_type), (x - x0) / s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_euler_loop_equals_diffusers_step(prediction_type):
    """A full 10-step sampling loop of a fake model: the decoder's step math == EulerDiscreteScheduler.step."""
    ref = _scheduler(prediction_type)
    ref.set_timesteps(10)
    ours = _scheduler(prediction_type)
    timesteps, sigmas = decoder.euler_schedule(ours, 10)
    assert torch.equal(timesteps, ref.timesteps)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_ref = noise * ref.init_noise_sigma
    x = noise * decoder.init_noise_sigma(sigmas, SDXL_SCHEDULER["timestep_spacing"])
    torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=0)
    for i, t in enumerate(timesteps):
        out_ref = _fake_model(ref.scale_model_input(x_ref, t), t)
        x_ref = ref.step(out_ref, t, x_ref).prev_sample
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        out = _fake_model(decoder.scale_model_input(x, sigma), t)
        x = decoder.euler_step(x, decoder.to_epsilon(out, x, sigma, prediction_type), sigma, sigma_next)
        # diffusers computes the step in float32 (it upcasts `sample` to float32, not float64)
        torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    assert x.dtype == torch.float64 and x.abs().max() < 100


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_the_other_types_change_the_update(prediction_type):
    """The same model output read as another prediction type must give another update (the test can fail)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    eps = decoder.euler_step(x, decoder.to_epsilon(out, x, 5.0, "epsilon"), 5.0, 3.0)
    other = decoder.euler_step(x, decoder.to_epsilon(out, x, 5.0, prediction_type), 5.0, 3.0)
    assert not torch.allclose(eps, other)


def _sdxl_pipeline_latents(unet, scheduler, features, seed, steps, guidance, size):
    """StableDiffusionXLPipeline's loop (no text encoders, CFG against zero context), written with diffusers' step."""
    scheduler.set_timesteps(steps)
    x = decoder.initial_noise([seed], (4, size // 8, size // 8)) * scheduler.init_noise_sigma
    ctx = torch.cat([torch.zeros_like(features), features])
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    added = {"text_embeds": ctx.mean(1), "time_ids": time_ids}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(x_in, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        u, c = out.chunk(2)
        x = scheduler.step(u + guidance * (c - u), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", TYPES)
def test_generate_matches_the_diffusers_loop(engine, one_thread, prediction_type):
    """decoder.generate with a real (tiny) UNet and CFG == the pipeline loop with EulerDiscreteScheduler.step."""
    features = torch.randn(1, 64, engine.decoder_cfg.context_dim, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ours = decoder.generate(engine.unet, engine.vae, _scheduler(prediction_type), engine.decoder_cfg, features,
                                [7], steps=10, guidance_scale=3.0, width=64, height=64, output="latents")
        ref = _sdxl_pipeline_latents(engine.unet, _scheduler(prediction_type), features, 7, 10, 3.0, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    if prediction_type != "epsilon":  # the type is really read: the epsilon loop gives other latents
        with torch.inference_mode():
            eps = decoder.generate(engine.unet, engine.vae, _scheduler("epsilon"), engine.decoder_cfg, features,
                                   [7], steps=10, guidance_scale=3.0, width=64, height=64, output="latents")
        assert not torch.allclose(eps, ours, atol=1e-3)


class _NoUNet:
    """Has what generate reads before the loop; any call is a failure."""

    device, dtype = torch.device("cpu"), torch.float32

    def __call__(self, *args, **kwargs):
        pytest.fail("the UNet was called")


@pytest.mark.parametrize("bad", ["x0", "EPSILON", ""])
def test_unknown_prediction_type_is_refused_before_the_unet(bad):
    features = torch.zeros(1, 64, 8)
    with pytest.raises(ValueError, match=f"prediction_type .*{bad!r}"):
        decoder.generate(_NoUNet(), None, _scheduler(bad), decoder.DecoderConfig(context_dim=8), features, [0],
                         steps=2, width=64, height=64)
    with pytest.raises(ValueError, match=repr(bad)):
        decoder.to_epsilon(features, features, 1.0, bad)


def test_engine_refuses_an_unknown_prediction_type(engine, monkeypatch):
    """Through the engine: a checkpoint whose scheduler says prediction_type 'x0' decodes nothing."""
    monkeypatch.setattr(engine, "scheduler", _scheduler("x0"))
    monkeypatch.setattr(engine.unet, "forward", lambda *a, **k: pytest.fail("the UNet was called"))
    with pytest.raises(ValueError, match="'x0'"):
        engine.decode_pixels(torch.zeros(1, 64, engine.decoder_cfg.context_dim), steps=2, width=64, height=64)


@pytest.mark.parametrize("prediction_type", TYPES)
def test_training_target_read_back_by_the_engine_is_the_noise(prediction_type):
    """stage 1's target for (x0, noise, t), read by to_epsilon at that t's sigma, gives back the noise: what the
    UNet learns is what the decoder assumes it predicts."""
    from wegen.train.stage1 import alphas_cumprod, diffusion_target

    config = dict(SDXL_SCHEDULER, prediction_type=prediction_type)
    ac = alphas_cumprod(config).double()
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g,
                                                                                        dtype=torch.float64)
    for t in (0, 10, 500, 999):
        a = ac[t]
        sigma = float(((1 - a) / a).sqrt())
        x = x0 + sigma * noise  # Euler's latents; the UNet sees x / sqrt(sigma^2 + 1) = sqrt(a) x0 + sqrt(1-a) noise
        torch.testing.assert_close(decoder.scale_model_input(x, sigma), a.sqrt() * x0 + (1 - a).sqrt() * noise)
        target = diffusion_target(config, x0, noise, a)
        torch.testing.assert_close(decoder.to_epsilon(target, x, sigma, prediction_type), noise, rtol=1e-9,
                                   atol=1e-9)


def test_training_schedule_and_velocity_match_diffusers():
    from diffusers import DDPMScheduler

    from wegen.train.stage1 import alphas_cumprod, diffusion_target
    from wegen.train.toymodel import SCHEDULER_TOY

    assert SCHEDULER_TOY["prediction_type"] == "sample"
    ours = alphas_cumprod(SCHEDULER_TOY)
    ref = _scheduler(SCHEDULER_TOY["prediction_type"]).alphas_cumprod
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 100, 600, 999])
    v = diffusion_target({"prediction_type": "v_prediction"}, x0, noise, ours[t].view(-1, 1, 1, 1))
    torch.testing.assert_close(v, ddpm.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'x0'"):
        diffusion_target({"prediction_type": "x0"}, x0, noise, ours[t].view(-1, 1, 1, 1))

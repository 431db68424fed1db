"""Stage 2 losses (wegen/train/stage2.py) on a hand-made batch and a one-layer MLLM: which hidden state is
regressed, which tokens are CE targets, where noise goes. Its data batches on the toy folder: tests/test_train.py."""
import torch
import torch.nn.functional as F

from wegen.train import stage2


def _small_mllm(vocab=40, hidden=16, feature_dim=8, n=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    from wegen.mllm import MllmConfig, WeGenMLLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return WeGenMLLM(MllmConfig(hidden=hidden, feature_dim=feature_dim, n_query=n, n_gen_tokens=n),
                     LlamaForCausalLM(config))


def _hand_batch():
    """Row 0: a generated block at 4..7; row 1 (padded): an input block at 2..5, nothing generated."""
    IMG, END, S = 30, 31, [32, 33, 34, 35]
    row0 = [1, 5, 6, IMG, *S, END, 2]
    row1 = [1, IMG, *S, END, 7, 8, 2]
    L = 11
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for b, r in enumerate((row0, row1)):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    loss_mask = torch.zeros(2, L, dtype=torch.bool)
    loss_mask[0, [2, 7, 8]] = True  # -> <img>, </img>, EOS
    loss_mask[1, [6, 7, 8]] = True  # -> 7, 8, EOS
    g = torch.Generator().manual_seed(3)
    f0, f1 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    return {"ids": ids, "mask": mask, "loss_mask": loss_mask, "blocks": [(0, 4, f0, True), (1, 2, f1, False)]}


def test_losses_regress_from_the_position_before_each_slot_and_ce_targets_next_tokens(monkeypatch):
    model = _small_mllm()
    batch = _hand_batch()
    seen = {}
    h = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)

    def forward_hidden(embeds, attention_mask, position_ids, cache=None):
        seen.update(embeds=embeds.detach(), mask=attention_mask, positions=position_ids)
        return h

    monkeypatch.setattr(model, "forward_hidden", forward_hidden)
    out = stage2.losses(model, batch, feature_std=2.0, gen=None, device="cpu")
    ids = batch["ids"]
    (_, _, f0, _), (_, _, f1, _) = batch["blocks"]

    # inputs: token embeddings, with in_proj(features) on the slots of both blocks (no noise without a generator)
    with torch.no_grad():
        expected = model.embed_tokens(ids).clone()
        expected[0, 4:8] = model.input_resampler(f0)
        expected[1, 2:6] = model.input_resampler(f1)
    torch.testing.assert_close(seen["embeds"], expected)
    assert seen["positions"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9] and seen["mask"][1, -1] == 0

    # CE: the logits at the masked positions against the next token
    rows, cols = batch["loss_mask"].nonzero(as_tuple=True)
    want_ce = F.cross_entropy(model.logits(h[rows, cols]), ids[rows, cols + 1])
    torch.testing.assert_close(out["ce"], want_ce)
    assert ids[0, [3, 8, 9]].tolist() == [30, 31, 2]
    # regression: slot k's feature from the hidden state at slot k - 1 (<img> for k = 0), generated blocks only
    pred = model.output_resampler(h[0, 3:7])
    torch.testing.assert_close(out["mse"], F.mse_loss(pred, f0) / 4.0)
    torch.testing.assert_close(out["cos"], (1 - F.cosine_similarity(pred, f0, dim=-1)).mean())

    # and through the gradients: which hidden states each loss reads
    (grad,) = torch.autograd.grad(out["mse"] + out["cos"], h, retain_graph=True)
    assert grad.abs().sum(-1).nonzero().tolist() == [[0, 3], [0, 4], [0, 5], [0, 6]]
    (grad,) = torch.autograd.grad(out["ce"], h)
    assert grad.abs().sum(-1).nonzero().tolist() == [[0, 2], [0, 7], [0, 8], [1, 6], [1, 7], [1, 8]]


def test_losses_feed_noise_only_into_generated_blocks_and_train_every_part():
    model = _small_mllm()
    batch = _hand_batch()
    seen = []
    original = model.forward_hidden

    def spy(embeds, *args, **kwargs):
        seen.append(embeds.detach())
        return original(embeds, *args, **kwargs)

    model.forward_hidden = spy
    stage2.losses(model, batch, 2.0, None, "cpu")
    out = stage2.losses(model, batch, 2.0, torch.Generator().manual_seed(0), "cpu")
    clean, noisy = seen
    assert not torch.allclose(clean[0, 4:8], noisy[0, 4:8])  # the generated block: fed with noise
    assert torch.equal(clean[1, 2:6], noisy[1, 2:6])  # the input image: as it is
    assert torch.equal(clean[0, :4], noisy[0, :4]) and torch.equal(clean[0, 8:], noisy[0, 8:])
    (out["ce"] + out["mse"] + out["cos"]).backward()
    for name in ("input_resampler.proj.weight", "output_resampler.proj.weight", "llm.lm_head.weight",
                 "llm.model.layers.0.self_attn.q_proj.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_losses_without_generated_images_regress_nothing():
    model = _small_mllm()
    batch = _hand_batch()
    batch["blocks"] = [b[:3] + (False,) for b in batch["blocks"]]
    out = stage2.losses(model, batch, 2.0, None, "cpu")
    assert out["mse"].item() == 0 and out["cos"].item() == 0 and out["ce"].item() > 0

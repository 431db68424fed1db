"""Helpers shared by tests/test_fastpath.py and tests/test_fastdecode.py: prompt ids, one decode with or without
the static cache, seeded generators, a relative closeness check and a counting torch.compile backend."""
import torch

from wegen import fastpath, mllm, prompting


def ids(engine, prompt, force_image=True, history=None, task="generate"):
    turns = list(history or []) + [prompting.Turn(prompt)]
    return prompting.prompt_ids(engine.tokenizer, turns, 64, task, force_image=force_image)


def decode(engine, rows, settings=None, static=False, gens=None, feats=None, **kw):
    settings = settings or mllm.DecodeSettings()
    feats = feats or [None] * len(rows)
    with torch.inference_mode(), fastpath.settings(static_on_cpu=static):
        out = mllm.decode(engine.mllm, rows, feats, engine.image_ids, settings, engine.tokenizer.eos_id, gens, **kw)
    fastpath.release(engine.mllm)
    return out


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


def counting_backend(calls, inner="aot_eager"):
    """A torch.compile backend that records each compiled graph and hands it to `inner`."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return lookup_backend(inner)(gm, example_inputs)

    return backend

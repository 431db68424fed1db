"""bench/: the harness runs end to end on the tiny model, and its stock path computes what the engine computes.

Timings are never asserted: only that every figure is there, well formed, and that stock and ours
agree where they compute the same function.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import models, run, stock
from wegen import decoder, loading, prompting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_run(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = str(out / "cpu.json")
    assert run.main(["--size", "tiny", "--device", "cpu", "--json", path, "--quick", "--tiny-dir", tiny_ckpt,
                     "--workdir", str(out / "work"), "--threads", "1"]) == 0
    with open(path, encoding="utf-8") as f:
        return json.load(f), path


def test_quick_run_writes_every_figure(quick_run):
    doc, path = quick_run
    assert doc["device"].startswith("cpu") and doc["size"] == "tiny" and doc["quick"] is True
    assert [f["name"] for f in doc["figures"]] and {f["name"] for f in doc["figures"]} == set(run.FIGURES)
    for f in doc["figures"]:
        assert set(f) >= {"name", "stock_s", "ours_s", "ratio"}
        if f["note"].startswith("skipped"):
            assert f["name"] == "peak memory"  # --quick starts no child process
            continue
        assert f["stock_s"] > 0 and f["ours_s"] > 0 and f["ratio"] == pytest.approx(f["stock_s"] / f["ours_s"])
    table = open(os.path.splitext(path)[0] + ".md", encoding="utf-8").read()
    assert all(name in table for name in run.FIGURES)


def test_quick_run_checks_agree(quick_run):
    """Every timed figure checks that both paths computed the same thing, within its stated tolerance."""
    doc, _ = quick_run
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["decode: ours vs plain transformers loop"]["max_abs_diff"] == 0  # CPU default: the plain loop
    for prefix in ("decode: ours vs stock", "UNet latents", "VAE pixels", "full turn pixels", "chat turn 5",
                   "sweep features", "sweep pixels", "load: mllm", "load: unet"):
        assert any(name.startswith(prefix) for name in checks), prefix
    assert all(c["passed"] and c["finite"] and c["value"] <= c["tolerance"] for c in doc["checks"])
    assert any(f.get("label", "").startswith("VAE decode (stock fp32 NCHW, ours fp32") for f in doc["figures"])


def test_a_failed_check_fails_the_run(monkeypatch, tiny_ckpt, tmp_path):
    from bench import figures

    monkeypatch.setitem(figures.TOL, "vae", ("mean", -1.0, -1.0))  # nothing can pass
    path = str(tmp_path / "cpu.json")
    assert run.main(["--size", "tiny", "--device", "cpu", "--json", path, "--quick", "--tiny-dir", tiny_ckpt,
                     "--workdir", str(tmp_path / "work"), "--threads", "1", "--only", "3,4"]) == 1
    doc = json.load(open(path, encoding="utf-8"))
    assert [c["passed"] for c in doc["checks"]] == [True, False]


def test_verdicts_call_only_consistent_runs_a_speedup():
    assert run.verdict({"stock": [2.0, 2.2, 2.1], "ours": [1.0, 1.1, 1.0]}, False).startswith("faster in every run")
    assert run.verdict({"stock": [1.0, 1.2, 0.9], "ours": [1.0, 1.0, 1.0]}, False).startswith("same arithmetic")
    assert run.verdict({"stock": [1.0, 1.2, 0.9], "ours": [1.0, 1.0, 1.0]}, True).startswith("within noise")
    assert run.verdict({"stock": [1.0], "ours": [0.5]}, False).startswith("n/a")
    noise = run.machine_noise(runs=3)
    assert noise["runs"] == 3 and noise["spread"] >= 0


def test_peak_memory_child_reports_growth(quick_run, tiny_ckpt, tmp_path):
    """The CPU peak-memory figure's child, run in this process (the quick run skips it)."""
    converted = loading.convert(tiny_ckpt, str(tmp_path / "converted"))
    args = run.parse_args(["--json", str(tmp_path / "x.json"), "--device", "cpu", "--quick", "--child", "ours",
                           "--tiny-dir", converted])
    result = run.child_peak(args)
    assert result["peak_gb"] >= 0 and result["baseline_gb"] > 0
    assert torch.tensor(result["thumb"]).shape == (1, 3, 8, 8)  # the parent compares both paths' pictures


def test_full_size_refuses_cpu():
    with pytest.raises(SystemExit, match="--size full runs the official dimensions .* on a CUDA GPU"):
        run.check_full_size("cpu")


@pytest.mark.integration
def test_full_size_on_cpu_exits_with_the_message(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--size", "full", "--device", "cpu",
                          "--json", str(tmp_path / "x.json")], capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "use --size tiny here" in out.stderr.lower()
    assert not (tmp_path / "x.json").exists()


def test_stock_decode_and_denoise_equal_the_engine(engine):
    sm = stock.from_engine(engine)
    ids = prompting.prompt_ids(engine.tokenizer, [prompting.Turn("a fox")], 64, "generate", force_image=True)
    feats = stock.decode_image_tokens(sm, ids)
    torch.testing.assert_close(feats, engine.encode("a fox").features[0], rtol=0, atol=1e-5)
    f = torch.randn(1, 64, engine.mllm_cfg.feature_dim, generator=torch.Generator().manual_seed(3))
    ours = decoder.generate(engine.unet, engine.vae, engine.scheduler, engine.decoder_cfg, f, [2], steps=3,
                            guidance_scale=2.0, width=64, height=64, output="latents")
    theirs = stock.denoise(sm, f, 2, 3, 2.0, 64, 64)
    assert float((ours - theirs).abs().max()) < 1e-4 * float(theirs.abs().max())
    assert not sm.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert sm.vae32.dtype == torch.float32


def test_full_size_pieces_without_a_gpu(tmp_path):
    """The 32330-token tokenizer and the random-weight rule of the full-size builder (no 27 GB init here)."""
    tok = prompting.WeGenTokenizer(models.full_tokenizer(str(tmp_path / "tok")))
    assert tok.vocab_size == models.LLAMA2_7B["vocab_size"] == 32330
    assert tok.image_token_ids(64).start == 32000
    block = torch.nn.ModuleDict({"proj": torch.nn.Linear(400, 300), "norm": torch.nn.LayerNorm(300)})
    state = models.random_state(block, "cpu", torch.float32, torch.Generator().manual_seed(0))
    assert torch.all(state["proj.bias"] == 0) and torch.all(state["norm.weight"] == 1)
    assert abs(float(state["proj.weight"].std()) - 400 ** -0.5) < 0.003
    unet = loading.build_unet(models.SDXL_UNET)  # meta: shapes only
    n = sum(p.numel() for p in unet.parameters())
    assert 2.50e9 < n < 2.55e9  # the reference's ~2.526 B for a 1792-d context


def test_gpu_script_is_valid_bash():
    path = os.path.join(ROOT, "bench", "gpu.sh")
    assert subprocess.run(["bash", "-n", path], check=False).returncode == 0
    text = open(path, encoding="utf-8").read()
    assert "--size full" in text and "capped_turn.py" in text


def test_markdown_table_lists_targets_and_gb_rows():
    doc = {"device": "NVIDIA H100", "size": "full", "dtype": "bfloat16", "image_size": 1024, "steps": 50,
           "torch": "2.11", "threads": 16, "clock": "cuda events", "fastpath": {"decode": "static cache + CUDA graphs"},
           "figures": [{"name": "peak memory", "stock_s": 31.0, "ours_s": 14.0, "ratio": 31 / 14, "unit": "GB",
                        "repeats": 1, "note": ""}],
           "targets": [{"name": "image-token decode (B=1)", "ours": 0.3, "target": 0.35, "unit": "s", "met": True},
                       {"name": "full turn", "ours": 2.5, "target": 2.0, "unit": "s", "met": False}],
           "checks": []}
    table = run.markdown_table(doc)
    assert "| peak memory | 31.00 GB | 14.00 GB | 2.21x | 1 |" in table
    assert "| image-token decode (B=1) | 300.0 ms | 350.0 ms | yes |" in table
    assert "| full turn | 2.50 s | 2.00 s | NO |" in table

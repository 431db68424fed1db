"""DIIC stand-in (wegen/diic.py): clips with known truth; mining from frames only is precise and well-formed."""
import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from wegen import diic
from wegen import toyworld as tw
from wegen.cli import main

N_CLIPS, SEED = 60, 3


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("diic") / "out")
    return out, diic.run(N_CLIPS, out, seed=SEED)


def _records(out):
    with open(os.path.join(out, "sequences.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _states(scenes, kinds):
    return [s.without_jitter() for s, k in zip(scenes, kinds) if k == diic.REAL]


def test_generated_clips_change_one_attribute_at_a_time_with_jitter_and_some_distractors():
    with_distractors, jitters, n = 0, set(), 200
    for c in range(n):
        clip = diic.make_clip(diic.clip_rng(0, c))
        assert diic.MIN_FRAMES <= len(clip.frames) <= diic.MAX_FRAMES
        assert len(clip.frames) == len(clip.scenes) == len(clip.kinds)
        for frame, scene, kind in zip(clip.frames, clip.scenes, clip.kinds):
            assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
            assert (scene is None) == (kind != diic.REAL) and kind in (diic.REAL, *diic.DISTRACTORS)
            if scene is not None:
                assert np.array_equal(frame, tw.render(scene))
                jitters.add((scene.dx, scene.dy))
        distractors = [i for i, k in enumerate(clip.kinds) if k != diic.REAL]
        assert len(distractors) <= 2 and all(b - a > 1 for a, b in zip(distractors, distractors[1:]))
        with_distractors += bool(distractors)
        if not distractors:  # every state held 1-3 frames, consecutive states one attribute apart
            runs = [[clip.scenes[0].without_jitter()]]
            for s in _states(clip.scenes, clip.kinds)[1:]:
                runs[-1].append(s) if s == runs[-1][-1] else runs.append([s])
            assert all(1 <= len(r) <= 3 for r in runs[:-1])
            assert all(len(tw.changed_attributes(a[0].attributes(), b[0].attributes())) == 1
                       for a, b in zip(runs, runs[1:]))
    assert 0.2 * n <= with_distractors <= 0.4 * n
    assert len(jitters) == (2 * tw.MAX_JITTER + 1) ** 2
    with pytest.raises(ValueError, match="n_frames"):
        diic.make_clip(random.Random(0), n_frames=7)


def test_every_distractor_kind_is_dropped_and_every_real_frame_is_read_right(monkeypatch):
    monkeypatch.setattr(diic, "DISTRACTOR_CLIP_RATE", 1.0)
    seen = set()
    for c in range(40):
        clip = diic.make_clip(diic.clip_rng(1, c))
        sequences, fates = diic.mine(clip.frames)
        labels = {i: lab for states in sequences for i, lab in states}
        for i, (frame, scene, kind, fate) in enumerate(zip(clip.frames, clip.scenes, clip.kinds, fates)):
            if kind == diic.REAL:
                assert labels.get(i, scene.attributes()) == scene.attributes()
                if c % 4 == 0:
                    assert diic.look(frame) == (scene.attributes(), "ok")
            else:
                seen.add(kind)
                assert fate != "kept" and i not in labels, (c, kind)
                if kind != "cut":  # a cut is a clean scene: only the track rejects it
                    assert diic.look(frame)[0] is None, (c, kind)
    assert seen == set(diic.DISTRACTORS)


def test_precision_and_yield_against_the_ground_truth(mined):
    out, summary = mined
    assert summary["clips"] == N_CLIPS and summary["source"] == "generated"
    assert summary["distractor_frames"] > 0 and summary["distractor_frames_emitted"] == 0
    assert summary["pairs"] >= 100 and summary["precision"] >= 0.99
    assert summary["correct_pairs"] <= summary["pairs"]
    assert summary["yield"] >= 0.8
    assert summary["sequences"] == len(_records(out))
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        assert json.load(f) == summary
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_sequences_are_well_formed_and_match_their_pngs_and_the_truth(mined):
    out, summary = mined
    records, images = _records(out), 0
    assert records
    for r in records:
        assert set(r) == {"clip", "name", "frames", "images", "instructions", "labels"}
        assert len(r["images"]) >= 2 and len(r["instructions"]) == len(r["images"]) - 1
        assert len(r["labels"]) == len(r["frames"]) == len(r["images"])
        assert r["images"] == [f"clip{r['clip']:05d}/f{i:02d}.png" for i in r["frames"]]
        for a, b, text in zip(r["labels"], r["labels"][1:], r["instructions"]):
            attribute, value = tw.parse_edit(text)
            assert tw.changed_attributes(a, b) == [attribute] and b[attribute] == value
        clip = diic.make_clip(diic.clip_rng(SEED, r["clip"]))
        for path, i, labels in zip(r["images"], r["frames"], r["labels"]):
            with Image.open(os.path.join(out, path)) as im:
                pixels = np.asarray(im.convert("RGB"))
            assert tw.read(pixels) == labels and np.array_equal(pixels, clip.frames[i])
            assert clip.kinds[i] == diic.REAL and clip.scenes[i].attributes() == labels
        images += len(r["images"])
    assert images == summary["images"]
    assert sum(len(r["instructions"]) for r in records) == summary["pairs"]


def test_runs_are_deterministic_for_a_seed(tmp_path):
    def files(out):
        return {os.path.relpath(os.path.join(d, n), out): open(os.path.join(d, n), "rb").read()
                for d, _, names in os.walk(out) for n in names if n != "summary.json"}

    a, b, c = (str(tmp_path / n) for n in "abc")
    sa, sb, _ = diic.run(10, a, seed=5), diic.run(10, b, seed=5), diic.run(10, c, seed=6)
    assert files(a) == files(b) and files(a) != files(c)
    assert {k: v for k, v in sa.items() if k not in ("seconds", "out")} == \
        {k: v for k, v in sb.items() if k not in ("seconds", "out")}


def _step(scene, **change):
    return replace(scene, **change)


def test_a_cut_a_double_change_and_a_noisy_frame_are_not_paired():
    a = tw.Scene("large", "red", "square", "center", "white")
    b = _step(a, colour="blue")
    cut = tw.Scene("small", "green", "triangle", "top left", "black")
    double = _step(b, shape="circle", position="left")  # two attributes at once: a cut
    noisy = np.clip(tw.render(b) + np.random.default_rng(0).normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
    frames = [tw.render(s) for s in (a, a, cut, b, b)] + [noisy] + [tw.render(s) for s in (double, double, double)]
    sequences, fates = diic.mine(frames)
    assert fates == ["kept", "kept", "outlier", "kept", "kept", "noise", "kept", "kept", "kept"]
    assert [[i for i, _ in states] for states in sequences] == [[0, 3]]
    assert diic.instructions(sequences[0]) == ["make it blue"]


def test_two_objects_blank_frames_and_short_tracks_are_dropped():
    a = tw.Scene("small", "yellow", "circle", "top", "gray")
    two = tw.render(a)
    two[tw.object_mask(tw.Scene("small", "purple", "square", "bottom", "gray"))] = tw.COLOURS["purple"]
    blank = np.full((64, 64, 3), tw.BACKGROUNDS["gray"], dtype=np.uint8)
    frames = [tw.render(a), two, tw.render(_step(a, size="large")), blank]
    sequences, fates = diic.mine(frames)
    assert fates == ["short", "components", "short", "empty"] and sequences == []
    assert diic.mine(frames[:1] + frames[2:3] + frames[:1])[0]  # a, large, a: three frames are a track


def test_overlapping_second_objects_fail_the_colour_or_the_shape_check():
    a = tw.Scene("large", "red", "square", "center", "white")
    for colour, reason in (("red", "fit"), ("blue", "colour")):
        frame = tw.render(a)
        frame[tw.object_mask(tw.Scene("small", colour, "circle", "right", "white"))] = tw.COLOURS[colour]
        assert diic.look(frame) == (None, reason)


def test_both_objects_of_a_two_object_frame_are_visible():
    rng = random.Random(2)
    for _ in range(300):
        scene = tw.random_scene(rng)
        frame = diic._two_objects(rng, scene)
        assert (frame != tw.render(scene)).any(-1).sum() >= diic.MIN_VISIBLE
        own = (frame == tw.COLOURS[scene.colour]).all(-1) & tw.object_mask(scene)
        assert own.sum() >= diic.MIN_VISIBLE


def test_scoring_counts_only_right_pairs_of_real_frames_and_the_true_transitions():
    a = tw.Scene("small", "red", "circle", "top", "white")
    b, c = _step(a, colour="blue"), _step(a, colour="blue", shape="square")
    scenes = [a, _step(a, dx=1), b, None, c, _step(a, colour="blue", position="left")]  # 2 single changes
    clip = diic.Clip([tw.render(s or a) for s in scenes], scenes, ["real"] * 3 + ["cut"] + ["real"] * 2)
    lab = [s.attributes() if s else a.attributes() for s in scenes]
    right = [(0, lab[0]), (2, lab[2])]
    assert diic.score(clip, [right]) == {"pairs": 1, "correct_pairs": 1, "gt_transitions": 2,
                                         "distractor_frames_emitted": 0}
    wrong_value = [(0, lab[0]), (2, dict(lab[2], colour="green"))]  # says green, the truth is blue
    from_distractor = [(3, lab[2]), (4, dict(lab[2], shape="square"))]
    two_apart = [(2, lab[2]), (5, dict(lab[2], shape="square"))]  # the truth moved, not reshaped
    assert diic.score(clip, [wrong_value, from_distractor, two_apart]) == {
        "pairs": 3, "correct_pairs": 0, "gt_transitions": 2, "distractor_frames_emitted": 1}


def test_mined_frames_may_only_come_from_the_frames(tmp_path):
    """The miner gets no truth: stripping it from the clips changes nothing that is written."""
    clips = [diic.make_clip(diic.clip_rng(9, c)) for c in range(12)]
    with_truth = diic.run(clips, str(tmp_path / "a"))
    without = diic.run([diic.Clip(c.frames) for c in clips], str(tmp_path / "b"))
    assert _records(str(tmp_path / "a")) == _records(str(tmp_path / "b"))
    assert without["precision"] is None and without["yield"] is None and with_truth["precision"] == 1.0


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_on_a_count_prints_the_summary_as_one_json_line(capsys, tmp_path):
    code, out, err = _cli(capsys, "diic", "8", str(tmp_path / "out"), "--seed", "2")
    assert code == 0 and out.count("\n") == 1, err
    summary = json.loads(out)
    assert summary["clips"] == 8 and summary["seed"] == 2 and summary["precision"] == 1.0
    assert os.path.isfile(tmp_path / "out" / "sequences.jsonl")


def test_cli_on_a_folder_of_png_clips(capsys, tmp_path):
    clips = [diic.make_clip(diic.clip_rng(4, c)) for c in range(6)]
    for c, clip in enumerate(clips):
        os.makedirs(tmp_path / "in" / f"take{c}")
        for i, frame in enumerate(clip.frames):  # f2 before f10: frames in natural name order
            Image.fromarray(frame).save(tmp_path / "in" / f"take{c}" / f"f{i}.png")
    (tmp_path / "in" / "notes.txt").write_text("not a clip")
    code, out, err = _cli(capsys, "diic", str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["clips"] == 6 and summary["precision"] is None and summary["pairs"] > 0
    expected = diic.run(clips, str(tmp_path / "ref"))
    assert summary["pairs"] == expected["pairs"]
    got, want = _records(str(tmp_path / "out")), _records(str(tmp_path / "ref"))
    assert [r["name"] for r in got] == [f"take{r['clip']}" for r in want]
    assert [{k: v for k, v in r.items() if k != "name"} for r in got] == \
        [{k: v for k, v in r.items() if k != "name"} for r in want]


@pytest.mark.parametrize("source, message", [
    ("0", "clip count in 1..1000000"), ("-3", "clip count in 1..1000000"), ("nowhere", "no such folder"),
    ("empty", "holds no clip folders with PNG frames"), ("big", "frames must be 64x64, got 32x32"),
    ("broken", "cannot read the frame")])
def test_cli_bad_input_exits_2_with_one_line(capsys, tmp_path, source, message):
    (tmp_path / "empty" / "clip0").mkdir(parents=True)
    (tmp_path / "big" / "clip0").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "big" / "clip0" / "f0.png")
    (tmp_path / "broken" / "clip0").mkdir(parents=True)
    (tmp_path / "broken" / "clip0" / "f0.png").write_bytes(b"not a png")
    arg = source if source in ("0", "-3") else str(tmp_path / source)
    code, out, err = _cli(capsys, "diic", arg, str(tmp_path / "out"))
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1 and not out


def test_cli_refuses_an_out_that_is_a_file_and_a_bad_seed(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = _cli(capsys, "diic", "3", str(tmp_path / "file"))
    assert code == 2 and "is not a folder" in err
    code, _, err = _cli(capsys, "diic", "3", str(tmp_path / "out"), "--seed", "x")
    assert code == 2 and "--seed" in err

"""The three oracles of prepare_data.py: Silero VAD for real (it ships its weights) on espeak-ng speech and on
non-speech sounds; the PANNs Cnn14 and CLIP ViT-B-32 code paths on untrained networks of their real
architectures (their weights are a download this machine cannot make)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import prepare_data as pd
import rawdata


def _write_clip(raw, clip_id, audio, cls="dog", frames=None):
    frames = frames if frames is not None else [np.full((224, 224, 3), 25 * i, np.uint8) for i in range(10)]
    a, f = pd.write_clip(raw, clip_id, pd.pad_audio(audio, "pad", clip_id), frames)
    return {"clip_id": clip_id, "class": cls, "source": "folder", "audio": a, "frames": f,
            "duration_s": len(audio) / 24000}


@pytest.fixture(scope="module")
def speech_24k(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng): cannot synthesise a speech recording")
    path = str(tmp_path_factory.mktemp("speech") / "speech.wav")
    subprocess.run(["espeak-ng", "-w", path, "Hello there. The dog is barking at the cat in the garden, "
                    "and the farmer says it is time to go home."], check=True)
    audio = pd.decode_audio(path)  # espeak writes 22.05 kHz; ffmpeg resamples to 24 kHz mono
    return audio


def test_silero_vad_rejects_speech_keeps_tone(speech_24k, tmp_path):
    pytest.importorskip("silero_vad", reason="silero-vad not installed (pip install -r requirements-test.txt)")
    t = np.arange(5 * 24000) / 24000
    tone = (0.4 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)
    noise = (0.1 * np.random.default_rng(0).standard_normal(5 * 24000)).astype(np.float32)
    vad = pd.load_vad()
    assert pd.vad_voiced_fraction(speech_24k, 24000, vad) > 0.3
    assert pd.vad_voiced_fraction(tone, 24000, vad) == 0.0
    assert pd.vad_voiced_fraction(noise, 24000, vad) == 0.0
    # through the pipeline: the speech clip is removed at the VAD filter, the tone kept, scores recorded
    raw = str(tmp_path)
    rows = [_write_clip(raw, "speech", speech_24k), _write_clip(raw, "tone", tone)]
    pd.run_oracles(raw, rows, skip={"pann", "clip"}, device="cpu", models={"vad": vad})
    th = dict(pann=0.3, clip=0.25, vad=0.0)
    assert pd.oracle_failures(rows[0], th) == ["vad"] and pd.oracle_failures(rows[1], th) == []
    assert rows[1]["oracles"] == {"pann": "skipped", "clip": "skipped", "vad": 0.0}
    # scores are cached per clip: a rerun needs no model
    again = [dict(r) for r in rows]
    pd.run_oracles(raw, again, skip={"pann", "clip"}, device="cpu", models={})
    assert [r["oracles"] for r in again] == [r["oracles"] for r in rows]


@pytest.fixture
def panns_home(tmp_path, monkeypatch):
    """panns_inference fetches AudioSet's label list at import time; give it a stand-in list with the real
    527-row shape in a private HOME so nothing touches the network or the user's home."""
    pytest.importorskip("torchlibrosa", reason="panns-inference not installed (pip install -r requirements-test.txt)")
    monkeypatch.setenv("HOME", str(tmp_path))
    d = tmp_path / "panns_data"
    d.mkdir()
    lines = ["index,mid,display_name"] + [f"{i},/m/x{i},label {i}" for i in range(527)]
    (d / "class_labels_indices.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_pann_code_path_on_untrained_cnn14(panns_home, tmp_path):
    torch.manual_seed(0)
    model = pd.build_cnn14().eval()
    assert type(model).__name__ == "Cnn14" and model.fc_audioset.out_features == 527
    t = np.arange(int(4.0 * 24000)) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 600 * t)).astype(np.float32)
    score, offset = pd.pann_score(audio, 24000, "dog", model)
    # the dog score sums 7 sigmoid outputs: in [0, 7]; windows of 3.41 s with a 0.5 s hop over 4 s
    assert 0.0 <= score <= 7.0 and offset in (0.0, 0.5)
    # by hand: the same window through the model, summed over the dog indices
    import torchaudio.functional as AF
    x32 = AF.resample(torch.tensor(audio), 24000, 32000)
    s = int(offset * 32000)
    with torch.no_grad():
        p = model(x32[s:s + 109227][None], None)["clipwise_output"][0]
    idx = [pd.AUDIOSET_INDEX[m] for m in pd.CLASS_MAP["dog"]["pann"]]
    assert abs(float(p[idx].sum()) - score) < 1e-4
    # a short clip is padded to one window
    score_short, off_short = pd.pann_score(audio[:24000], 24000, "cat", model)
    assert off_short == 0.0 and 0.0 <= score_short <= 5.0
    # through run_oracles: a class the table does not know is skipped with a reason
    raw = str(tmp_path / "raw")
    rows = [_write_clip(raw, "a", audio, "dog"), _write_clip(raw, "b", audio, "owl")]
    pd.run_oracles(raw, rows, skip={"clip", "vad"}, device="cpu", models={"pann": model})
    assert isinstance(rows[0]["oracles"]["pann"], float) and rows[0]["oracle_info"]["pann_window_offset_s"] >= 0
    assert rows[1]["oracles"]["pann"] == "skipped" and "owl" in rows[1]["oracle_info"]["pann"]


def frames_solid():
    return np.full((224, 224, 3), (200, 120, 40), np.uint8)


def test_clip_code_path_on_untrained_vit_b32(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (pip install -r requirements-test.txt)")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    clip = (model, preprocess, open_clip.get_tokenizer("ViT-B-32"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(3)] * 3 + [frames_solid()]
    score, best = pd.clip_score(frames, "horse", clip)
    assert -1.0 <= score <= 1.0 and 0 <= best < 10
    # the best of the 10 is the max of each frame's own cosine (checked on the 4 distinct frames)
    frames = frames[:3] + frames[-1:]
    singles = [pd.clip_score([f], "horse", clip)[0] for f in frames]
    assert abs(max(singles) - score) < 1e-4 and [0, 1, 2, 9][int(np.argmax(singles))] == best
    frames = frames[:3] * 3 + frames[-1:]
    raw = str(tmp_path)
    rows = [_write_clip(raw, "h", np.zeros(24000 * 4, np.float32), "horse", frames)]
    pd.run_oracles(raw, rows, skip={"pann", "vad"}, device="cpu", models={"clip": clip})
    assert abs(rows[0]["oracles"]["clip"] - score) < 1e-3 and rows[0]["oracle_info"]["clip_best_frame"] == best
    th = dict(pann=0.3, clip=score + 0.01, vad=0.0)
    assert pd.oracle_failures(rows[0], th) == ["clip"]

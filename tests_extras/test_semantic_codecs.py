"""The semantic audio tokenizers (issue #32): SpeechTokenizer (the `speechtokenizer` package) and Mimi
(transformers' MimiModel), each built from its real code with a small config and random weights (nothing is
downloaded), through the project's wrappers: ids in range per level, the layout in meta.json, decoding to a
24 kHz window, and a few train.py steps on the tokens. Needs requirements-extra.txt; fails, never skips,
without it."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import modalities as M  # noqa: E402
import streams as S  # noqa: E402
import modality_tokenizers as T  # noqa: E402
import tokenize_all  # noqa: E402
from test_tokenize_all import FAST, make_raw_fixture  # noqa: E402


@pytest.fixture(autouse=True)
def default_layout_after():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    M.set_audio_layout(M.ENCODEC_LAYOUT)
    torch.set_num_threads(threads)


def small_speechtokenizer(seed=0):
    """The package's SpeechTokenizer at the real strides (16 kHz, hop 320 = 50 Hz) and level count, narrow, with
    random weights; its codebooks initialised the package's own way (k-means on the first batch its quantizer's
    forward sees, here one Lloyd iteration on encoder outputs of noise)."""
    from speechtokenizer import SpeechTokenizer
    torch.manual_seed(seed)
    cfg = dict(n_filters=4, dimension=16, semantic_dimension=16, strides=[8, 5, 4, 2], lstm_layers=1,
               bidirectional=True, dilation_base=2, residual_kernel_size=3, n_residual_layers=1, activation="ELU",
               codebook_size=64, n_q=8, sample_rate=16000)
    model = SpeechTokenizer(cfg).eval()
    with torch.no_grad():
        for layer in model.quantizer.vq.layers:
            layer._codebook.kmeans_iters = 1
        model.quantizer(model.encoder(0.1 * torch.randn(3, 1, 16000)))
    assert all(layer._codebook.inited.item() for layer in model.quantizer.vq.layers)
    return model


def small_mimi(seed=0):
    """transformers' MimiModel at the real rates (24 kHz, 12.5 Hz) and 12 levels, narrow, with random weights;
    its codebooks (zero when built from a config: they are learnt) drawn at random."""
    from transformers import MimiConfig, MimiModel
    torch.manual_seed(seed)
    cfg = MimiConfig(hidden_size=32, num_filters=4, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=16, codebook_size=64, codebook_dim=16, num_quantizers=12,
                     vector_quantization_hidden_dimension=16, upsample_groups=32, sliding_window=64)
    model = MimiModel(cfg).eval()
    q = model.quantizer
    with torch.no_grad():
        for layer in list(q.semantic_residual_vector_quantizer.layers) + list(q.acoustic_residual_vector_quantizer.layers):
            layer.codebook.embed_sum.normal_()
            layer.codebook._embed = None          # its cached codebook, recomputed from embed_sum on next use
    return model


CODECS = {"speechtokenizer": (T.SpeechTokenizerTokenizer, small_speechtokenizer, 3, 170, 50.0, 16000),
          "mimi": (T.MimiTokenizer, small_mimi, 12, 42, 12.5, 24000)}


def windows(n=2):
    t = np.arange(M.AUDIO_WINDOW) / M.AUDIO_SR
    f0 = 220.0 * (1 + np.arange(n))[:, None]
    return (0.3 * np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_round_trip_shapes_and_level_ranges(kind):
    cls, build, K, T_frames, rate, sr = CODECS[kind]
    tok = cls(model=build())
    lay = tok.layout
    assert (lay.codebooks, lay.frames, lay.frame_rate, lay.sample_rate, lay.codebook_size) == (K, T_frames, rate, sr, 64)
    assert abs(lay.length - 512) <= 12 and tok.settings["layout"] == dataclasses.asdict(lay)
    x = windows(2)
    codes = tok.codes(x)
    assert codes.shape == (2, K, T_frames) and codes.min() >= 0 and codes.max() < 64
    assert all(codes[:, k].unique().numel() > 1 for k in range(K)), "a level codes every frame alike"
    ids = tok.encode(x)                      # in the tokenizer's own layout, whatever the process has set
    assert M.AUDIO_LAYOUT == M.ENCODEC_LAYOUT
    assert ids.shape == (2, K * T_frames)
    level = torch.arange(K * T_frames) % K
    assert ((ids >= level * 64) & (ids < (level + 1) * 64)).all()
    assert torch.equal(S.deinterleave_audio(ids, lay), codes)
    wave = tok.decode(ids)
    assert wave.shape == (2, M.AUDIO_WINDOW) and wave.dtype == np.float32 and np.isfinite(wave).all()
    assert np.abs(wave).max() <= 1 and wave.std() > 0
    # decoding is the codec's: the same codes decode to the same audio
    np.testing.assert_array_equal(tok.decode(ids), wave)


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_tokenize_all_writes_the_layout_and_train_runs(kind, tmp_path, monkeypatch):
    cls, build, K, T_frames, _, _ = CODECS[kind]
    model = build()
    asked = []

    def hub(revision):                          # instead of the hub download: the model and the commit it came from
        asked.append(revision)
        return model, "c" * 40
    monkeypatch.setattr(cls, "load_pretrained", staticmethod(hub))
    root = str(tmp_path / "data")
    make_raw_fixture(root)
    tokenize_all.main(["--dataset=fx", f"--data_root={root}", f"--audio_tokenizer={kind}", *FAST])
    tok_path = M.tok_dir("fx", root)
    M.set_audio_layout(M.ENCODEC_LAYOUT)
    meta = M.load_meta(tok_path)                                      # sets the layout it records
    info = meta["modalities"]["tok_audio"]
    assert info["tokenizer"] == kind and info["shape"] == [M.NUM_VIEWS, K * T_frames] and info["vocab"] == K * 64
    assert M.AudioLayout(**info["layout"]) == M.AUDIO_LAYOUT and M.AUDIO_CODEBOOKS == K
    arrays = M.open_split(tok_path, "train", meta)
    a = np.asarray(arrays["tok_audio"]).reshape(-1, K * T_frames).astype(np.int64)
    level = np.arange(K * T_frames) % K
    assert ((a >= level * 64) & (a < (level + 1) * 64)).all()
    # sampling and evaluation rebuild the same tokenizer from meta.json and decode its ids
    tok = T.load_tokenizer(tok_path, meta, "audio")
    assert tok.layout == M.AUDIO_LAYOUT
    # the first run took the default branch and recorded its commit; decoding asks for that commit
    assert asked[0] == "main" and info["revision"] == "c" * 40 and asked[-1] == "c" * 40
    assert tok.decode(torch.from_numpy(a[:1])).shape == (1, M.AUDIO_WINDOW)
    # a few training steps on the tokens
    from test_train import TINY
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset=fx", f"--data_root={root}", f"--out_dir={out}",
           *TINY, "--max_iters=4", "--eval_interval=4", "--eval_iters=1"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals] == [0, 4] and np.isfinite(evals[-1]["train"]["loss"])
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["audio_layout"] == info["layout"]


def test_real_path_imports():
    """What the real weights' loaders import is installed (the hub download itself needs the network)."""
    import huggingface_hub  # noqa: F401
    import speechtokenizer  # noqa: F401
    from transformers import MimiModel  # noqa: F401
    assert T.TOKENIZER_KINDS["speechtokenizer"] is T.SpeechTokenizerTokenizer
    assert T.TOKENIZER_KINDS["mimi"] is T.MimiTokenizer

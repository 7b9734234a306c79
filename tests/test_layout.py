"""The audio layout read from the tokenizer (modalities.AudioLayout): K codebooks of V codes over T frames,
seq[K*t + k] = c[k, t] + k * V. For K in {2, 3, 12} (EnCodec, SpeechTokenizer, Mimi shapes): the stream
round-trips, masking and sampling keep frames of K ids whole, each level's ids stay in its own range, the
model's positions follow the layout, meta.json sets it, and train.py trains on it."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import masking  # noqa: E402
import modalities as M  # noqa: E402
import streams as S  # noqa: E402
import generation  # noqa: E402
from model import Nano4M, Nano4MConfig  # noqa: E402

LAYOUTS = {2: M.ENCODEC_LAYOUT,                                                      # 256 x 2 = 512 ids
           3: M.AudioLayout(codebooks=3, codebook_size=1024, frames=170, frame_rate=50.0, sample_rate=16000),
           12: M.AudioLayout(codebooks=12, codebook_size=2048, frames=42, frame_rate=12.5, sample_rate=24000)}


@pytest.fixture(autouse=True)
def default_after():
    """Every test here leaves the default layout behind, pass or fail (other test files read it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    M.set_audio_layout(M.ENCODEC_LAYOUT)
    torch.set_num_threads(threads)


@pytest.fixture
def layout(request):
    M.set_audio_layout(LAYOUTS[request.param])
    return M.AUDIO_LAYOUT


def all_k(f):
    return pytest.mark.parametrize("layout", sorted(LAYOUTS), indirect=True)(f)


def test_default_is_the_reports_layout():
    M.set_audio_layout(M.layout_from_meta({"modalities": {"tok_audio": {"tokenizer": "encodec"}}}))
    a = M.BY_NAME["tok_audio"]
    assert (a.length, a.vocab, M.AUDIO_FRAMES, M.AUDIO_CODEBOOKS, M.AUDIO_CODEBOOK_SIZE) == (512, 2048, 256, 2, 1024)
    assert M.POS_OFFSETS == (0, 196, 392, 588, 1100) and M.TOTAL_POSITIONS == 1116
    codes = np.arange(512).reshape(2, 256) % 1024
    seq = S.interleave_audio(codes)
    assert seq[0] == codes[0, 0] and seq[1] == codes[1, 0] + 1024 and seq[2 * 7 + 1] == codes[1, 7] + 1024


@all_k
def test_stream_round_trip_and_level_ranges(layout):
    K, V, T = layout.codebooks, layout.codebook_size, layout.frames
    assert abs(K * T - 512) <= 12 and M.BY_NAME["tok_audio"].length == K * T and M.BY_NAME["tok_audio"].vocab == K * V
    g = torch.Generator().manual_seed(K)
    codes = torch.randint(0, V, (5, K, T), generator=g)
    seq = S.interleave_audio(codes)
    assert seq.shape == (5, K * T)
    level = torch.arange(K * T) % K                   # slot K*t + k holds level k
    assert ((seq >= level * V) & (seq < (level + 1) * V)).all()
    assert torch.equal(seq.view(5, T, K)[:, 9, 1], codes[:, 1, 9] + V)
    assert torch.equal(S.deinterleave_audio(seq), codes)
    assert np.array_equal(S.deinterleave_audio(S.interleave_audio(codes.numpy())), codes.numpy())
    with pytest.raises(ValueError, match="expected"):
        S.interleave_audio(codes[:, :, :-1])


@all_k
def test_masking_keeps_whole_frames(layout):
    K, T = layout.codebooks, layout.frames
    a0 = M.POS_OFFSETS[M.modality_index("audio")]
    for cfg in (masking.MaskingConfig(audio_spans=(1, 3)),
                masking.MaskingConfig(input_alphas=(0, 0, 0, 1, 0), target_alphas=(0, 0, 0, 1, 0),
                                      input_budget=(1, 600), target_budget=(1, 600), audio_spans=(2, 5))):
        g = torch.Generator().manual_seed(K)
        toks = masking.random_tokens(400, "cpu", g)
        assert toks["tok_audio"].shape == (400, K * T)
        toks["tok_audio"] = S.interleave_audio(torch.randint(0, layout.codebook_size, (400, K, T), generator=g))
        b = masking.build_batch(toks, cfg, g)
        for p in ("enc", "dec"):
            pos, valid, ids = b[p + "_pos"], b[p + "_valid"], b[p + "_ids"]
            chosen = torch.zeros(400, M.TOTAL_POSITIONS + 1, dtype=torch.long)
            chosen.scatter_add_(1, torch.where(valid, pos, M.TOTAL_POSITIONS), torch.ones_like(pos))
            frames = chosen[:, a0:a0 + K * T].view(400, T, K)
            assert chosen[:, :M.TOTAL_POSITIONS].max() <= 1
            assert (frames == frames[:, :, :1]).all(), f"K={K}: an audio frame was split"
            assert (frames.sum((1, 2)) % K == 0).all()
            # a chosen audio token carries its own level's id (the stream, read at its position)
            audio = valid & (pos >= a0) & (pos < a0 + K * T)
            lvl = (pos - a0) % K
            V = layout.codebook_size
            assert ((ids >= lvl * V) & (ids < (lvl + 1) * V))[audio].all()
            # the audio-only recipe's inputs: at most 5 contiguous runs of frames (its spans)
            if p == "enc" and cfg.input_alphas[0] == 0:
                f = frames[:, :, 0].bool()
                n_runs = f[:, 0].long() + (f[:, 1:] & ~f[:, :-1]).sum(1)
                assert (n_runs <= 5).all() and (f.sum(1) > 0).all()


@all_k
def test_model_positions_follow_the_layout(layout):
    K, T = layout.codebooks, layout.frames
    torch.manual_seed(0)
    model = Nano4M(Nano4MConfig(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=2))
    assert model.pos_frame.shape == (T, 32) and model.pos_codebook.shape == (K, 32)
    table = model.position_table()
    assert table.shape == (M.TOTAL_POSITIONS, 32)
    a0 = M.POS_OFFSETS[M.modality_index("audio")]
    t, k = T - 1, K - 1
    torch.testing.assert_close(table[a0 + K * t + k], model.pos_frame[t] + model.pos_codebook[k])
    assert (model.pos_modality[torch.tensor(M.POS_OFFSETS)] == torch.arange(5)).all()
    assert model.modality_logits(torch.zeros(3, 32), M.modality_index("audio")).shape == (3, K * layout.codebook_size)


class Recorder(torch.nn.Module):
    """Wraps a model; records which audio stream indices were encoder inputs at each decoding pass."""

    def __init__(self, inner, a0, L):
        super().__init__()
        self.inner, self.a0, self.L, self.seen = inner, a0, L, []

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        audio = enc_valid & (enc_pos >= self.a0) & (enc_pos < self.a0 + self.L)
        self.seen.append([sorted((enc_pos[b][audio[b]] - self.a0).tolist()) for b in range(enc_pos.shape[0])])
        return self.inner.decode_hidden(enc_ids, enc_pos, enc_valid, dec_pos, dec_valid)

    def modality_logits(self, h, m):
        return self.inner.modality_logits(h, m)


@all_k
@pytest.mark.parametrize("schedule", ["maskgit", "roar", "raster"])
def test_sampling_commits_whole_frames(layout, schedule):
    K, T = layout.codebooks, layout.frames
    torch.manual_seed(0)
    a0 = M.POS_OFFSETS[M.modality_index("audio")]
    model = Recorder(Nano4M(Nano4MConfig(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=2)).eval(), a0, K * T)
    g = torch.Generator().manual_seed(1)
    toks = masking.random_tokens(2, "cpu", g)
    prefix = generation.continuation_prefix(0.5)
    assert prefix % K == 0 and prefix == round(0.5 * T) * K
    known = torch.zeros(2, K * T, dtype=torch.bool)
    known[:, :prefix] = True
    with torch.no_grad():
        out = generation.generate(model, {"caption": toks["caption"], "tok_audio": toks["tok_audio"]},
                              {"tok_audio": known}, "tok_audio", steps=6, schedule=schedule, generator=g)
    assert out.shape == (2, K * T)
    assert torch.equal(out[:, :prefix], toks["tok_audio"][:, :prefix])       # the given frames are kept
    level = torch.arange(prefix, K * T) % K                # codebook-true: generated slot k holds a level-k id
    V, new = layout.codebook_size, out[:, prefix:]
    assert ((new >= level * V) & (new < (level + 1) * V)).all()
    assert 2 <= len(model.seen) <= 6           # (a step that commits nothing is skipped)
    for step in model.seen:
        for idx in step:                                   # every pass sees whole frames of audio only
            fr = torch.tensor(idx, dtype=torch.long) // K
            assert len(idx) % K == 0 and (torch.bincount(fr)[fr] == K).all()
    grown = [len(step[0]) for step in model.seen]
    assert grown[0] == prefix and grown == sorted(grown) and grown[-1] < K * T


@all_k
def test_meta_sets_the_layout_and_train_runs(layout, tmp_path):
    from test_train import TINY, write_dataset
    import subprocess
    root = write_dataset(str(tmp_path / "data"), n_train=16, n_val=8)
    meta_path = tmp_path / "data" / "synth" / "tok" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["modalities"]["tok_audio"]["layout"] = dataclasses.asdict(layout)
    meta_path.write_text(json.dumps(meta))
    M.set_audio_layout(M.ENCODEC_LAYOUT)
    assert M.load_meta(str(meta_path.parent))["splits"]["train"] == 16 and M.AUDIO_LAYOUT == layout
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(os.path.dirname(HERE), "train.py"), "--dataset=synth", f"--data_root={root}",
           f"--out_dir={out}", *TINY, "--max_iters=4", "--eval_interval=4", "--eval_iters=1"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals] == [0, 4] and np.isfinite(evals[-1]["train"]["loss"])
    # the checkpoint records the layout; loading it in a process set to another rebuilds the same model
    from model import load_checkpoint
    M.set_audio_layout(M.ENCODEC_LAYOUT)
    model, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert M.AudioLayout(**ckpt["audio_layout"]) == layout == M.AUDIO_LAYOUT
    assert model.pos_codebook.shape[0] == layout.codebooks


def test_bad_layout_in_meta_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"modalities": {"tok_audio": {"layout": {"codebooks": 3}}},
                                                    "splits": {}}))
    M.set_audio_layout(M.layout_from_meta(json.loads((tmp_path / "meta.json").read_text())))   # K=3, V, T default
    assert M.AUDIO_LAYOUT.codebooks == 3 and M.BY_NAME["tok_audio"].length == 768
    (tmp_path / "meta.json").write_text(json.dumps({"modalities": {"tok_audio": {"layout": {"codebooks": 60}}}}))
    with pytest.raises(ValueError, match="meta.json: bad tok_audio layout"):
        M.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"modalities": {"tok_audio": {"layout": {"levels": 3}}}}))
    with pytest.raises(ValueError, match="meta.json: bad tok_audio layout"):
        M.load_meta(str(tmp_path))


@pytest.mark.parametrize("layout", [12], indirect=True)
def test_token_probe_reads_the_class_the_tokens_keep(layout, tmp_path, capsys):
    """Planted answer: audio ids drawn from a class template are read back; pure noise sits near chance."""
    from test_train import write_dataset
    import token_probe
    write_dataset(str(tmp_path), name="kept", noise=0.3, n_train=40, n_val=40)
    write_dataset(str(tmp_path), name="lost", noise=1.0, n_train=40, n_val=40)
    for name in ("kept", "lost"):        # record the layout the arrays were written in
        path = tmp_path / name / "tok" / "meta.json"
        meta = json.loads(path.read_text())
        meta["modalities"]["tok_audio"]["layout"] = dataclasses.asdict(layout)
        path.write_text(json.dumps(meta))
    M.set_audio_layout(M.ENCODEC_LAYOUT)
    kept, lost = token_probe.main(["--datasets=kept,lost", f"--data_root={tmp_path}", "--split=val"])
    assert kept["top1"] > 0.95 and kept["n_windows"] == 400 and kept["layout"].startswith("K=12 x T=42")
    assert lost["ci"][0] < 0.25 < lost["ci"][1] and lost["chance"] == 0.25
    assert "kept" in capsys.readouterr().out

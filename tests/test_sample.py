"""generation.py + sample.py: the MaskGIT / ROAR schedule, guidance, filtering, and the CLI end to end on a tiny fixture."""
import functools
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generation  # noqa: E402
import sample  # noqa: E402
from modalities import (MODALITIES, BY_NAME, POS_OFFSETS, CAPTION_PAD, modality_index,  # noqa: E402
                        caption_valid, NULL_ID, null_position, AUDIO_CODEBOOKS, AUDIO_CODEBOOK_SIZE)
import streams as S  # noqa: E402
from streams import encode_caption, caption_text  # noqa: E402
from model import Nano4M, Nano4MConfig  # noqa: E402

A0 = POS_OFFSETS[modality_index("audio")]


@functools.lru_cache(maxsize=None)
def tiny_model(seed=0):
    """A tiny real Nano4M (1+1 layers, width 64) with random weights; cached (generation never changes it)."""
    torch.manual_seed(seed)
    return Nano4M(Nano4MConfig(n_enc_layer=1, n_dec_layer=1, n_embd=64, n_head=2)).eval()


class Recorder(nn.Module):
    """Wraps a model and records every decode_hidden call (cloned inputs)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        assert enc_valid.any(dim=1).all(), "a sample reached the model with no encoder input"
        self.calls.append(dict(enc_ids=enc_ids.clone(), enc_pos=enc_pos.clone(), enc_valid=enc_valid.clone(),
                               dec_pos=dec_pos.clone(), dec_valid=dec_valid.clone()))
        return self.inner.decode_hidden(enc_ids, enc_pos, enc_valid, dec_pos, dec_valid)

    def modality_logits(self, h, m):
        return self.inner.modality_logits(h, m)


class EncoderBlind(nn.Module):
    """A stand-in whose logits ignore the encoder entirely: cond == uncond, so any guidance scale must give
    exactly the scale-1 result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Embedding(sum(m.length for m in MODALITIES), 16)
        self.head = nn.Linear(16, 50304)

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        return self.pos(dec_pos)

    def modality_logits(self, h, m):
        V = MODALITIES[m].vocab
        return (h @ self.head.weight[:V].t() + self.head.bias[:V]).float()


def captions(classes):
    return torch.stack([torch.as_tensor(encode_caption(caption_text(c))) for c in classes])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rows_of(call, b):
    """(encoder positions, decoder positions) of sample b in one recorded call, as sets."""
    enc = set(call["enc_pos"][b][call["enc_valid"][b]].tolist())
    dec = call["dec_pos"][b][call["dec_valid"][b]].tolist()
    assert len(dec) == len(set(dec))
    return enc, set(dec)


def mixed_batch():
    """Three samples with different known audio: none (class-only), the first 410 (continuation), a random
    100. Caption conditioning for all; audio targets."""
    B = 3
    audio = torch.randint(0, 2048, (B, 512), generator=gen(1))
    known_audio = torch.zeros(B, 512, dtype=torch.bool)
    known_audio[1, :410] = True
    known_audio[2, torch.randperm(512, generator=gen(2))[:100]] = True
    return {"caption": captions(["cat", "dog", "pigeon"]), "audio": audio}, {"audio": known_audio}


def test_masked_count_cosine_ends_at_zero():
    S = 8
    counts = [generation.masked_count(512, s, S) for s in range(S)]
    assert counts == [math.ceil(512 * math.cos(math.pi / 2 * (s + 1) / S)) for s in range(S - 1)] + [0]
    assert all(a >= b for a, b in zip([512] + counts, counts))
    assert [generation.masked_count(10, s, 5, "linear") for s in range(5)] == [8, 6, 4, 2, 0]


@pytest.mark.parametrize("schedule", ["maskgit", "roar", "raster"])
def test_schedule_decodes_every_position_once_and_keeps_given(schedule):
    model = Recorder(tiny_model())
    tokens, known = mixed_batch()
    S = 8
    out = generation.generate(model, tokens, known, "audio", steps=S, schedule=schedule, generator=gen())
    assert out.shape == (3, 512) and out.dtype == torch.long
    assert len(model.calls) == S
    ka = known["audio"]
    # the given audio tokens come back unchanged
    assert torch.equal(out[ka], tokens["audio"][ka])
    frame = lambda positions: {(p - A0) // 2 for p in positions}
    for b in range(3):
        unknown = set((A0 + torch.nonzero(~ka[b])[:, 0]).tolist())
        given = set((A0 + torch.nonzero(ka[b])[:, 0]).tolist())
        U = len(frame(unknown))       # audio is committed in whole frames: the schedule counts frames
        committed_so_far = set()
        still = U
        for s, call in enumerate(model.calls):
            enc, dec = rows_of(call, b)
            enc_audio = {p for p in enc if p >= A0 and p < A0 + 512}
            # the encoder sees exactly the given + already-decoded audio, never a position being queried
            assert enc_audio == given | committed_so_far
            assert not (enc & dec)
            # the known caption is fed whole, its end-of-text padding included, with the stored ids: the
            # input training gives (modalities.caption_valid), so no caption length leaks through the count
            ev = call["enc_valid"][b]
            fed = {p - POS_OFFSETS[4]: i for p, i in zip(call["enc_pos"][b][ev].tolist(),
                                                        call["enc_ids"][b][ev].tolist()) if p >= POS_OFFSETS[4]}
            assert fed == dict(enumerate(tokens["caption"][b].tolist()))
            assert list(fed.values()).count(CAPTION_PAD) >= 10          # "a photo of a cat": 5 ids + 11 pads
            # decoded ids fed back are the final output's ids (never re-masked, never changed)
            ev = call["enc_valid"][b]
            for p, i in zip(call["enc_pos"][b][ev].tolist(), call["enc_ids"][b][ev].tolist()):
                if A0 <= p < A0 + 512:
                    assert out[b, p - A0].item() == i
            keep = generation.masked_count(U, s, S)
            if schedule == "maskgit":
                # MaskGIT queries every still-masked position
                assert dec == unknown - committed_so_far and len(frame(dec)) == still
                # committed this step = queried now but not at the next step (all of them at the last)
                committed = dec - rows_of(model.calls[s + 1], b)[1] if s + 1 < S else dec
            else:
                # ROAR and raster query only this step's positions, and accept them all
                committed = dec
                assert dec <= unknown - committed_so_far
                if schedule == "raster":   # in time order: every frame committed now precedes every one left
                    left = frame(unknown - committed_so_far - committed)
                    assert not (left and committed) or max(frame(committed)) < min(left), (s, b)
            assert len(frame(committed)) == still - keep, (s, b)
            # never half a frame: a committed frame's every unknown token is committed with it
            assert committed == {p for p in unknown if (p - A0) // 2 in frame(committed)}
            assert not (committed & committed_so_far)
            committed_so_far |= committed
            still = keep
        assert committed_so_far == unknown
        assert still == 0


def test_roar_queries_each_position_exactly_once():
    model = Recorder(tiny_model())
    tokens, known = mixed_batch()
    generation.generate(model, tokens, known, "audio", steps=6, schedule="roar", count_schedule="linear",
                    generator=gen())
    for b in range(3):
        queried = []
        for call in model.calls:
            queried += call["dec_pos"][b][call["dec_valid"][b]].tolist()
        assert sorted(queried) == sorted((A0 + torch.nonzero(~known["audio"][b])[:, 0]).tolist())


def test_guidance_scale_one_is_the_conditional_pass():
    tokens, known = mixed_batch()
    model = Recorder(tiny_model())
    a = generation.generate(model, tokens, known, "audio", steps=5, guidance_scale=1.0, generator=gen(3))
    assert len(model.calls) == 5                      # no unconditional pass at all
    b = generation.generate(tiny_model(), tokens, known, "audio", steps=5, generator=gen(3))
    assert torch.equal(a, b)
    # a model whose logits ignore the conditioning: uncond == cond, so every scale gives the same tokens
    blind = EncoderBlind()
    ref = generation.generate(blind, tokens, known, "audio", steps=5, generator=gen(4))
    for scale in (0.0, 3.0):
        assert torch.equal(generation.generate(blind, tokens, known, "audio", steps=5, guidance_scale=scale,
                                           generator=gen(4)), ref)


def test_guidance_unconditional_pass_drops_conditioning():
    tokens, known = mixed_batch()
    tokens["rgb"] = torch.randint(0, 16384, (3, 196))
    model = Recorder(tiny_model())
    with_cfg = generation.generate(model, tokens, known, "audio", steps=4, guidance_scale=3.0, generator=gen())
    assert len(model.calls) == 8
    for s in range(4):
        cond, uncond = model.calls[2 * s], model.calls[2 * s + 1]
        assert torch.equal(cond["dec_pos"], uncond["dec_pos"])
        for b in range(3):
            enc_u = rows_of(uncond, b)[0]
            enc_c = rows_of(cond, b)[0]
            audio_c = {p for p in enc_c if A0 <= p < A0 + 512}
            if audio_c:
                assert enc_u == audio_c            # only the target's own known / decoded tokens
            else:                                  # nothing yet: the single null token, an empty caption
                assert enc_u == {POS_OFFSETS[4]} == {null_position(False)}
                ev = uncond["enc_valid"][b]
                assert uncond["enc_ids"][b][ev].tolist() == [CAPTION_PAD] == [NULL_ID]
    # scale 0 is the unconditional model: same as generating with the conditioning removed, where the
    # inputs coincide (samples 1 and 2 always have audio; sample 0 starts from the null token)
    s0 = generation.generate(tiny_model(), tokens, known, "audio", steps=4, guidance_scale=0.0, generator=gen(7))
    alone = generation.generate(tiny_model(), {"audio": tokens["audio"]}, known, "audio", steps=4, generator=gen(7))
    assert torch.equal(s0[1:], alone[1:])
    assert not torch.equal(with_cfg, s0)


def test_greedy_topk1_topp_tiny_give_the_argmax():
    model = tiny_model()
    tokens = {"caption": captions(["cat", "horse"])}
    # one step decodes everything in a single pass: compare with the model's own argmax
    enc_pos = POS_OFFSETS[4] + torch.arange(16).expand(2, 16)
    valid = caption_valid(tokens["caption"])
    dec_pos = A0 + torch.arange(512).expand(2, 512)
    h = model.decode_hidden(tokens["caption"] * valid, enc_pos * valid, valid, dec_pos,
                            torch.ones(2, 512, dtype=torch.bool))
    # (the argmax within each slot's own codebook: slot 2t + k among ids [1024k, 1024(k + 1)))
    allowed = generation.codebook_mask(torch.arange(512), 2048)
    argmax = model.modality_logits(h, 3).masked_fill(~allowed, float("-inf")).argmax(-1)
    for kw in (dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-6)):   # (a 4e-4 logit gap exists)
        out = generation.generate(model, tokens, {}, "audio", steps=1, generator=gen(5), **kw)
        assert torch.equal(out, argmax), kw


def test_filter_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(generation.filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    p = torch.softmax(logits, -1)[0]                  # 0.64, 0.09, 0.24, 0.03
    kept = ~torch.isinf(generation.filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, False, True, False]] and p[0] < 0.7


@pytest.mark.parametrize("target,cond", [("audio", ["rgb", "caption"]), ("rgb", ["audio"]),
                                         ("depth", ["rgb"]), ("normal", ["rgb"]), ("caption", ["audio"])])
def test_outputs_in_target_id_range(target, cond):
    B = 2
    tokens = {c: torch.randint(0, BY_NAME[generation.full_name(c)].vocab, (B, BY_NAME[generation.full_name(c)].length))
              for c in cond if c != "caption"}
    if "caption" in cond:
        tokens["caption"] = captions(["cat", "dog"])
    out = generation.generate(tiny_model(), tokens, {}, target, steps=4, guidance_scale=2.0, remask_noise=1.0,
                          temperature=1.5, temperature_end=0.5, generator=gen())
    m = BY_NAME[generation.full_name(target)]
    assert out.shape == (B, m.length)
    assert out.min() >= 0 and out.max() < m.vocab
    assert len(set(out.flatten().tolist())) > 10     # it samples, it does not emit a constant


def test_continuation_keeps_the_prefix_and_is_reproducible():
    B = 2
    audio = torch.randint(0, 2048, (B, 512), generator=gen(9))
    known = torch.zeros(B, 512, dtype=torch.bool)
    known[:, :generation.continuation_prefix()] = True
    assert generation.continuation_prefix() == 410
    tokens = {"audio": audio, "caption": captions(["cat", "dog"]), "rgb": torch.randint(0, 16384, (B, 196))}
    model = tiny_model()
    a = generation.generate(model, tokens, {"audio": known}, "audio", steps=6, generator=gen(11))
    b = generation.generate(model, tokens, {"audio": known}, "audio", steps=6, generator=gen(11))
    c = generation.generate(model, tokens, {"audio": known}, "audio", steps=6, generator=gen(12))
    assert torch.equal(a[:, :410], audio[:, :410])
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 410:], c[:, 410:])
    assert not torch.equal(a[:, 410:], audio[:, 410:])


def test_bad_input_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown modality"):
        generation.generate(model, {"caption": captions(["cat"])}, {}, "smell")
    with pytest.raises(ValueError, match="shape"):
        generation.generate(model, {"rgb": torch.zeros(1, 100, dtype=torch.long)}, {}, "audio")
    with pytest.raises(ValueError, match="schedule"):
        generation.generate(model, {"caption": captions(["cat"])}, {}, "audio", schedule="random")
    with pytest.raises(ValueError, match="outside"):
        generation.generate(model, {"depth": torch.full((1, 196), 9000)}, {}, "audio")


# ---------------------------------------------------------------------------------------------------
# the CLI end to end on a tiny fixture: tokenized dataset + codebooks + raw clips + random checkpoint

def make_fixture(root, n_clips=4, with_raw=True):
    import json
    import numpy as np
    from dataclasses import asdict
    from modality_tokenizers import MelRVQTokenizer, PatchKMeansTokenizer
    from rawdata import write_manifest, write_png, write_wav
    import modalities as M

    data_root = os.path.join(root, "data")
    tok = os.path.join(data_root, "tiny", "tok")
    os.makedirs(os.path.join(tok, "test"))
    os.makedirs(os.path.join(tok, "codebooks"))
    torch.manual_seed(0)
    K = 16
    # 2 Griffin-Lim iterations instead of 32: the fixture tests the plumbing, not the sound
    MelRVQTokenizer(torch.randn(2, K, 80) - 4.0, {"griffin_lim_iters": 2}).save(os.path.join(tok, "codebooks", "tok_audio.pt"))
    for name, ch in (("tok_rgb", 3), ("tok_depth", 1), ("tok_normal", 3)):
        # 4 patch means x 4 mean-removed 8x8 shapes = K ids
        means = torch.rand(4, ch) if name == "tok_rgb" else torch.randn(4, ch) * 0.3
        shapes = torch.randn(4, ch, 64) * 0.1
        shapes = (shapes - shapes.mean(-1, keepdim=True)).reshape(4, ch * 64)
        PatchKMeansTokenizer(name, means, shapes).save(os.path.join(tok, "codebooks", f"{name}.pt"))
    classes = ["cat", "dog"]
    rng = np.random.default_rng(0)
    labels = np.arange(n_clips) % 2
    clip_ids = [f"clip{i}" for i in range(n_clips)]
    for m in M.MODALITIES:
        if m.name == "caption":
            a = np.stack([S.encode_caption(S.caption_text(classes[c])) for c in labels])
        else:
            a = rng.integers(0, K if m.name != "tok_audio" else 2 * K, (n_clips, M.NUM_VIEWS, m.length))
            if m.name == "tok_audio":   # a valid stream: codebook k's ids offset by 1024 k
                a = S.interleave_audio(rng.integers(0, K, (n_clips, M.NUM_VIEWS, 2, 256)))
        np.asarray(a, dtype=np.uint16).tofile(os.path.join(tok, "test", f"{m.name}.bin"))
    labels.astype(np.uint16).tofile(os.path.join(tok, "test", "label.bin"))
    with open(os.path.join(tok, "test", "clip_ids.json"), "w") as f:
        json.dump(clip_ids, f)
    mods = {m.name: {"shape": [M.NUM_VIEWS, m.length] if m.per_view else [m.length], "vocab": m.vocab,
                     "tokenizer": {"tok_audio": "mel_rvq", "caption": "gpt2_bpe"}.get(m.name, "patch_kmeans"),
                     "codebook": None if m.name == "caption" else f"codebooks/{m.name}.pt"} for m in M.MODALITIES}
    meta = {"dataset": "tiny", "class_names": classes, "num_views": M.NUM_VIEWS, "splits": {"test": n_clips},
            "modalities": mods}
    with open(os.path.join(tok, "meta.json"), "w") as f:
        json.dump(meta, f)
    if with_raw:   # raw files for the first two clips only: the others fall back to tokenized ground truth
        raw = os.path.join(data_root, "tiny", "raw")
        rows = []
        for i in range(2):
            d = os.path.join(raw, "clips", clip_ids[i])
            os.makedirs(d)
            t = np.arange(24000 * 5) / 24000
            write_wav(os.path.join(d, "audio.wav"), 0.3 * np.sin(2 * np.pi * 440 * (i + 1) * t))
            frames = []
            for v in range(M.NUM_VIEWS):
                write_png(os.path.join(d, f"frame_{v:02d}.png"), rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
                frames.append(f"clips/{clip_ids[i]}/frame_{v:02d}.png")
            rows.append(dict(clip_id=clip_ids[i], **{"class": classes[labels[i]]}, source="toyzoo", split="test",
                             caption=S.caption_text(classes[labels[i]]), audio=f"clips/{clip_ids[i]}/audio.wav",
                             frames=frames, depths=None, normals=None,
                             keyframe_times=[0.5 * v for v in range(M.NUM_VIEWS)], duration_s=5.0))
        write_manifest(os.path.join(raw, "manifest.jsonl"), rows)
    out_dir = os.path.join(root, "out")
    os.makedirs(out_dir)
    model = tiny_model()
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "iter_num": 0,
                "config": {"dataset": "tiny", "data_root": data_root}}, os.path.join(out_dir, "ckpt.pt"))
    return out_dir


def test_cli_class_only_and_continuation_write_a_gallery(tmp_path):
    import numpy as np
    from rawdata import read_wav
    out_dir = make_fixture(str(tmp_path))
    info = sample.main([f"--out_dir={out_dir}", "--mode=class_only", "--num_clips=3", "--num_samples=2",
                        "--steps=4", "--device=cpu"])
    d = os.path.join(out_dir, "samples", "class_only")
    ids = np.load(os.path.join(d, "generated_ids.npy"))
    assert ids.shape == (3, 2, 512) and ids.min() >= 0 and ids.max() < 2048
    html = open(os.path.join(d, "index.html")).read()
    assert html.count("<tr>") == 4 and "<audio controls" in html
    for i, cid in enumerate(info["clip_ids"]):
        sub = os.path.join(d, f"{i:03d}_{cid}")
        for f in ("gen_0.wav", "gen_1.wav", "gen_0_spec.png", "gt_tokens.wav", "cond_caption.txt"):
            assert os.path.exists(os.path.join(sub, f)), f
        wave, sr = read_wav(os.path.join(sub, "gen_0.wav"))
        assert sr == 24000 and len(wave) == 81920
        # the raw ground truth where the fixture has raw files (clip0, clip1), none otherwise
        assert os.path.exists(os.path.join(sub, "gt_raw.wav")) == (cid in ("clip0", "clip1"))
        if cid == "clip0":   # view 0's keyframe is at 0 s: the window clamps to the clip's first 81,920 samples
            raw, _ = read_wav(os.path.join(sub, "gt_raw.wav"))
            t = np.arange(81920) / 24000
            assert np.abs(raw - 0.3 * np.sin(2 * np.pi * 440 * t)).max() < 1e-3
        assert open(os.path.join(sub, "cond_caption.txt")).read() in ("a photo of a cat", "a photo of a dog")
    assert info["samples_per_s"] > 0 and "clip0" in info["clip_ids"]
    # same seed, same files: reproducible
    again = sample.main([f"--out_dir={out_dir}", "--mode=class_only", "--num_clips=3", "--num_samples=2",
                         "--steps=4", "--device=cpu", f"--samples_dir={tmp_path}/again"])
    assert np.array_equal(np.load(os.path.join(tmp_path, "again", "generated_ids.npy")), ids)
    assert again["clip_ids"] == info["clip_ids"]

    # continuation: the first 410 tokens are the ground truth's, rgb conditioning shown
    info = sample.main([f"--out_dir={out_dir}", "--mode=continuation", "--per_class=1", "--num_samples=1",
                        "--steps=3", "--device=cpu", "--view=2"])
    d = os.path.join(out_dir, "samples", "continuation")
    ids = np.load(os.path.join(d, "generated_ids.npy"))
    import modalities as M
    arrays = M.open_split(os.path.join(tmp_path, "data", "tiny", "tok"), "test")
    gt = np.asarray(arrays["tok_audio"][info["rows"], 2])
    assert ids.shape == (2, 1, 512) and np.array_equal(ids[:, 0, :410], gt[:, :410])
    assert sorted(info["classes"]) == ["cat", "dog"]
    assert os.path.exists(os.path.join(d, f"000_{info['clip_ids'][0]}", "cond_tok_rgb.png"))


@pytest.mark.parametrize("cond,target,files", [("rgb", "depth", ("gen_0.png", "gen_0_vis.png", "gt_tokens_vis.png")),
                                                ("audio", "caption", ("gen_0.txt", "gt_tokens.txt")),
                                                ("audio", "rgb", ("gen_0.png", "cond_tok_audio.wav"))])
def test_cli_general_cond_target(tmp_path, cond, target, files):
    out_dir = make_fixture(str(tmp_path), with_raw=(target == "rgb"))
    sample.main([f"--out_dir={out_dir}", f"--cond={cond}", f"--target={target}", "--num_clips=2",
                 "--num_samples=1", "--steps=2", "--device=cpu", "--guidance_scale=2.0"])
    d = os.path.join(out_dir, "samples", f"{cond}-to-{target}")
    assert os.path.exists(os.path.join(d, "index.html"))
    sub = sorted(p for p in os.listdir(d) if p.startswith("000_"))[0]
    for f in files:
        assert os.path.exists(os.path.join(d, sub, f)), f


def test_cli_read_out_mean_writes_each_cells_expected_patch(tmp_path):
    """--read_out=mean: one pass, no sampling; the saved vectors are convex mixes of the codebook's patches
    (every patch mean between the smallest and largest mean code) and the gallery shows their decoding.
    --read_out=shape_mode: the same means, each with one whole shape code."""
    import numpy as np
    from modality_tokenizers import PatchKMeansTokenizer
    out_dir = make_fixture(str(tmp_path), with_raw=False)
    sample.main([f"--out_dir={out_dir}", "--cond=rgb", "--target=depth", "--num_clips=2", "--num_samples=1",
                 "--device=cpu", "--read_out=mean"])
    d = os.path.join(out_dir, "samples", "rgb-to-depth")
    v = np.load(os.path.join(d, "expected_patches.npy"))
    assert v.shape == (2, 1, 196, 64) and v.dtype == np.float32
    tok = PatchKMeansTokenizer.load(os.path.join(tmp_path, "data", "tiny", "tok", "codebooks", "tok_depth.pt"))
    mu = v.mean(-1)
    assert mu.min() >= tok.means.min().item() - 1e-5 and mu.max() <= tok.means.max().item() + 1e-5
    sub = sorted(p for p in os.listdir(d) if p.startswith("000_"))[0]
    assert all(os.path.exists(os.path.join(d, sub, f)) for f in ("gen_0.png", "expected_patches.npy"))
    with pytest.raises(ValueError, match="read_out=mean"):
        sample.main([f"--out_dir={out_dir}", "--mode=class_only", "--read_out=mean"])
    # shape_mode: the same expected mean code, and one whole shape code (the likeliest) instead of a mix of them
    info = sample.main([f"--out_dir={out_dir}", "--cond=rgb", "--target=depth", "--num_clips=2", "--num_samples=1",
                        "--device=cpu", "--read_out=shape_mode", f"--samples_dir={tmp_path}/shape"])
    w = np.load(os.path.join(tmp_path, "shape", "expected_patches.npy"))
    assert info["task"]["read_out"] == "shape_mode" and w.shape == v.shape
    assert np.allclose(w.mean(-1), mu, atol=1e-5)
    shapes = tok.shapes.numpy()
    dist = (((w - w.mean(-1, keepdims=True)).reshape(-1, 1, 64) - shapes[None]) ** 2).sum(-1).min(1)
    assert dist.max() < 1e-8 and not np.allclose(w, v)
    # the default ('auto') reads depth as shape_mode, normals as mean; --read_out=sample draws ids with MaskGIT
    info = sample.main([f"--out_dir={out_dir}", "--cond=rgb", "--target=depth", "--num_clips=2", "--num_samples=2",
                        "--device=cpu", f"--samples_dir={tmp_path}/auto"])
    assert info["task"]["read_out"] == "shape_mode" and info["settings"]["num_samples"] == 1
    assert np.array_equal(np.load(os.path.join(tmp_path, "auto", "expected_patches.npy")), w)
    info = sample.main([f"--out_dir={out_dir}", "--cond=rgb", "--target=normal", "--num_clips=2", "--device=cpu",
                        f"--samples_dir={tmp_path}/normal"])
    assert info["task"]["read_out"] == "mean"
    sample.main([f"--out_dir={out_dir}", "--cond=rgb", "--target=depth", "--num_clips=2", "--num_samples=1",
                 "--steps=2", "--device=cpu", "--read_out=sample", f"--samples_dir={tmp_path}/drawn"])
    assert np.load(os.path.join(tmp_path, "drawn", "generated_ids.npy")).shape == (2, 1, 196)


def test_cli_refuses_bad_settings(tmp_path):
    out_dir = make_fixture(str(tmp_path), with_raw=False)
    with pytest.raises(ValueError, match="also in --cond"):
        sample.main([f"--out_dir={out_dir}", "--cond=audio", "--target=audio"])
    with pytest.raises(ValueError, match="mode"):
        sample.main([f"--out_dir={out_dir}", "--mode=class-only"])
    with pytest.raises(ValueError, match="unknown setting"):
        sample.main([f"--out_dir={out_dir}", "--temprature=0.5"])
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        sample.main([f"--out_dir={tmp_path}/nowhere", "--mode=class_only"])


class CaptionScript(nn.Module):
    """Caption logits that depend on the position only: id 100 (confidence 10) before caption position 3,
    end-of-text there (20), and a confident stray id 7 (30) after it: where training scores nothing."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        self.calls.append((enc_ids.clone(), enc_pos.clone(), enc_valid.clone()))
        return (dec_pos - POS_OFFSETS[modality_index("caption")]).float()[..., None]

    def modality_logits(self, h, m):
        p = h[:, 0].long()
        logits = torch.zeros(h.size(0), MODALITIES[m].vocab)
        logits[p < 3, 100] = 10.0
        logits[p == 3, CAPTION_PAD] = 20.0
        logits[p > 3, 7] = 30.0
        return logits


@pytest.mark.parametrize("schedule", ["maskgit", "roar", "raster"])
def test_caption_target_is_padding_after_its_first_end_of_text(schedule):
    model = CaptionScript()
    audio = torch.randint(0, 2048, (2, 512), generator=gen(3))
    out = generation.generate(model, {"audio": audio}, {}, "caption", steps=6, schedule=schedule, temperature=0,
                          generator=gen())
    want = torch.tensor([100, 100, 100] + [CAPTION_PAD] * 13)
    assert torch.equal(out, want.expand(2, -1))
    # once the end-of-text was in, the stray id never reached the encoder again
    c0 = POS_OFFSETS[modality_index("caption")]
    for enc_ids, enc_pos, enc_valid in model.calls:
        fed = enc_valid & (enc_pos >= c0)
        for b in range(2):
            if (fed[b] & (enc_pos[b] == c0 + 3)).any():
                assert not (fed[b] & (enc_pos[b] > c0 + 3) & (enc_ids[b] == 7)).any()


class WrongCodebook(nn.Module):
    """A stand-in whose audio logits put almost all the mass on the other codebook's ids: slot 2t (codebook
    0) prefers ids >= 1024, slot 2t + 1 (codebook 1) ids < 1024."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        return (dec_pos - A0).float()[..., None]

    def modality_logits(self, h, m):
        k = h[:, 0].long() % 2
        ids = torch.arange(MODALITIES[m].vocab)[None]
        other = (ids >= 1024) != (k[:, None] == 1)
        return torch.where(other, 8.0, 0.0) + torch.sin(ids * 0.37 + h) * 0.1


@pytest.mark.parametrize("schedule", ["maskgit", "roar", "raster"])
def test_every_audio_slot_samples_from_its_own_codebook(schedule):
    """Codebook-true sampling: slot K*t + k only ever gets an id of codebook k, [k * V, (k + 1) * V), even
    from a model that prefers the other codebook (before, e^8 odds would put nearly every slot in the wrong
    one, which decoding silently clamped); and from a tiny real model, with guidance and noise."""
    tokens, known = mixed_batch()
    known["audio"][2] = False          # (mixed_batch's random given ids ignore the layout: not checked)
    known["audio"][1, 410:] = False
    for model in (WrongCodebook(), tiny_model()):
        out = generation.generate(model, tokens, known, "audio", steps=5, schedule=schedule, guidance_scale=2.0,
                              temperature=2.0, remask_noise=1.0, generator=gen(2))
        slot = torch.arange(512).expand_as(out) % AUDIO_CODEBOOKS
        check = ~known["audio"]
        assert ((out // AUDIO_CODEBOOK_SIZE == slot) | ~check).all()
        assert len(set(out[check].tolist())) > 20
    # the switch off: the wrong-codebook preference wins nearly everywhere (what decoding used to clamp)
    off = generation.generate(WrongCodebook(), tokens, known, "audio", steps=5, schedule=schedule, generator=gen(2),
                          codebook_true=False)
    slot = torch.arange(512).expand_as(off) % AUDIO_CODEBOOKS
    assert ((off // AUDIO_CODEBOOK_SIZE != slot) & ~known["audio"]).float().sum() > 0.9 * (~known["audio"]).sum()
    mask = generation.codebook_mask(torch.tensor([0, 1, 2, 511]), 2048)
    assert mask.sum(1).tolist() == [1024] * 4 and mask[0, :1024].all() and mask[3, 1024:].all()


class Confident(nn.Module):
    """A stand-in whose every query is sure of one id, each position with its own fixed confidence: the logit
    of the sure id at position p is conf[p], every other id 0. Greedy decoding then commits by conf alone."""

    def __init__(self, seed=0):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.conf = torch.randperm(512, generator=gen(seed)).float() / 40.0     # distinct, 0 .. 12.8

    def decode_hidden(self, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
        return (dec_pos - A0).float()[..., None]

    def modality_logits(self, h, m):
        p = h[:, 0].long()
        logits = torch.zeros(h.size(0), MODALITIES[m].vocab)
        logits[torch.arange(h.size(0)), (p % 2) * 1024 + 5] = self.conf[p]
        return logits


def test_maskgit_commits_the_most_confident_frames_first():
    """At every MaskGIT step the frames committed are the most confident of those still masked: every one of
    them has a higher summed log-probability than every frame left masked (ROAR is random, so it does not)."""
    inner = Confident()
    model = Recorder(inner)
    B = 2
    tokens = {"caption": captions(["cat", "dog"])}
    generation.generate(model, tokens, {}, "audio", steps=6, temperature=0.0, generator=gen())
    # each slot's log-probability among its own codebook's 1,024 ids (the sure one at conf, 1,023 at 0)
    others = torch.full_like(inner.conf, math.log(AUDIO_CODEBOOK_SIZE - 1))
    tok_logp = inner.conf - torch.logsumexp(torch.stack([inner.conf, others]), 0)
    frame_conf = tok_logp.view(256, 2).sum(1)
    checked = 0
    for s in range(len(model.calls) - 1):
        for b in range(B):
            now = {(p - A0) // 2 for p in rows_of(model.calls[s], b)[1]}
            later = {(p - A0) // 2 for p in rows_of(model.calls[s + 1], b)[1]}
            committed = now - later
            assert committed and later
            assert min(frame_conf[list(committed)]) > max(frame_conf[list(later)]), s
            checked += 1
    assert checked == 2 * 5
    roar = Recorder(inner)
    generation.generate(roar, tokens, {}, "audio", steps=6, schedule="roar", temperature=0.0, generator=gen())
    first = {(p - A0) // 2 for p in rows_of(roar.calls[0], 0)[1]}
    assert min(frame_conf[list(first)]) < max(frame_conf[list(set(range(256)) - first)])


def test_guidance_feeds_exactly_what_conditioning_dropout_trains():
    """The unconditional input of guidance is the one train.py's conditioning dropout produces: for class-only
    generation (caption -> whole audio) the null token alone, for continuation (audio prefix + rgb + caption
    -> audio tail) the audio prefix alone. Compared as sets of (position, id) fed to the encoder."""
    import masking
    from modalities import modality_index as mi
    B = 2
    audio = torch.randint(0, 1024, (B, 512), generator=gen(4))
    tokens = {"tok_rgb": torch.randint(0, 16384, (B, 196), generator=gen(5)),
              "tok_depth": torch.zeros(B, 196, dtype=torch.long), "tok_normal": torch.zeros(B, 196, dtype=torch.long),
              "tok_audio": audio, "caption": captions(["cat", "dog"])}
    none = (0.0,) * 5

    def fed(enc_ids, enc_pos, enc_valid, b):
        return set(zip(enc_pos[b][enc_valid[b]].tolist(), enc_ids[b][enc_valid[b]].tolist()))

    # class-only: the whole caption in, the whole audio out
    cfg = masking.MaskingConfig(input_full=("caption",), input_alphas=none, input_budget=(0, 0),
                                target_full=("audio",), target_alphas=none, target_budget=(0, 0))
    batch = masking.condition_dropout(masking.build_batch(tokens, cfg, gen(1)), 1.0, gen(2))
    model = Recorder(tiny_model())
    generation.generate(model, {"caption": tokens["caption"]}, {}, "audio", steps=2, guidance_scale=3.0, generator=gen())
    uncond = model.calls[1]
    for b in range(B):
        want = fed(batch["enc_ids"], batch["enc_pos"], batch["enc_valid"], b)
        assert want == {(null_position(False), NULL_ID)}
        assert fed(uncond["enc_ids"], uncond["enc_pos"], uncond["enc_valid"], b) == want
    # continuation: the first 205 frames of audio, rgb and the caption in; the audio tail out
    prefix = generation.continuation_prefix()
    b0 = masking.build_batch(tokens, masking.MaskingConfig(input_full=("caption", "rgb"), target_full=("audio",),
                                                           input_alphas=none, target_alphas=none,
                                                           input_budget=(0, 0), target_budget=(0, 0)), gen(1))
    # put the audio prefix in as inputs and leave the tail as targets (as generate's first step has them)
    a_pos = POS_OFFSETS[mi("audio")] + torch.arange(prefix)
    enc_ids = torch.cat([audio[:, :prefix], b0["enc_ids"]], 1)
    enc_pos = torch.cat([a_pos.expand(B, -1), b0["enc_pos"]], 1)
    enc_valid = torch.cat([torch.ones(B, prefix, dtype=torch.bool), b0["enc_valid"]], 1)
    tail = b0["dec_pos"] >= POS_OFFSETS[mi("audio")] + prefix
    batch = masking.condition_dropout(dict(b0, enc_ids=enc_ids, enc_pos=enc_pos, enc_valid=enc_valid,
                                           dec_valid=b0["dec_valid"] & tail), 1.0, gen(2))
    known = torch.zeros(B, 512, dtype=torch.bool)
    known[:, :prefix] = True
    model = Recorder(tiny_model())
    generation.generate(model, {"caption": tokens["caption"], "rgb": tokens["tok_rgb"], "audio": audio},
                    {"audio": known}, "audio", steps=2, guidance_scale=3.0, generator=gen())
    uncond = model.calls[1]
    for b in range(B):
        want = fed(batch["enc_ids"], batch["enc_pos"], batch["enc_valid"], b)
        assert want == set(zip(a_pos.tolist(), audio[b, :prefix].tolist()))
        assert fed(uncond["enc_ids"], uncond["enc_pos"], uncond["enc_valid"], b) == want


def test_condition_dropout_rate_and_packing():
    """At rate r about r of the samples lose the inputs of every modality they have no target in; the kept
    inputs stay first and in order; rate 0 changes nothing; the targets are never touched."""
    import masking
    B = 400
    tokens = masking.random_tokens(B, generator=gen(3))
    cfg = masking.MaskingConfig(input_budget=(16, 64), target_budget=(16, 64))
    base = masking.build_batch(tokens, cfg, gen(4))
    assert masking.condition_dropout(base, 0.0, gen(5)) is base
    out = masking.condition_dropout(base, 0.25, gen(5))
    for k in ("dec_pos", "dec_ids", "dec_valid"):
        assert torch.equal(out[k], base[k])
    n_valid = out["enc_valid"].sum(1)
    assert (out["enc_valid"] == (torch.arange(out["enc_valid"].size(1))[None] < n_valid[:, None])).all()
    changed = (n_valid != base["enc_valid"].sum(1)) | (out["enc_pos"] != base["enc_pos"]).any(1)
    from modalities import position_modality
    tm = torch.where(base["dec_valid"], position_modality(base["dec_pos"]), 5)
    targeted = torch.zeros(B, 6, dtype=torch.bool).scatter_(1, tm, True)
    em = position_modality(base["enc_pos"])
    eligible = (base["enc_valid"] & ~targeted.gather(1, em)).any(1)   # an input a dropout would remove
    assert not changed[~eligible].any() and eligible.sum() > 100
    assert 0.17 < changed[eligible].float().mean() < 0.33, changed[eligible].float().mean()
    for b in torch.nonzero(changed)[:, 0].tolist()[:20]:
        tmods = set(position_modality(base["dec_pos"][b][base["dec_valid"][b]]).tolist())
        kept = out["enc_pos"][b][out["enc_valid"][b]]
        if kept.tolist() == [null_position("caption" in [MODALITIES[m].name for m in tmods])]:
            continue
        assert set(position_modality(kept).tolist()) <= tmods
        before = base["enc_pos"][b][base["enc_valid"][b]]
        assert kept.tolist() == [p for p in before.tolist() if position_modality(torch.tensor(p)).item() in tmods]


def test_audio_levels_trains_one_level_from_the_ones_below():
    """levels.audio_levels: about `rate` of the samples whose targets are all audio learn one codebook level q: their audio
    targets are all of level q, their level < q targets are now inputs (same ids), nothing above q is fed; every
    other token, and every unpicked sample, is as build_batch made it; rate 0 changes nothing."""
    import levels
    import masking
    from modalities import position_modality
    B, K = 400, AUDIO_CODEBOOKS
    tokens = masking.random_tokens(B, generator=gen(3))
    none = (0.0,) * 5   # half the plain recipe, half the caption and some audio in, the rest of the audio out
    infill = dict(weight=0.5, input_full=("caption",), input_alphas=(0.0, 0.0, 0.0, 1.0, 0.0), input_budget=(0, 448),
                  target_full=("audio",), target_alphas=none, target_budget=(0, 0))
    cfg = masking.MaskingConfig(input_budget=(16, 64), target_budget=(16, 64), mixture=[dict(weight=0.5), infill])
    base = masking.build_batch(tokens, cfg, gen(4))
    assert levels.audio_levels(base, 0.0, gen(5)) is base
    out = levels.audio_levels(base, 0.5, gen(5))
    rows = lambda bt, side, b: set(zip(bt[side + "_pos"][b][bt[side + "_valid"][b]].tolist(),
                                       bt[side + "_ids"][b][bt[side + "_valid"][b]].tolist()))
    audio = lambda s: {(p, i) for p, i in s if A0 <= p < A0 + BY_NAME["tok_audio"].length}
    level = lambda p: (p - A0) % K
    picked = levels_seen = 0
    seen = set()
    for b in range(B):
        enc0, dec0, enc1, dec1 = rows(base, "enc", b), rows(base, "dec", b), rows(out, "enc", b), rows(out, "dec", b)
        for side in ("enc", "dec"):   # kept entries are packed first
            v = out[side + "_valid"][b]
            assert v.tolist() == sorted(v.tolist(), reverse=True)
        if enc1 == enc0 and dec1 == dec0:
            continue
        picked += 1
        assert audio(dec0) and audio(dec0) == dec0, "a sample with other targets than audio was changed"
        q = {level(p) for p, _ in audio(dec1)}
        assert len(q) == 1, q
        q = q.pop()
        seen.add(q)
        assert dec1 == {(p, i) for p, i in dec0 if (p, i) not in audio(dec0) or level(p) == q}
        assert enc1 == {(p, i) for p, i in enc0 if (p, i) not in audio(enc0) or level(p) <= q} | \
            {(p, i) for p, i in audio(dec0) if level(p) < q}
        assert all(position_modality(torch.tensor(p)).item() == modality_index("audio") for p, _ in enc1 - enc0)
    eligible = sum(bool(audio(rows(base, "dec", b))) and audio(rows(base, "dec", b)) == rows(base, "dec", b)
                   for b in range(B))
    assert eligible > 150 and 0.35 < picked / eligible < 0.65, (picked, eligible)
    assert seen == set(range(K))


@pytest.mark.parametrize("schedule", ["maskgit", "raster"])
def test_by_level_decodes_level_zero_first_without_the_levels_above(schedule):
    """generate(by_level=True): `steps` passes per codebook level; while level q is decoded the encoder holds no
    audio id of a higher level (not even a given one) and the decoder queries level q only; every unknown slot is
    decoded once, the given ones come back, each slot from its own codebook."""
    model = Recorder(tiny_model())
    tokens, known = mixed_batch()
    S = 4
    out = generation.generate(model, tokens, known, "audio", steps=S, schedule=schedule, generator=gen(),
                              by_level=True)
    K = AUDIO_CODEBOOKS
    assert len(model.calls) == K * S
    ka = known["audio"]
    assert torch.equal(out[ka], tokens["audio"][ka])
    slot = torch.arange(out.size(1))
    assert ((out // AUDIO_CODEBOOK_SIZE) == (slot % K))[~ka].all()
    for q in range(K):
        for call in model.calls[q * S:(q + 1) * S]:
            for b in range(out.size(0)):
                enc, dec = rows_of(call, b)
                assert all((p - A0) % K <= q for p in enc if A0 <= p < A0 + 512)
                assert all((p - A0) % K == q for p in dec)
    again = generation.generate(tiny_model(), tokens, known, "audio", steps=S, schedule=schedule, generator=gen(),
                                by_level=True)
    assert torch.equal(out, again)

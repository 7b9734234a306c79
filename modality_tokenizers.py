"""
The tokenizers of the five modalities, each with the same small API:

    tok.encode(batch) -> LongTensor ids [B, L] in [0, modality vocab)
    tok.decode(ids)   -> numpy: waveform float32 [B, 81920] at 24 kHz (audio), uint8 [B, 224, 224, 3] (rgb,
                         normals), uint16 [B, 224, 224] (depth), list of str (caption)

Real tokenizers (need downloads on first use):
    EncodecTokenizer   EnCodec 24 kHz at 1.5 kbps: 2 codebooks x 1024 at 75 Hz (the report's audio tokenizer)
    SpeechTokenizerTokenizer  SpeechTokenizer 16 kHz: 3 of 8 levels x 1024 at 50 Hz, level 1 from HuBERT (extra)
    MimiTokenizer      Mimi 24 kHz (transformers): 12 levels x 2048 at 12.5 Hz, level 1 from WavLM (extra)
    DivaeTokenizer     the 4M DiVAE image tokenizers (rgb 16k, depth 8k, normal 8k), optional `fourm` extra
Offline tokenizers (fitted by tokenize_all.py on the training split, no downloads):
    MelRVQTokenizer    log-mel frames at 75 Hz -> 2-level residual k-means codebook, Griffin-Lim decoder
    PatchKMeansTokenizer  14x14 patches of 16x16 px -> one k-means code per patch
    CaptionTokenizer   GPT-2 BPE via tiktoken (streams.encode_caption)

Fitted codebooks live in tok/codebooks/<modality>.pt; `load_tokenizer` rebuilds whichever tokenizer
meta.json says produced a modality, so sampling and evaluation decode with the very same one.
"""
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F

import files
import modalities as M
import streams as S
from modalities import pick_device

IMAGE_SIZE = 224
PATCH = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# patch codebooks: (mean codes, shape codes), whose product fills each image modality's id range
DEFAULT_CODES = {"tok_rgb": (256, 64), "tok_depth": (128, 64), "tok_normal": (128, 64), "tok_audio": 1024}


def _as_tensor(x, device, dtype=torch.float32):
    x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# k-means: batched, chunked distances (never an N x K x D tensor), deterministic from a seed

def nearest(x, codebook, chunk=8192, return_dist=False):
    """Index of the nearest codebook row for each row of x [N, D] (squared Euclidean)."""
    c_sq = (codebook * codebook).sum(1)
    ids, dists = [], []
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term does not change the argmin
        d = c_sq[None, :] - 2.0 * (xb @ codebook.T)
        best, idx = d.min(dim=1)
        ids.append(idx)
        if return_dist:
            dists.append((best + (xb * xb).sum(1)).clamp_min(0))
    ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=x.device)
    return (ids, torch.cat(dists)) if return_dist else ids


def kmeans(x, k, iters=20, seed=1337, chunk=8192, verbose=False):
    """Lloyd's k-means on x [N, D]: init from k distinct random data rows, then `iters` rounds.
    An empty cluster is re-seeded with the currently worst-fitted point, so all k codes stay in use
    when the data allows it. Returns (codebook [k, D], mean squared error per vector)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} vectors to fit, got {n}: use more training clips "
                         f"or a smaller codebook")
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for it in range(iters):
        ids, d = nearest(x, c, chunk, return_dist=True)
        counts = torch.bincount(ids, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, ids, x)
        live = counts > 0
        c[live] = sums[live] / counts[live, None].to(x.dtype)
        dead = (~live).nonzero().flatten()
        if len(dead):
            worst = d.topk(len(dead)).indices
            c[dead] = x[worst]
        if verbose:
            print(f"  k-means iter {it + 1}/{iters}: mse {d.mean().item():.5f}, {len(dead)} empty re-seeded")
    _, d = nearest(x, c, chunk, return_dist=True)
    return c, d.mean().item()


# ---------------------------------------------------------------------------------------------------
# audio features: log-mel at 75 Hz, exactly 256 frames for a 3.41 s window

N_FFT = 1024
HOP = M.AUDIO_SR // 75          # 320 samples = one EnCodec frame
N_MELS = 80
_mel_cache = {}


def _mel_matrices(device):
    """(fbank [513, 80], its pseudo-inverse [80, 513]) on `device`, built once."""
    key = str(device)
    if key not in _mel_cache:
        import torchaudio.functional as AF
        fb = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, M.AUDIO_SR / 2, N_MELS, M.AUDIO_SR,
                                norm="slaney", mel_scale="slaney").to(torch.float64)
        _mel_cache[key] = (fb.float().to(device), torch.linalg.pinv(fb).float().to(device))
    return _mel_cache[key]


def _window(device):
    return torch.hann_window(N_FFT, device=device)


def log_mel(wave):
    """Waveform [B, T] (or [T]) at 24 kHz -> log-mel magnitude [B, T // 320, 80], natural log.
    Frame t is centred on sample 320 t (torch.stft with center=True gives T/320 + 1 frames; the last one,
    centred past the end, is dropped), so 81,920 samples give exactly 256 frames, aligned with EnCodec's."""
    wave = _as_tensor(wave, wave.device if torch.is_tensor(wave) else "cpu")
    squeeze = wave.dim() == 1
    wave = wave[None] if squeeze else wave
    spec = torch.stft(wave, N_FFT, HOP, window=_window(wave.device), center=True, pad_mode="reflect",
                      return_complex=True)
    mag = spec.abs()[..., :wave.shape[-1] // HOP]                  # [B, 513, frames]
    fb, _ = _mel_matrices(wave.device)
    mel = torch.einsum("bft,fm->btm", mag, fb)
    out = torch.log(mel.clamp_min(1e-5))
    return out[0] if squeeze else out


def mel_to_wave(logmel, n_iter=32, length=M.AUDIO_WINDOW, seed=0):
    """Inverse of log_mel, approximately: exp -> mel pseudo-inverse (clamped >= 0) -> fast Griffin-Lim
    (momentum 0.99) with torch.stft/istft. logmel [B, frames, 80] -> waveform [B, length]."""
    _, pinv = _mel_matrices(logmel.device)
    mag = torch.einsum("btm,mf->bft", torch.exp(logmel), pinv).clamp_min(0)
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)                   # the dropped final frame: repeat the last
    win = _window(logmel.device)
    g = torch.Generator().manual_seed(seed)
    phase = torch.exp(2j * np.pi * torch.rand(mag.shape, generator=g)).to(logmel.device)
    prev = torch.zeros_like(phase)
    for _ in range(n_iter):
        wave = torch.istft(mag * phase, N_FFT, HOP, window=win, center=True, length=length)
        spec = torch.stft(wave, N_FFT, HOP, window=win, center=True, pad_mode="reflect", return_complex=True)
        accel = spec + 0.99 * (spec - prev)                        # Perraudin et al.'s fast Griffin-Lim
        prev = spec
        phase = accel / accel.abs().clamp_min(1e-8)
    wave = torch.istft(mag * phase, N_FFT, HOP, window=win, center=True, length=length)
    return wave


def spectral_distance(a, b):
    """Mean absolute log-mel difference between waveforms a and b [B, T] -> [B] (nats)."""
    return (log_mel(a) - log_mel(b)).abs().mean(dim=(1, 2))


def _check_windows(waves, device):
    x = _as_tensor(waves, device)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[1] != M.AUDIO_WINDOW:
        raise ValueError(f"audio tokenizers take windows [B, {M.AUDIO_WINDOW}] at {M.AUDIO_SR} Hz, "
                         f"got {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------------------------------------
# audio, offline: 2-level residual k-means on log-mel frames

class MelRVQTokenizer:
    """Each 75 Hz log-mel frame f is coded as (i, j): i = the level-1 code, j = nearest(f - C1[i], C2);
    the 512-id stream is streams.interleave_audio of [i-codes, j-codes]. Decoding sums C1[i] + C2[j] and
    inverts the mel with Griffin-Lim.

    What level 1 looks at (`level1`, recorded in the codebook's settings; tokenize_all.py --audio_level1):
    - "shape" (the default): the frame's spectral shape s_t = f_t - mean(f_t), with C1 fitted on
      mean-removed frames.
    - "shape_delta": s_t and how it changed over the last two frames, s_t - s_{t-2} (160-d keys; a window's
      first frames look back to its first). A call is a pitch or formant moving in time, which one frame's
      shape cannot tell apart (rising or falling). C1[i], what decoding adds, is the mean shape of the frames
      given code i; the keys only choose i.
    - "spectrum": the raw f_t (the oldest codebooks), which spends level 1 on how loud a frame is.
    Level 2 always codes what level 1 left, loudness included. With `levels=1` (tokenize_all.py
    --audio_rvq_levels=1) level 1 alone codes the whole frame (level1='spectrum'): one id a frame, a 256-id
    stream (layout K = 1), so a sampler never has a frame's two ids to draw blind to each other.
    How much of the class the tokens keep on ToyZoo, per 3.4 s test view (docs/experiments.md, "where the
    fault is"): a small CNN on the tokens 90.0% with shape-first codes, 85.5% with spectrum-first ones, 97.5%
    on the log-mel itself. shape_delta vs shape, a linear probe on token histograms over two codebook fits each:
    87.5% / 88.6% vs 88.1% / 85.5%, within the spread between fits, so shape stays the default."""
    kind = "mel_rvq"
    layout = M.ENCODEC_LAYOUT
    LEVEL1_MODES = ("shape_delta", "shape", "spectrum")
    DELTA_LAG = 2       # frames (27 ms): one frame apart, consecutive 75 Hz frames overlap too much to differ

    def __init__(self, codebooks, settings=None, device="cpu", level1_keys=None):
        self.device = pick_device(device)
        self.codebooks = codebooks.to(self.device, torch.float32)   # [levels, K, 80], K <= 1024
        self.layout = M.AudioLayout(codebooks=self.codebooks.shape[0])   # levels 2: the report's shape
        self.settings = dict(settings or {})
        self.griffin_lim_iters = int(self.settings.get("griffin_lim_iters", 32))
        self.level1_mode = self._check_level1(self.settings.get("level1", "spectrum"))  # older codebooks: spectrum
        if self.level1_mode == "shape_delta" and level1_keys is None:
            raise ValueError("mel_rvq level1='shape_delta' needs its level-1 keys [K, 160]")
        # what frames are matched against at level 1: the decoding vectors themselves unless keys were fitted
        self.keys = self.codebooks[0] if level1_keys is None else level1_keys.to(self.device, torch.float32)

    @classmethod
    def _check_level1(cls, mode):
        if mode not in cls.LEVEL1_MODES:
            raise ValueError(f"mel_rvq level1={mode!r}: expected one of {', '.join(cls.LEVEL1_MODES)}")
        return mode

    @classmethod
    def level1_input(cls, f, mode):
        """log-mel frames [..., T, 80] in time order (a window, or a batch of them) -> level-1 keys [..., T, D]."""
        if mode == "spectrum":
            return f
        s = f - f.mean(dim=-1, keepdim=True)
        if mode == "shape":
            return s
        lag = cls.DELTA_LAG
        prev = torch.cat([s[..., :1, :].expand(*s.shape[:-2], lag, s.shape[-1]), s[..., :-lag, :]], dim=-2)
        return torch.cat([s, s - prev], dim=-1)

    @classmethod
    def fit(cls, frames, codes=1024, iters=20, seed=1337, device="cpu", verbose=False, level1="shape",
            keys=None, levels=2, **settings):
        """frames [N, 80] log-mel vectors from the training split; keys [N, D] their level1_input() (needed
        for 'shape_delta', which looks at each frame's predecessors: compute it on whole windows, then
        subsample frames and keys together)."""
        if codes > M.AUDIO_CODEBOOK_SIZE:
            raise ValueError(f"audio codebook size {codes} > {M.AUDIO_CODEBOOK_SIZE} (the id range per codebook)")
        cls._check_level1(level1)      # before the k-means, not after
        if levels not in (1, 2) or (levels == 1 and level1 != "spectrum"):
            raise ValueError(f"mel_rvq levels={levels}, level1={level1!r}: 2 levels, or 1 level that codes the whole "
                             f"frame (level1='spectrum'; a shape alone would lose each frame's loudness)")
        device = pick_device(device)
        x = _as_tensor(frames, device)
        if keys is None:
            if level1 == "shape_delta":
                raise ValueError("mel_rvq level1='shape_delta' fits on keys computed from whole windows: pass "
                                 "keys=MelRVQTokenizer.level1_input(windows, 'shape_delta') flattened with the frames")
            keys = cls.level1_input(x, level1)
        q = _as_tensor(keys, device)
        if q.shape[0] != x.shape[0]:
            raise ValueError(f"mel_rvq fit: {q.shape[0]} keys for {x.shape[0]} frames")
        k1, mse1 = kmeans(q, codes, iters, seed, verbose=verbose)
        a1 = nearest(q, k1)
        # decoding vector of each level-1 code: the first 80 dims of its key (the mean frame shape or spectrum)
        c1 = k1[:, :N_MELS].contiguous()
        levels_fit = [c1]
        if levels == 2:
            residual = x - c1[a1]
            c2, mse2 = kmeans(residual, codes, iters, seed + 1, verbose=verbose)
            levels_fit.append(c2)
        # mse_level1: level 1's error in the space it codes; mse_level2: the final reconstruction error
        settings.update(codes=codes, iters=iters, seed=seed, n_fft=N_FFT, hop=HOP, n_mels=N_MELS, level1=level1,
                        fit_vectors=int(x.shape[0]), mse_level1=mse1, mse_level2=mse2 if levels == 2 else mse1,
                        variance=x.var(0).sum().item(), **({"levels": 1} if levels == 1 else {}))
        return cls(torch.stack(levels_fit).cpu(), settings, device,
                   level1_keys=k1.cpu() if level1 == "shape_delta" else None)

    def level1(self, f):
        """log-mel frames [..., T, 80] in time order -> their level-1 codes [..., T]."""
        q = self.level1_input(f, self.level1_mode)
        return nearest(q.reshape(-1, q.shape[-1]), self.keys).view(q.shape[:-1])

    def codes(self, waves):
        """windows [B, 81920] -> codes [B, levels, 256] (long)."""
        f = log_mel(_check_windows(waves, self.device))
        i = self.level1(f)
        if len(self.codebooks) == 1:
            return i[:, None]
        j = nearest((f - self.codebooks[0][i]).reshape(-1, N_MELS), self.codebooks[1]).view(i.shape)
        return torch.stack([i, j], dim=1)

    def codes_to_features(self, codes):
        """codes [B, levels, 256] -> log-mel [B, 256, 80]: the sum of the levels' codebook vectors."""
        codes = codes.to(self.device).long()
        return sum(self.codebooks[k][codes[:, k]] for k in range(len(self.codebooks)))

    def encode(self, waves):
        return S.interleave_audio(self.codes(waves), self.layout)

    def id_features(self):
        """[levels * 1024, 80]: the log-mel codebook vector behind each audio id (model.py's code features)."""
        return audio_id_features(self.codebooks)

    @torch.no_grad()
    def decode(self, ids):
        codes = S.deinterleave_audio(_as_tensor(ids, self.device, torch.long), self.layout)
        codes = codes.clamp(0, self.codebooks.shape[1] - 1)  # a sampled id past a small codebook: clamp
        wave = mel_to_wave(self.codes_to_features(codes), n_iter=self.griffin_lim_iters)
        return wave.clamp(-1, 1).cpu().numpy().astype(np.float32)

    def save(self, path):
        d = {"kind": self.kind, "codebooks": self.codebooks.cpu(), "settings": self.settings}
        if self.level1_mode == "shape_delta":
            d["level1_keys"] = self.keys.cpu()
        _atomic_torch_save(d, path)

    @classmethod
    def load(cls, path, device="cpu", trust=False):
        d = files.load_torch_file(path, trust=trust)
        return cls(d["codebooks"], d["settings"], device, level1_keys=d.get("level1_keys"))


def audio_id_features(codebooks):
    """codebooks [L, K, F] (K <= 1024) -> [L * 1024, F] indexed by audio id (code + 1024 * codebook); the ids
    past a small codebook get zero rows, which model.py reads as unused."""
    cb = codebooks.detach().float().cpu()
    out = torch.zeros(cb.shape[0] * M.AUDIO_CODEBOOK_SIZE, cb.shape[-1])
    for k in range(cb.shape[0]):
        out[k * M.AUDIO_CODEBOOK_SIZE:k * M.AUDIO_CODEBOOK_SIZE + cb.shape[1]] = cb[k]
    return out


# ---------------------------------------------------------------------------------------------------
# audio, real: EnCodec 24 kHz, 1.5 kbps

def load_encodec_model():
    """The released EnCodec 24 kHz weights (the encodec package downloads them to the torch hub cache and checks
    them against the sha256 prefix in its own file name)."""
    from encodec import EncodecModel
    return EncodecModel.encodec_model_24khz(pretrained=True)


class EncodecTokenizer:
    """EnCodec 24 kHz at 1.5 kbps: a window of 81,920 samples -> codes [2, 256] in [0, 1024) -> 512 ids.
    The pretrained weights download on first use (torch hub cache); pass model= to use another one
    (the tests pass an untrained model of the same architecture)."""
    kind = "encodec"
    layout = M.ENCODEC_LAYOUT

    def __init__(self, device="cpu", model=None, batch_size=16):
        self.device = pick_device(device)
        if model is None:
            model = load_encodec_model()
        model.set_target_bandwidth(1.5)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.settings = {"bandwidth": 1.5, "model": "encodec_24khz"}

    @torch.no_grad()
    def codes(self, waves):
        x = _check_windows(waves, self.device)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            frames = self.model.encode(x[i:i + self.batch_size, None, :])  # list of (codes [b, K, T], scale)
            c = torch.cat([f[0] for f in frames], dim=-1)
            if c.shape[1] != M.AUDIO_CODEBOOKS:
                raise RuntimeError(f"EnCodec returned {c.shape[1]} codebooks at 1.5 kbps, expected 2")
            # 81,920 / 320 = 256 frames; trim a spare frame or repeat the last if the encoder's padding
            # ever disagrees, so the stream geometry is always exact
            if c.shape[-1] > M.AUDIO_FRAMES:
                c = c[..., :M.AUDIO_FRAMES]
            elif c.shape[-1] < M.AUDIO_FRAMES:
                c = torch.cat([c, c[..., -1:].expand(-1, -1, M.AUDIO_FRAMES - c.shape[-1])], dim=-1)
            out.append(c.long())
        return torch.cat(out)

    def encode(self, waves):
        return S.interleave_audio(self.codes(waves), self.layout)

    def id_features(self):
        """[2048, 128]: the quantizer's codebook vector behind each audio id (model.py's code features)."""
        layers = self.model.quantizer.vq.layers[:M.AUDIO_CODEBOOKS]
        return audio_id_features(torch.stack([layer.codebook.detach() for layer in layers]))

    @torch.no_grad()
    def decode(self, ids):
        codes = S.deinterleave_audio(_as_tensor(ids, self.device, torch.long), self.layout).clamp(0, 1023)
        out = []
        for i in range(0, codes.shape[0], self.batch_size):
            w = self.model.decode([(codes[i:i + self.batch_size], None)])[:, 0]
            w = w[:, :M.AUDIO_WINDOW]
            if w.shape[1] < M.AUDIO_WINDOW:
                w = F.pad(w, (0, M.AUDIO_WINDOW - w.shape[1]))
            out.append(w)
        return torch.cat(out).clamp(-1, 1).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# audio, real and semantic: codecs whose first codebook is distilled from a self-supervised speech model

class _PretrainedCodec:
    """Shared by the pretrained codecs below: 24 kHz windows are resampled to the codec's rate, encoded to
    K codebooks (the first K of its residual levels) and cut to the layout's T frames; decoding runs the
    codec's decoder and resamples back to a 24 kHz window. A subclass sets `kind`, `levels` (K) and
    `_encode(x) -> codes [b, >= K, frames]` / `_decode(codes [b, K, T]) -> wave [b, n]` at its own rate,
    and passes the codec's codebook size, frame rate and sample rate to __init__."""
    kind = levels = None

    def __init__(self, model, device, batch_size, codebook_size, frame_rate, sample_rate, settings):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        frames = int(M.AUDIO_WINDOW / M.AUDIO_SR * frame_rate)   # whole frames inside the window
        self.layout = M.AudioLayout(codebooks=self.levels, codebook_size=int(codebook_size), frames=frames,
                                    frame_rate=float(frame_rate), sample_rate=int(sample_rate))
        self.settings = dict(settings, layout=dataclasses.asdict(self.layout))

    def _resample(self, x, src, dst):
        import torchaudio.functional as AF
        return x if src == dst else AF.resample(x, src, dst)

    @torch.no_grad()
    def codes(self, waves):
        """[B, 81920] at 24 kHz -> LongTensor codes [B, K, T] in [0, V)."""
        x = _check_windows(waves, self.device)
        K, T = self.levels, self.layout.frames
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            c = self._encode(self._resample(x[i:i + self.batch_size], M.AUDIO_SR, self.layout.sample_rate))
            if c.shape[1] < K:
                raise RuntimeError(f"{self.kind} returned {c.shape[1]} codebooks, the layout needs {K}")
            c = c[:, :K, :T]
            if c.shape[-1] < T:   # the encoder's padding gave a frame less: repeat the last, keep T exact
                c = torch.cat([c, c[..., -1:].expand(-1, -1, T - c.shape[-1])], dim=-1)
            out.append(c.long())
        return torch.cat(out)

    def encode(self, waves):
        return S.interleave_audio(self.codes(waves), self.layout)

    @torch.no_grad()
    def decode(self, ids):
        codes = S.deinterleave_audio(_as_tensor(ids, self.device, torch.long), self.layout)
        codes = codes.clamp(0, self.layout.codebook_size - 1)
        out = []
        for i in range(0, codes.shape[0], self.batch_size):
            w = self._resample(self._decode(codes[i:i + self.batch_size]).float(), self.layout.sample_rate,
                               M.AUDIO_SR)[:, :M.AUDIO_WINDOW]
            out.append(F.pad(w, (0, M.AUDIO_WINDOW - w.shape[1])))
        return torch.cat(out).clamp(-1, 1).cpu().numpy().astype(np.float32)


class SpeechTokenizerTokenizer(_PretrainedCodec):
    """SpeechTokenizer (fnlp, `pip install speechtokenizer`): 16 kHz, 50 Hz, 8 residual levels of 1024 codes,
    level 1 distilled from HuBERT (it carries the content, the later levels the timbre). The stream keeps
    K = 3 levels: 170 frames x 3 = 510 ids, the report's ~512. The weights download on first use from the
    Hugging Face hub (SPEECHTOKENIZER_REPO at SPEECHTOKENIZER_REVISION); pass model= to use another one (the
    tests build the package's model from a small config with random weights)."""
    kind = "speechtokenizer"
    levels = 3

    def __init__(self, device="cpu", model=None, batch_size=16, revision=None):
        commit = None
        if model is None:
            model, commit = self.load_pretrained(revision or SPEECHTOKENIZER_REVISION)
        settings = {"model": "custom" if commit is None else SPEECHTOKENIZER_REPO, "revision": commit}
        rate = model.sample_rate
        super().__init__(model, device, batch_size, model.quantizer.bins, rate / int(model.downsample_rate), rate,
                         settings)

    @staticmethod
    def load_pretrained(revision):
        """-> (model, the commit its files came from), refusing another commit than a pinned one"""
        import json
        try:
            from huggingface_hub import hf_hub_download
            from speechtokenizer import SpeechTokenizer
        except ImportError as e:
            raise ImportError(f"--audio_tokenizer=speechtokenizer needs the extras ({e.name} missing): "
                              f"pip install -r requirements-extra.txt") from None
        get = lambda f: hf_hub_download(SPEECHTOKENIZER_REPO, f"{SPEECHTOKENIZER_VARIANT}/{f}", revision=revision)
        config = get("config.json")         # .../snapshots/<commit>/<variant>/config.json
        commit = os.path.basename(os.path.dirname(os.path.dirname(config)))
        _check_revision(SPEECHTOKENIZER_REPO, revision, commit)
        with open(config) as f:
            model = SpeechTokenizer(json.load(f))
        # the package's own loader unpickles (it could run code); the checkpoint is a plain state dict
        model.load_state_dict(torch.load(get("SpeechTokenizer.pt"), map_location="cpu", weights_only=True))
        return model, commit

    def _encode(self, x):
        return self.model.encode(x[:, None, :], n_q=self.levels).transpose(0, 1)   # [K, b, T] -> [b, K, T]

    def _decode(self, codes):
        return self.model.decode(codes.transpose(0, 1))[:, 0]


class MimiTokenizer(_PretrainedCodec):
    """Mimi (Kyutai, in transformers): 24 kHz, 12.5 Hz, residual levels of 2048 codes, level 1 distilled from
    WavLM. The stream keeps K = 12 levels: 42 frames x 12 = 504 ids, the report's ~512. The weights download
    on first use from the Hugging Face hub (MIMI_REPO at MIMI_REVISION); pass model= to use another one
    (the tests build transformers' MimiModel from a small MimiConfig with random weights)."""
    kind = "mimi"
    levels = 12

    def __init__(self, device="cpu", model=None, batch_size=16, revision=None):
        commit = None
        if model is None:
            model, commit = self.load_pretrained(revision or MIMI_REVISION)
        settings = {"model": "custom" if commit is None else MIMI_REPO, "revision": commit}
        cfg = model.config
        super().__init__(model, device, batch_size, cfg.codebook_size, cfg.frame_rate, cfg.sampling_rate, settings)

    @staticmethod
    def load_pretrained(revision):
        """-> (model, the commit its files came from), refusing another commit than a pinned one"""
        try:
            from transformers import MimiModel
        except ImportError as e:
            raise ImportError(f"--audio_tokenizer=mimi needs transformers with Mimi ({e}): "
                              f"pip install -r requirements-extra.txt") from None
        model = MimiModel.from_pretrained(MIMI_REPO, revision=revision)
        commit = getattr(model.config, "_commit_hash", None)
        _check_revision(MIMI_REPO, revision, commit)
        return model, commit

    def _encode(self, x):
        return self.model.encode(x[:, None, :], num_quantizers=self.levels).audio_codes

    def _decode(self, codes):
        return self.model.decode(codes).audio_values[:, 0]


def _check_revision(repo, asked, got):
    if asked and len(asked) == 40 and got != asked:
        raise RuntimeError(f"{repo}: asked for revision {asked}, got {got}")


# where the pretrained semantic codecs' weights come from: "main" = the default branch on the first run, whose
# commit tokenize_all.py records in meta.json so that decoding that dataset loads the same weights (set a
# commit hash here to pin it for everyone)
SPEECHTOKENIZER_REPO, SPEECHTOKENIZER_VARIANT, SPEECHTOKENIZER_REVISION = \
    "fnlp/SpeechTokenizer", "speechtokenizer_hubert_avg", "main"
MIMI_REPO, MIMI_REVISION = "kyutai/mimi", "main"


def encodec_init_untrained(model, emb, kmeans_iters=None):
    """Initialise the codebooks of an untrained EnCodec (pretrained=False) the way EnCodec itself does:
    its EuclideanCodebook starts empty (`inited` = 0) and runs k-means on the first batch the quantizer's
    forward sees. emb: quantizer inputs [B, 128, T] with B * T > 1024 frames (e.g. model.encoder(wave)).
    kmeans_iters (EnCodec's default 50) only sets the cost of that one k-means."""
    if emb.shape[0] * emb.shape[-1] <= 1024:
        raise ValueError(f"need more than 1024 frames to initialise 1024-entry codebooks, got "
                         f"{emb.shape[0] * emb.shape[-1]}")
    for layer in model.quantizer.vq.layers:
        if kmeans_iters is not None:
            layer._codebook.kmeans_iters = kmeans_iters
    model.quantizer(emb, model.frame_rate, model.bandwidth)  # forward inits the layers it uses (n_q = 2)
    return model


# ---------------------------------------------------------------------------------------------------
# images, offline: one k-means code per 16x16 patch

def images_to_unit(images, modality, device):
    """Raw images -> float [B, C, 224, 224] in the space the patch codebook works in, plus for depth the
    per-image (mean, std) of log depth. rgb: [0, 1]; normals: [-1, 1] (n = 2 c / 255 - 1); depth: log(1 + d)
    standardised per image (depth scales differ wildly between scenes; the shape is what matters)."""
    x = _as_tensor(images, device)
    if modality == "tok_depth":
        if x.dim() != 3:
            raise ValueError(f"depth maps must be [B, 224, 224], got {tuple(x.shape)}")
        x = torch.log1p(x)[:, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return (x - mean) / std, (mean.flatten(), std.flatten())
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"{modality} images must be [B, 224, 224, 3], got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2) / 255.0
    return (x * 2 - 1 if modality == "tok_normal" else x), None


def unit_to_images(x, modality, depth_ref=(0.0, 1.0)):
    """Inverse of images_to_unit. Depth (log, standardised) is scaled back with depth_ref, the training set's
    median per-image mean and std: exact for depth_norm='global'; per-image codes lost their own, so those
    maps are shown at the typical scale."""
    if modality == "tok_depth":
        d = torch.expm1(x[:, 0] * depth_ref[1] + depth_ref[0])
        return d.round().clamp(0, 65535).cpu().numpy().astype(np.uint16)
    if modality == "tok_normal":
        x = (x + 1) / 2
    return (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).cpu().numpy().astype(np.uint8)


def patchify(x, down=2):
    """[B, C, 224, 224] -> [B, 196, C * (16/down)^2]: each 16x16 patch area-averaged to 8x8 (down=2).
    Why 8x8: one code per patch can only hold the patch's coarse layout anyway, and clustering 4x fewer
    dimensions makes fitting 1,024 codes on tens of thousands of patches take seconds on 2 cores."""
    if down > 1:
        x = F.avg_pool2d(x, down)
    p = PATCH // down
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(v, channels, down=2):
    """[B, 196, C * p * p] -> [B, C, 224, 224], each 8x8 code upsampled by pixel repetition (nearest), so
    re-encoding a decoded image gives back the same codes (the 2x2 average of repeated pixels is exact)."""
    p = PATCH // down
    B = v.shape[0]
    x = v.reshape(B, M.GRID, M.GRID, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(B, channels, M.GRID * p, M.GRID * p)
    return F.interpolate(x, scale_factor=down, mode="nearest") if down > 1 else x


class PatchKMeansTokenizer:
    """One id per 16x16 patch, as a product of two small k-means codebooks: the patch's mean (per channel)
    and its mean-removed shape (8x8 per channel): id = mean_code * shape_codes + shape_code.
    Why a product: with one codebook an object's colour and its layout compete for the same entries;
    split, 256 means x 64 shapes = 16,384 combinations fill rgb's id range exactly. On ToyZoo val frames
    (40k training patches, 20 iterations) it gave 26.9 dB PSNR against 26.2 dB for a single 1,024-entry
    codebook and 26.1 dB for 64 x 256, and fits in about the same time."""
    kind = "patch_kmeans"
    DEPTH_NORMS = ("image", "global")   # depth: per image, or by depth_ref for all (tokenize_all.py's default)

    def __init__(self, modality, means, shapes, settings=None, device="cpu"):
        self.modality = M.SHORT_NAMES.get(modality, modality)
        self.device = pick_device(device)
        self.means = means.to(self.device, torch.float32)      # [Km, C]
        self.shapes = shapes.to(self.device, torch.float32)    # [Ks, C * 8 * 8], zero mean per channel
        self.settings = dict(settings or {})
        self.down = int(self.settings.get("down", 2))
        self.channels = 1 if self.modality == "tok_depth" else 3
        self.depth_ref = tuple(self.settings.get("depth_ref", (0.0, 1.0)))
        self.depth_norm = self.settings.get("depth_norm", "image")   # a codebook that records none predates "global"
        if self.depth_norm not in self.DEPTH_NORMS:
            raise ValueError(f"{self.modality}: depth_norm={self.depth_norm!r}: expected one of {self.DEPTH_NORMS}")
        self.size = self.means.shape[0] * self.shapes.shape[0]
        if self.size > M.BY_NAME[self.modality].vocab:
            raise ValueError(f"{self.modality}: {self.means.shape[0]} x {self.shapes.shape[0]} codes > vocab "
                             f"{M.BY_NAME[self.modality].vocab}")

    @classmethod
    def helper(cls, modality, device="cpu"):
        """An unfitted instance, for its patch_vectors() when collecting training patches."""
        return cls(modality, torch.zeros(1, 1), torch.zeros(1, 1), {}, device)

    @staticmethod
    def split(v, channels):
        """patch vectors [N, C*pp] -> (per-channel means [N, C], mean-removed shapes [N, C*pp])."""
        v = v.reshape(v.shape[0], channels, -1)
        mu = v.mean(-1)
        return mu, (v - mu[..., None]).reshape(v.shape[0], -1)

    @classmethod
    def fit(cls, modality, patches, mean_codes, shape_codes, iters=20, seed=1337, device="cpu", down=2,
            depth_ref=(0.0, 1.0), verbose=False, **settings):
        """patches [N, D] from patch_vectors() of training images."""
        modality = M.SHORT_NAMES.get(modality, modality)
        if mean_codes * shape_codes > M.BY_NAME[modality].vocab:
            raise ValueError(f"{modality}: {mean_codes} x {shape_codes} codes > its id range "
                             f"{M.BY_NAME[modality].vocab}")
        device = pick_device(device)
        x = _as_tensor(patches, device)
        channels = 1 if modality == "tok_depth" else 3
        mu, shape = cls.split(x, channels)
        means, _ = kmeans(mu, mean_codes, iters, seed, verbose=verbose)
        shapes, _ = kmeans(shape, shape_codes, iters, seed + 1, verbose=verbose)
        settings.update(mean_codes=mean_codes, shape_codes=shape_codes, codes=mean_codes * shape_codes,
                        iters=iters, seed=seed, down=down, depth_ref=list(map(float, depth_ref)),
                        fit_vectors=int(x.shape[0]), variance=x.var(0).sum().item())
        tok = cls(modality, means.cpu(), shapes.cpu(), settings, device)
        tok.settings["mse"] = ((tok.vectors_from_ids(tok.ids_from_vectors(x)) - x) ** 2).sum(1).mean().item()
        return tok

    def patch_vectors(self, images):
        """Raw images -> patch vectors [B, 196, D] (and depth's per-image mean/std)."""
        x, stats = images_to_unit(images, self.modality, self.device)
        if stats is not None and self.depth_norm == "global":   # log depth on one scale, which decode inverts
            x = self.global_scale(x, *(s[:, None, None, None] for s in stats), self.depth_ref)
        return patchify(x, self.down), stats

    @staticmethod
    def global_scale(x, mean, std, ref):
        """Log depth standardised by its image's (mean, std) -> standardised by ref, one (mean, std) for all."""
        return (x * std + mean - ref[0]) / ref[1]

    def ids_from_vectors(self, v):
        """[N, D] -> ids [N]: the nearest mean, then the nearest shape to the mean-removed patch."""
        mu, shape = self.split(v, self.channels)
        return nearest(mu, self.means) * self.shapes.shape[0] + nearest(shape, self.shapes)

    def vectors_from_ids(self, ids):
        """ids [...] -> patch vectors [..., D] = mean code + shape code."""
        a, b = ids // self.shapes.shape[0], ids % self.shapes.shape[0]
        v = self.means[a][..., None] + self.shapes[b].reshape(*b.shape, self.channels, -1)
        return v.reshape(*b.shape, -1)

    @property
    def factors(self):
        """(mean codes, shape codes): id = mean code * shape codes + shape code."""
        return self.means.shape[0], self.shapes.shape[0]

    def id_features(self):
        """[codes, D]: the patch vector each id decodes to (model.py's code features): ids that share a
        colour or a layout share most of it, which an embedding row per id cannot know."""
        return self.vectors_from_ids(torch.arange(self.size, device=self.device)).cpu()

    def encode(self, images):
        v, _ = self.patch_vectors(images)
        B, N, D = v.shape
        return self.ids_from_vectors(v.reshape(B * N, D)).view(B, N)

    @torch.no_grad()
    def decode(self, ids):
        ids = _as_tensor(ids, self.device, torch.long).clamp(0, self.size - 1)
        return self.decode_vectors(self.vectors_from_ids(ids))

    @torch.no_grad()
    def decode_vectors(self, v):
        """Patch vectors [B, 196, D] -> images, as decode: also a vector between codes (an expected patch)."""
        x = unpatchify(_as_tensor(v, self.device), self.channels, self.down)
        return unit_to_images(x, self.modality, self.depth_ref)

    def save(self, path):
        _atomic_torch_save({"kind": self.kind, "modality": self.modality, "means": self.means.cpu(),
                            "shapes": self.shapes.cpu(), "settings": self.settings}, path)

    @classmethod
    def load(cls, path, device="cpu", trust=False):
        d = files.load_torch_file(path, trust=trust)
        return cls(d["modality"], d["means"], d["shapes"], d["settings"], device)


# ---------------------------------------------------------------------------------------------------
# images, real: the 4M DiVAE tokenizers (optional extra)

DIVAE_IDS = {"tok_rgb": "EPFL-VILAB/4M_tokenizers_rgb_16k_224-448",
             "tok_depth": "EPFL-VILAB/4M_tokenizers_depth_8k_224-448",
             "tok_normal": "EPFL-VILAB/4M_tokenizers_normal_8k_224-448"}
# the Hugging Face revision each tokenizer loads: None = the repo's default branch as of the first download,
# whose commit tokenize_all.py records in meta.json, so that decoding that dataset later loads the same weights.
# Set a commit hash here to pin it for everyone (none could be looked up where this was written)
DIVAE_REVISIONS = {m: None for m in DIVAE_IDS}


def load_divae_model(modality, revision=None):
    """4M's released DiVAE for one image modality at a pinned revision (the one given, else DIVAE_REVISIONS,
    else the default branch) through fourm's loader (safetensors weights, no pickle) -> (model, commit)."""
    try:
        from fourm.vq.vqvae import DiVAE
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError("the DiVAE image tokenizers need apple/ml-4m's `fourm` package: "
                          "pip install -r requirements-extra.txt (or use "
                          "--image_tokenizer=patch_kmeans, which needs no download)") from e
    want = revision or DIVAE_REVISIONS[modality]
    path = snapshot_download(DIVAE_IDS[modality], revision=want)     # .../snapshots/<commit>
    commit = os.path.basename(os.path.normpath(path))
    if want and len(want) == 40 and commit != want:
        raise RuntimeError(f"{DIVAE_IDS[modality]}: asked for revision {want}, got {commit}")
    return DiVAE.from_pretrained(path), commit


class DivaeTokenizer:
    """4M's DiVAE: ViT encoder -> 14x14 ids at 224 px; a diffusion decoder back to pixels.
    Input normalisation follows fourm/data/modality_transforms.py: rgb ImageNet mean/std, depth
    [0, 1] (d / 65535) then truncated standardisation per image (10 % trimmed each side), normals
    (c / 255 - 0.5) / 0.5 in [-1, 1]."""
    kind = "divae"

    def __init__(self, modality, device="cpu", timesteps=50, model=None, revision=None):
        self.modality = M.SHORT_NAMES.get(modality, modality)
        self.device = pick_device(device)
        self.timesteps = timesteps
        if model is None:
            model, revision = load_divae_model(self.modality, revision)
        self.settings = {"hub_id": DIVAE_IDS[self.modality], "timesteps": timesteps, "revision": revision}
        self.model = model.to(self.device).eval()

    def _prepare(self, images):
        x = _as_tensor(images, self.device)
        if self.modality == "tok_depth":
            x = (x / 65535.0)[:, None]
            flat = x.flatten(1).sort(dim=1).values
            n = flat.shape[1]
            trunc = flat[:, int(0.1 * n):int(0.9 * n)]
            return (x - trunc.mean(1)[:, None, None, None]) / (trunc.var(1)[:, None, None, None] + 1e-6).sqrt()
        x = x.permute(0, 3, 1, 2) / 255.0
        if self.modality == "tok_rgb" and getattr(self.model, "undo_std", False):
            # this tokenizer takes ImageNet-standardised input and maps it back to [-1, 1] itself
            mean = torch.tensor(IMAGENET_MEAN, device=self.device)[None, :, None, None]
            std = torch.tensor(IMAGENET_STD, device=self.device)[None, :, None, None]
            return (x - mean) / std
        return (x - 0.5) / 0.5          # rgb and normals in [-1, 1], as ml-4m's tokenizer configs train them

    @torch.no_grad()
    def encode(self, images):
        ids = self.model.tokenize(self._prepare(images))        # [B, 14, 14]
        return ids.reshape(ids.shape[0], -1).long()

    @torch.no_grad()
    def decode(self, ids):
        ids = _as_tensor(ids, self.device, torch.long).reshape(-1, M.GRID, M.GRID)
        x = self.model.decode_tokens(ids, timesteps=self.timesteps, image_size=IMAGE_SIZE, verbose=False)
        if self.modality == "tok_depth":
            # standardised depth: shown with a fixed spread (the per-image scale is not in the tokens)
            d = (x[:, 0] * 0.15 + 0.5).clamp(0, 1) * 65535
            return d.round().cpu().numpy().astype(np.uint16)
        x = (x + 1) / 2                 # the diffusion decoder outputs [-1, 1] (ml-4m's decode_tok_rgb / _normal)
        return (x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().cpu().numpy().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# caption

class CaptionTokenizer:
    kind = "gpt2_bpe"

    def __init__(self, device="cpu"):
        self.settings = {"encoding": "r50k_base", "length": M.CAPTION_LEN, "pad_id": M.CAPTION_PAD}

    def encode(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.from_numpy(np.stack([S.encode_caption(t) for t in texts]))

    def decode(self, ids):
        ids = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        return [S.decode_caption(row) for row in ids.reshape(-1, ids.shape[-1])]


# ---------------------------------------------------------------------------------------------------

def _atomic_torch_save(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_write(path) as tmp:
        torch.save(obj, tmp)


# every tokenizer kind that meta.json may name, by its "tokenizer" field
TOKENIZER_KINDS = {c.kind: c for c in (MelRVQTokenizer, EncodecTokenizer, SpeechTokenizerTokenizer, MimiTokenizer,
                                       PatchKMeansTokenizer, DivaeTokenizer, CaptionTokenizer)}


def load_tokenizer(tok_path, meta, modality_name, device="cpu", trust=False):
    """The tokenizer that produced `modality_name` in this tokenized dataset (from its meta.json). A fitted
    codebook loads with weights_only=True; trust=True (--trust_checkpoint=True) also takes an older pickled one."""
    name = M.SHORT_NAMES.get(modality_name, modality_name)
    if name not in meta["modalities"]:
        raise ValueError(f"{tok_path}/meta.json has no modality {name!r}")
    info = meta["modalities"][name]
    kind = info["tokenizer"]
    codebook = os.path.join(tok_path, info["codebook"]) if info.get("codebook") else None
    if codebook is not None and not os.path.exists(codebook):
        raise FileNotFoundError(f"{codebook}: codebook of {name} missing (rerun tokenize_all.py)")
    if kind == "mel_rvq":
        return MelRVQTokenizer.load(codebook, device, trust)
    if kind == "patch_kmeans":
        return PatchKMeansTokenizer.load(codebook, device, trust)
    if kind == "encodec":
        return EncodecTokenizer(device)
    if kind in ("speechtokenizer", "mimi"):    # at the commit the dataset was tokenized with
        tok = TOKENIZER_KINDS[kind](device, revision=info.get("revision"))
        if info.get("layout") and M.AudioLayout(**info["layout"]) != tok.layout:
            raise ValueError(f"{tok_path}/meta.json: {name} was tokenized with layout {info['layout']}, the "
                             f"{kind} model loaded now has {tok.layout}")
        return tok
    if kind == "divae":   # the weights the dataset was tokenized with (meta.json records their commit)
        return DivaeTokenizer(name, device, revision=info.get("revision"))
    if kind == "gpt2_bpe":
        return CaptionTokenizer(device)
    raise ValueError(f"{tok_path}/meta.json: unknown tokenizer {kind!r} for {name}")


def code_features(tok_path, meta, device="cpu", names=None, trust=False):
    """{modality name: [ids, F] float tensor or None}: what each id of each modality (or of those in names)
    stands for, from the tokenizers recorded in meta.json (train.py --code_features). None where the tokenizer
    offers no vector per id: the BPE caption, and the DiVAE image tokenizers (their quantizer is not read here
    yet)."""
    out = {}
    for name, info in meta["modalities"].items():
        if names is not None and name not in names:
            continue
        known = TOKENIZER_KINDS.get(info["tokenizer"])
        if known is not None and not hasattr(known, "id_features"):
            out[name] = None            # no vectors: do not load it (DiVAE would download its weights for nothing)
            continue
        out[name] = load_tokenizer(tok_path, meta, name, device, trust).id_features()   # an unknown kind raises there
    return out

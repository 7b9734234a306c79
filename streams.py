"""A modality's content <-> its ids, for the scripts that tokenize and decode (training reads ids only)."""
import os

import numpy as np
import torch

import modalities as M


# audio stream layout: seq[K*t + k] = c[k, t] + k * V (M.AUDIO_LAYOUT)

def interleave_audio(codes, layout=None):
    """codes [..., K, T] in [0, V) -> stream [..., K * T] in [0, K * V) (layout: M.AUDIO_LAYOUT if None)."""
    K, V, T = _kvt(layout)
    codes = np.asarray(codes) if not torch.is_tensor(codes) else codes
    if tuple(codes.shape[-2:]) != (K, T):
        raise ValueError(f"audio codes {tuple(codes.shape)}: expected [..., {K}, {T}] (audio layout K={K}, T={T})")
    shifted = codes + _codebook_offsets(codes, K, V)
    return shifted.swapaxes(-1, -2).reshape(*codes.shape[:-2], T * K)


def deinterleave_audio(seq, layout=None):
    """stream [..., K * T] -> codes [..., K, T], the exact inverse of interleave_audio."""
    K, V, T = _kvt(layout)
    seq = np.asarray(seq) if not torch.is_tensor(seq) else seq
    frames = seq.reshape(*seq.shape[:-1], T, K).swapaxes(-1, -2)
    return frames - _codebook_offsets(frames, K, V)


def _kvt(layout):
    layout = layout or M.AUDIO_LAYOUT
    return layout.codebooks, layout.codebook_size, layout.frames


def _codebook_offsets(like, K, V):
    offset = (np.arange(K) * V)[:, None]
    return torch.as_tensor(offset, device=like.device, dtype=like.dtype) if torch.is_tensor(like) else offset


def audio_sample_of(index):
    """Stream index -> the first AUDIO_SR sample of the frame that holds it (where a frame-aligned suffix
    starts in the decoded window)."""
    return int(round((index // M.AUDIO_CODEBOOKS) * M.AUDIO_SR / M.AUDIO_LAYOUT.frame_rate))


# captions: GPT-2 BPE through tiktoken, offline when the ranks file is at hand

_R50K_HASH = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_R50K_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_encoding = None


def gpt2_encoding():
    """tiktoken's r50k_base (= GPT-2). Uses $NANO4M_BPE_FILE or ../shared/data/r50k_base.tiktoken when
    present (no network), else tiktoken's normal download-and-cache path."""
    global _encoding
    if _encoding is None:
        import tiktoken
        here = os.path.dirname(os.path.abspath(__file__))
        candidates = [os.environ.get("NANO4M_BPE_FILE", ""),
                      os.path.join(here, "..", "shared", "data", "r50k_base.tiktoken")]
        path = next((p for p in candidates if p and os.path.exists(p)), None)
        if path is None:
            _encoding = tiktoken.get_encoding("r50k_base")
        else:
            from tiktoken.load import load_tiktoken_bpe
            ranks = load_tiktoken_bpe(path, expected_hash=_R50K_HASH)
            _encoding = tiktoken.Encoding(name="r50k_base", pat_str=_R50K_PAT, mergeable_ranks=ranks,
                                          special_tokens={"<|endoftext|>": M.CAPTION_PAD})
    return _encoding


def caption_text(class_name):
    return f"a photo of a {class_name}"


def encode_caption(text):
    """Text -> M.CAPTION_LEN ids: BPE ids, one end-of-text, then padding (also end-of-text)."""
    ids = gpt2_encoding().encode_ordinary(text)
    if len(ids) + 1 > M.CAPTION_LEN:
        raise ValueError(f"caption {text!r} is {len(ids)} BPE ids; at most {M.CAPTION_LEN - 1} fit")
    return np.array(ids + [M.CAPTION_PAD] * (M.CAPTION_LEN - len(ids)), dtype=np.int64)


def decode_caption(ids):
    ids = [int(i) for i in ids]
    if M.CAPTION_PAD in ids:
        ids = ids[:ids.index(M.CAPTION_PAD)]
    return gpt2_encoding().decode([i for i in ids if i < M.CAPTION_PAD])

"""
Where the decoder's cross-attention looks: three switches of model.py beside the report's model, for issues #31
and #33 (docs/experiments.md). A depth cell drawn from the picture needs the rgb cells at its own place, and a
masked audio frame the given frames beside it; trained from the usual start, this model's queries look
everywhere at once.

- pos_emb='sincos_layout': fixed positions with near places alike (sincos_grid, local_sincos), one grid of places
  shared by rgb, depth and normal, so a query's position part matches the keys at its own place.
- mimetic_cross=s: W_q and W_k of every cross-attention start at s * I plus their init ("mimetic" init, Trockman &
  Kolter 2023), so a query first attends to the keys most like itself (with the positions above: its place).
- cross_local=s: the first half of the heads pay s per place between query and key, always: local heads that
  training cannot make global (the mimetic start is trained away on audio within a few hundred steps).
"""
import math

import torch

import modalities as M

FAR = 8   # cross_local: places beyond this, and keys of another layout, all count as this far


def local_sincos(n, dim):
    """[n, dim] fixed 1-D sin-cos positions of n places whose frequencies span those places (pi per place down
    to pi per n places, not 1-D text's 10,000 positions), at unit norm per place (a content row's scale)."""
    k = dim // 2
    freq = math.pi * (1.0 / n) ** (torch.arange(k, dtype=torch.float64) / max(k - 1, 1))
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
    table = torch.nn.functional.pad(torch.cat([angle.sin(), angle.cos()], 1), (0, dim - 2 * k))
    return (table / table.norm(dim=1, keepdim=True)).float()


def sincos_grid(n, dim):
    """[n * n, dim] fixed 2-D positions of an n x n grid (as 4M's for its image modalities): the row's
    local_sincos in one half, the column's in the other, at unit norm. Neighbouring cells are 0.68 alike
    (cosine), diagonal ones 0.37, far ones ~0; with 10,000 as the base, neighbours would be 0.98 alike."""
    row, col = local_sincos(n, dim // 2), local_sincos(n, dim - dim // 2)
    table = torch.cat([row[:, None].expand(n, n, -1), col[None].expand(n, n, -1)], -1).reshape(n * n, dim)
    return table / table.norm(dim=1, keepdim=True)


def layout_places():
    """[TOTAL_POSITIONS, 3] (kind, row or frame, col) of every global position: kind 1 on the image grids (one
    shared grid of places), 2 on the audio frames, 0 on the caption."""
    parts = []
    for m in M.MODALITIES:
        i = torch.arange(m.length)
        kind = {"grid": 1, "audio": 2}.get(m.layout, 0)
        a, b = (i // M.GRID, i % M.GRID) if kind == 1 else (i // M.AUDIO_CODEBOOKS, 0 * i)
        parts.append(torch.stack([torch.full_like(i, kind), a, b], 1))
    return torch.cat(parts)


def place_distance(places, enc_pos, dec_pos):
    """[B, No, Ni] places between every query (dec_pos [B, No]) and key (enc_pos [B, Ni]), by layout_places():
    Chebyshev cells on the grids, frames on the audio, FAR for anything further or of another layout."""
    q, k = places[dec_pos][:, :, None], places[enc_pos][:, None]                    # [B, No, 1, 3], [B, 1, Ni, 3]
    same = (q[..., 0] == k[..., 0]) & (q[..., 0] > 0)
    return torch.where(same, (q[..., 1:] - k[..., 1:]).abs().amax(-1).clamp(max=FAR), FAR)


def setup(model):
    """At construction, after the usual init: the mimetic start, and cross_local's table of places."""
    D, s = model.config.n_embd, model.config.mimetic_cross
    if s:
        with torch.no_grad():
            for block in model.decoder:
                block.cross_attn.q.weight.add_(torch.eye(D) * s)
                block.cross_attn.kv.weight[:D].add_(torch.eye(D) * s)   # the keys' half of kv
    if model.config.cross_local:
        model.register_buffer("place", layout_places(), persistent=False)


def cross_local_mask(model, mask, enc_pos, dec_pos):
    """The key mask bool [B, 1, 1, Ni] as an additive float mask [B, n_head, No, Ni] in which the first half of
    the heads (at least one) also pay cross_local per place between query and key (place_distance). The other
    heads are left as they were."""
    dist = place_distance(model.place, enc_pos, dec_pos)
    n_local = max(1, model.config.n_head // 2)
    heads = torch.arange(model.config.n_head, device=dist.device)[:, None, None] < n_local    # [n_head, 1, 1]
    bias = torch.where(heads, -model.config.cross_local * dist[:, None].float(), 0.0)
    return bias.masked_fill(~mask, float("-inf"))

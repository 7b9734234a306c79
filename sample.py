"""
Any-to-any generation with a trained nano4M: MaskGIT (or 4M's ROAR) decoding of one target modality from
any set of conditioning modalities, decoded to wav / png / text, with an index.html gallery beside the
ground truth.

    python sample.py --mode=class_only                       # audio from the caption alone (the hardest case)
    python sample.py --mode=continuation                     # first 80% of the audio + rgb + caption given
    python sample.py --cond=rgb,caption --target=audio       # the general form
    python sample.py --cond=audio --target=rgb
    python sample.py --cond=rgb --target=depth --per_class=2 --num_samples=1
    python sample.py --cond=audio --target=caption

Generation itself is one importable function, `generate(model, tokens, known, target, ...)`, batched and
device-agnostic; evaluate.py uses it for its generation probes.

How a step works (MaskGIT, Chang et al. 2022; ROAR from 4M, Mizrahi et al. 2023): the encoder sees every
given token plus every target token decoded so far, the decoder queries target positions still masked,
one token is sampled per query from the (temperature / top-k / top-p filtered) logits over the target
modality's own ids, and some of them are committed: MaskGIT keeps the most confident ones so that the
cosine schedule's count stays masked, ROAR keeps a random subset of that size (it only queries those).
A committed token is never re-masked, so every position is decoded exactly once.
"""
import math
import os
import sys
import time

import numpy as np
import torch

from modalities import (MODALITIES, MODALITY_NAMES, BY_NAME, SHORT_NAMES, POS_OFFSETS, CAPTION_PAD,
                        AUDIO_FRAMES, AUDIO_CODEBOOKS, AUDIO_WINDOW, AUDIO_SR, modality_index, caption_valid)


# ---------------------------------------------------------------------------------------------------
# the generation core

def full_name(name):
    """'audio' -> 'tok_audio'; refuses unknown names with the valid list."""
    return MODALITY_NAMES[modality_index(name)]


def masked_count(n_unknown, step, steps, schedule="cosine"):
    """How many of n_unknown target positions are still masked after step `step` (0-based) of `steps`.
    cosine (MaskGIT): ceil(n * cos(pi/2 * (step+1)/steps)); linear: ceil(n * (1 - (step+1)/steps)).
    Works elementwise on a LongTensor of per-sample counts; the last step always leaves 0 (cos(pi/2) is
    6e-17 in floating point, which ceil would round up to 1)."""
    r = (step + 1) / steps
    frac = math.cos(math.pi / 2 * r) if schedule == "cosine" else 1.0 - r
    if step + 1 >= steps:
        frac = 0.0
    if torch.is_tensor(n_unknown):
        return torch.ceil(n_unknown.double() * frac).long()
    return int(math.ceil(n_unknown * frac))


def pack(mask, *columns):
    """Gather the True entries of mask [B, L] to the front of each row: returns (valid [B, N], order [B, N],
    gathered columns), N = the largest row count (at least 1). Padding slots hold 0 in every column."""
    n = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.gather(mask, 1, order)
    return valid, order, [torch.gather(c, 1, order) * valid for c in columns]


def filter_logits(logits, top_k=0, top_p=1.0):
    """Standard top-k then nucleus (top-p) filtering: excluded ids get -inf. logits [n, V] (float32)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop an id once the mass before it already reaches top_p (the most likely id always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _rand(shape, generator, device):
    """Uniform [0, 1) numbers drawn from `generator` on its own device, then moved: one CPU generator
    reproduces the same samples on any device."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def _gumbel(shape, generator, device):
    u = _rand(shape, generator, device).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def generate(model, tokens, known, target, steps=16, schedule="maskgit", temperature=1.0,
             temperature_end=None, top_k=0, top_p=1.0, guidance_scale=1.0, remask_noise=0.0,
             count_schedule="cosine", generator=None):
    """Decode the unknown positions of modality `target` given the known tokens of every modality.

    tokens: {modality: LongTensor [B, L_m]}, short or full names; only the modalities used need be present
        (the target may be absent: it is then fully unknown).
    known:  {modality: BoolTensor [B, L_m]}, True = given as conditioning. A modality in `tokens` without an
        entry is fully known if it is not the target and fully unknown if it is. For the target, the known
        positions (e.g. the first 80% for continuation) keep their values in the output. Caption padding
        (after the first end-of-text) is never fed, whatever `known` says.
    schedule: "maskgit" (confidence-ranked commits) or "roar" (random order, accept all of a step).
    count_schedule: "cosine" or "linear": how many positions stay masked after each step.
    temperature, temperature_end: sampling temperature, annealed linearly to temperature_end over the steps
        when given. temperature <= 0 means greedy (argmax).
    top_k (0 = off), top_p (1.0 = off): logit filtering before sampling.
    guidance_scale: classifier-free guidance, logits = uncond + scale * (cond - uncond). The unconditional
        pass keeps only the target modality's own known / decoded tokens as input; where that leaves a sample
        with no input at all it gets one "null" token: an empty caption (the end-of-text id) at caption
        position 0 (at the last caption position when the caption is the target, so it never sits on a
        queried position). At 1.0 the unconditional pass is skipped: the result is the conditional one.
    remask_noise: MaskGIT's annealed randomness on the confidences: Gumbel noise scaled by
        remask_noise * (1 - progress) is added to the log-probability of each sampled token before ranking.
    generator: torch.Generator for every random draw (reproducible; may live on the CPU for a GPU model).

    Returns LongTensor [B, L_target] of the target modality's ids (in [0, vocab_target)).
    """
    if schedule not in ("maskgit", "roar"):
        raise ValueError(f"schedule must be 'maskgit' or 'roar', got {schedule!r}")
    if count_schedule not in ("cosine", "linear"):
        raise ValueError(f"count_schedule must be 'cosine' or 'linear', got {count_schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = full_name(target)
    t_idx = modality_index(target)
    t_mod = BY_NAME[target]
    device = next(model.parameters()).device
    tokens = {full_name(k): v.to(device) for k, v in tokens.items()}
    known = {full_name(k): v.to(device) for k, v in known.items()}
    if not tokens:
        raise ValueError("generate needs at least one modality in `tokens` (to know the batch size)")
    B = next(iter(tokens.values())).size(0)

    # the flat layout: every modality present, in the table's order, the target included
    names = [m.name for m in MODALITIES if m.name in tokens or m.name == target]
    ids_parts, pos_parts, given_parts = [], [], []
    for name in names:
        L = BY_NAME[name].length
        ids = tokens.get(name, torch.zeros(B, L, dtype=torch.long, device=device)).long()
        if ids.shape != (B, L):
            raise ValueError(f"tokens[{name!r}] has shape {tuple(ids.shape)}, expected ({B}, {L})")
        if name in known:
            g = known[name].bool()
            if g.shape != (B, L):
                raise ValueError(f"known[{name!r}] has shape {tuple(g.shape)}, expected ({B}, {L})")
        else:
            g = torch.full((B, L), name != target, dtype=torch.bool, device=device)
        if name == "caption":
            g = g & caption_valid(ids)
        bad = g & ((ids < 0) | (ids >= BY_NAME[name].vocab))
        if bad.any():
            raise ValueError(f"tokens[{name!r}] holds ids outside [0, {BY_NAME[name].vocab})")
        ids_parts.append(ids)
        pos_parts.append(POS_OFFSETS[modality_index(name)] + torch.arange(L, device=device).expand(B, L))
        given_parts.append(g)
    t_slot = names.index(target)
    t_start = sum(BY_NAME[n].length for n in names[:t_slot])
    t_len = t_mod.length
    flat_ids = torch.cat(ids_parts, dim=1)
    flat_pos = torch.cat(pos_parts, dim=1)
    flat_given = torch.cat(given_parts, dim=1)
    in_target = torch.zeros_like(flat_given)
    in_target[:, t_start:t_start + t_len] = True

    # the null input of the unconditional pass (see the docstring)
    null_index = 0 if target != "caption" else BY_NAME["caption"].length - 1
    null_id = torch.full((B, 1), CAPTION_PAD, dtype=torch.long, device=device)
    null_pos = torch.full((B, 1), POS_OFFSETS[modality_index("caption")] + null_index, dtype=torch.long,
                          device=device)

    out = flat_ids[:, t_start:t_start + t_len].clone()
    out = torch.where(flat_given[:, t_start:t_start + t_len], out, torch.zeros_like(out))
    masked = ~flat_given[:, t_start:t_start + t_len]           # target positions still to decode
    n_unknown = masked.sum(dim=1)
    t_pos = flat_pos[:, t_start:t_start + t_len]

    def run(ids_now, enc_mask, query, add_null):
        """One pass: encoder on the flat entries where enc_mask, decoder on the target positions where
        query. Returns logits [n, vocab_t] of the valid queries and where they sit (dv, d_order)."""
        ev, _, (e_ids, e_pos) = pack(enc_mask, ids_now, flat_pos)
        if add_null:
            empty = ~enc_mask.any(dim=1, keepdim=True)
            e_ids = torch.cat([e_ids, null_id], dim=1)
            e_pos = torch.cat([e_pos, null_pos], dim=1)
            ev = torch.cat([ev, empty], dim=1)
        dv, d_order, (d_pos,) = pack(query, t_pos)
        h = model.decode_hidden(e_ids, e_pos, ev, d_pos, dv)
        return model.modality_logits(h[dv], t_idx).float(), dv, d_order

    for step in range(steps):
        if not masked.any():
            break
        progress = step / max(steps - 1, 1)
        temp = temperature if temperature_end is None else temperature + (temperature_end - temperature) * progress
        keep_masked = masked_count(n_unknown, step, steps, count_schedule)     # [B]
        n_commit = masked.sum(dim=1) - keep_masked                              # [B], >= 0
        if schedule == "roar":
            # random order: pick this step's positions first, then query only them and accept all
            score = torch.where(masked, _rand((B, t_len), generator, device), torch.full_like(out, -1.0,
                                                                                          dtype=torch.float))
            rank = torch.argsort(torch.argsort(score, dim=1, descending=True), dim=1)
            query = masked & (rank < n_commit[:, None])
        else:
            query = masked
        if not query.any():
            continue
        flat_ids_now = flat_ids.clone()
        flat_ids_now[:, t_start:t_start + t_len] = out
        decoded = in_target.clone()
        decoded[:, t_start:t_start + t_len] = ~masked
        enc_mask = (flat_given & ~in_target) | decoded
        logits, dv, d_order = run(flat_ids_now, enc_mask, query, add_null=False)
        if guidance_scale != 1.0:
            uncond, _, _ = run(flat_ids_now, decoded, query, add_null=True)
            logits = uncond + guidance_scale * (logits - uncond)

        # sample one id per query (Gumbel-max on the filtered logits = a draw from their softmax)
        if temp <= 0:
            sampled = logits.argmax(dim=-1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, sampled[:, None])[:, 0]
        else:
            logits = filter_logits(logits / temp, top_k=top_k, top_p=top_p)
            sampled = (logits + _gumbel(logits.shape, generator, device)).argmax(dim=-1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, sampled[:, None])[:, 0]

        # scatter back to [B, t_len]
        rows = torch.arange(B, device=device)[:, None].expand_as(d_order)[dv]
        cols = d_order[dv]
        cand = torch.zeros_like(out)
        cand[rows, cols] = sampled
        if schedule == "roar":
            commit = query
        else:
            conf = torch.full((B, t_len), float("-inf"), device=device)
            if remask_noise > 0:
                logp = logp + remask_noise * (1.0 - progress) * _gumbel(logp.shape, generator, device)
            conf[rows, cols] = logp
            # the n_commit most confident masked positions of each row (stable ties: lower index first)
            rank = torch.argsort(torch.argsort(-conf, dim=1, stable=True), dim=1)
            commit = masked & (rank < n_commit[:, None])
        out = torch.where(commit, cand, out)
        masked = masked & ~commit
    assert not masked.any(), "schedule left positions undecoded"
    return out


def continuation_prefix(frac=0.8):
    """Audio tokens given in continuation mode: the first `frac` of the 256 frames, rounded to whole frames
    (0.8 -> 205 frames = 410 tokens), so a frame's two codebook tokens are never split."""
    return int(round(frac * AUDIO_FRAMES)) * AUDIO_CODEBOOKS

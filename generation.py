"""
MaskGIT (or 4M's ROAR) decoding of one target modality from any set of given modalities: the library that
sample.py (the gallery) and evaluate.py (the generation probes) both call. Batched and device-agnostic.

How a step works (MaskGIT, Chang et al. 2022; ROAR from 4M, Mizrahi et al. 2023): the encoder sees every
given token plus every target token decoded so far, the decoder queries target positions still masked,
one token is sampled per query from the (temperature / top-k / top-p filtered) logits over the target
modality's own ids, and some of them are committed: MaskGIT keeps the most confident ones so that the
cosine schedule's count stays masked, ROAR keeps a random subset of that size (it only queries those).
A committed token is never re-masked, so every position is decoded exactly once. Audio is committed in
whole frames (both codebook tokens of a frame at once, a frame's confidence the sum of its tokens'), the
unit training masks it in: a half-decoded frame is an input the model never saw.
"""
import functools
import math

import torch

import modalities as M   # the audio layout's names (M.BY_NAME, M.POS_OFFSETS, M.AUDIO_*) are read at call time
from modalities import MODALITY_NAMES, CAPTION_PAD, NULL_ID, modality_index, caption_valid, null_position


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


def codebook_mask(index, vocab):
    """Audio stream indices [n] -> bool [n, vocab]: the ids each slot may take. Slot K*t + k holds codebook
    k of frame t, whose ids are [k * V, (k + 1) * V) (streams.interleave_audio); any other id would be
    another codebook's code, which decoding can only clamp."""
    k = (index % M.AUDIO_CODEBOOKS)[:, None]
    ids = torch.arange(vocab, device=index.device)[None]
    return (ids >= k * M.AUDIO_CODEBOOK_SIZE) & (ids < (k + 1) * M.AUDIO_CODEBOOK_SIZE)


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
             count_schedule="cosine", generator=None, codebook_true=True, by_level=False):
    """Decode the unknown positions of modality `target` given the known tokens of every modality.

    tokens: {modality: LongTensor [B, L_m]}, short or full names; only the modalities used need be present
        (the target may be absent: it is then fully unknown).
    known:  {modality: BoolTensor [B, L_m]}, True = given as conditioning. A modality in `tokens` without an
        entry is fully known if it is not the target and fully unknown if it is. For the target, the known
        positions (e.g. the first 80% for continuation) keep their values in the output. A known caption is
        fed whole, its end-of-text padding included, as training feeds it (modalities.caption_valid).
        A caption target ends at its first end-of-text: once one is decoded (or given), every later position
        is set to end-of-text (the padding training always saw there) and is no longer decoded.
    schedule: "maskgit" (confidence-ranked commits); "roar" / "raster" (random / position order, accept all).
    count_schedule: "cosine" or "linear": how many positions stay masked after each step.
    temperature, temperature_end: sampling temperature, annealed linearly to temperature_end over the steps
        when given. temperature <= 0 means greedy (argmax).
    top_k (0 = off), top_p (1.0 = off): logit filtering before sampling.
    guidance_scale: classifier-free guidance, logits = uncond + scale * (cond - uncond). The unconditional
        pass keeps only the target modality's own known / decoded tokens as input; where that leaves a sample
        with no input at all it gets one "null" token: an empty caption (the end-of-text id) at caption
        position 0 (at the last caption position when the caption is the target, so it never sits on a
        queried position). That is exactly the input train.py's conditioning dropout (--cond_dropout,
        masking.condition_dropout) trains the model on. At 1.0 the unconditional pass is skipped: the
        result is the conditional one.
    codebook_true: an audio target samples each slot from its own codebook's ids only (codebook_mask); False
        draws every slot from all of the modality's ids (decoding then clamps a wrong-codebook id).
    by_level: audio one codebook level at a time, `steps` steps each (SoundStorm), the levels above out of the
        input; else a frame's K ids are drawn together, blind to each other. For a model trained --audio_levels.
    remask_noise: MaskGIT's annealed randomness on the confidences: Gumbel noise scaled by
        remask_noise * (1 - progress) is added to the log-probability of each sampled token before ranking.
    generator: torch.Generator for every random draw (reproducible; may live on the CPU for a GPU model).
    The model is used as it is: put it in eval mode first (model.load_checkpoint does), or dropout samples too.
    Returns LongTensor [B, L_target] of the target modality's ids (in [0, vocab_target)).
    """
    check_settings(schedule, count_schedule, steps)
    target = full_name(target)
    t_idx, t_mod = modality_index(target), M.BY_NAME[target]
    device = next(model.parameters()).device
    flat_ids, flat_pos, flat_given, t_span = target_layout(tokens, known, target, device)
    B = flat_ids.size(0)
    in_target = torch.zeros_like(flat_given)
    in_target[:, t_span] = True
    # the null input of the unconditional pass: the one conditioning dropout trains (modalities.null_position)
    null = torch.tensor([[NULL_ID], [null_position(target == "caption")]], device=device).expand(2, B)[:, :, None]
    run = functools.partial(target_logits, model, t_idx, flat_pos, flat_pos[:, t_span])

    masked = ~flat_given[:, t_span]                                             # target positions still to decode
    out = torch.where(masked, 0, flat_ids[:, t_span])
    span, K = torch.arange(t_span.start, t_span.stop, device=device), M.AUDIO_CODEBOOKS
    level = torch.arange(t_mod.length, device=device) % K                     # audio slot K*t + k holds level k
    if target == "tok_audio" and by_level:   # level 0 of every frame first, the levels above out of the input
        passes = [(level == q, level > q, 1) for q in range(K)]
    else:   # one pass; the commit unit is an audio frame (its K ids, as training masks it) or one token
        passes = [(level >= 0, level < 0, K if target == "tok_audio" else 1)]
    for slots, hidden, group in passes:
        units = lambda x: x.view(B, t_mod.length // group, group).any(-1)
        n_unknown = units(masked & slots).sum(dim=1)                           # units with something to decode
        for step in range(steps):
            todo = masked & slots
            if not todo.any():
                break
            progress = step / max(steps - 1, 1)
            temp = temperature if temperature_end is None else temperature + (temperature_end - temperature) * progress
            masked_u = units(todo)                                              # [B, units]
            n_commit = masked_u.sum(dim=1) - masked_count(n_unknown, step, steps, count_schedule)   # [B], >= 0
            # ROAR and raster pick this step's units first (audio in time order for raster) and query only them
            query = PICK[schedule](todo, masked_u, n_commit, group, generator) if schedule in PICK else todo
            if not query.any():
                continue
            flat_now = flat_ids.index_copy(1, span, out)
            decoded = in_target.index_copy(1, span, ~masked & ~hidden)   # decoded or given target entries
            logits, dv, d_order = run(flat_now, (flat_given & ~in_target) | decoded, query)
            if guidance_scale != 1.0:
                uncond, _, _ = run(flat_now, decoded, query, null)
                logits = uncond + guidance_scale * (logits - uncond)
            if target == "tok_audio" and codebook_true:   # each slot only from its own codebook's ids
                logits = logits.masked_fill(~codebook_mask(d_order[dv], t_mod.vocab), float("-inf"))
            sampled, logp = sample_ids(logits, temp, top_k, top_p, generator, device)
            rows, cols = torch.arange(B, device=device)[:, None].expand_as(d_order)[dv], d_order[dv]
            cand = torch.zeros_like(out).index_put((rows, cols), sampled)
            commit = query if schedule != "maskgit" else \
                confident_units(todo, logp, rows, cols, n_commit, group, remask_noise, 1.0 - progress, generator)
            out = torch.where(commit, cand, out)
            masked = masked & ~commit
            if target == "caption":
                out, masked = end_captions(out, masked)
    assert not masked.any(), "schedule left positions undecoded"
    return out


def check_settings(schedule, count_schedule, steps):
    for name, value, allowed in (("schedule", schedule, ("maskgit", *PICK)),
                                 ("count_schedule", count_schedule, ("cosine", "linear"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def target_layout(tokens, known, target, device):
    """The flat layout of one generation (see generate's tokens / known): every modality in `tokens` plus the
    target, in the table's order -> (ids, pos, given) [B, sum of L] and the slice the target fills."""
    if not tokens:
        raise ValueError("generate needs at least one modality in `tokens` (to know the batch size)")
    tokens = {full_name(k): v.to(device) for k, v in tokens.items()}
    known = {full_name(k): v.to(device) for k, v in known.items()}
    B = next(iter(tokens.values())).size(0)
    inputs = {}
    for m in M.MODALITIES:
        if m.name in tokens or m.name == target:
            ids = tokens.get(m.name, torch.zeros(B, m.length, dtype=torch.long, device=device))
            inputs[m.name] = (ids, known.get(m.name, torch.full(ids.shape, m.name != target, device=device)))
    names = list(inputs)
    t_start = sum(M.BY_NAME[n].length for n in names[:names.index(target)])
    return (*flat_inputs(inputs, device), slice(t_start, t_start + M.BY_NAME[target].length))


def target_logits(model, t_idx, flat_pos, t_pos, flat_ids, enc_mask, query, null=None):
    """One pass: the encoder on the flat entries where enc_mask (plus the null token (ids, pos) [B, 1] in rows
    left with no input, when given), the decoder on the target positions t_pos where query. Returns the
    logits [n, vocab_t] of the valid queries (float32) and where they sit (dv, d_order)."""
    ev, _, (e_ids, e_pos) = pack(enc_mask, flat_ids, flat_pos)
    if null is not None:
        empty = ~enc_mask.any(dim=1, keepdim=True)
        e_ids, e_pos, ev = (torch.cat(p, dim=1) for p in ((e_ids, null[0]), (e_pos, null[1]), (ev, empty)))
    dv, d_order, (d_pos,) = pack(query, t_pos)
    h = model.decode_hidden(e_ids, e_pos, ev, d_pos, dv)
    return model.modality_logits(h[dv], t_idx).float(), dv, d_order


def patch_codebook(tok):
    """Whether tok's ids decode to patches that can be averaged (id_features, decode_vectors): the offline
    patch codebooks, not DiVAE or the audio tokenizers."""
    return hasattr(tok, "id_features") and hasattr(tok, "decode_vectors")


def map_read_out(tok, target):
    """How 'auto' reads a depth or normal map, chosen on val (docs/experiments.md): depth as 'shape_mode' (its
    outlines stay sharp), normals as 'mean'; None where tok has no patch vectors (DiVAE: ids are drawn)."""
    if not patch_codebook(tok):
        return None
    return "shape_mode" if full_name(target) == "tok_depth" and hasattr(tok, "factors") else "mean"


def patch_read_out(asked, tok, target, setting="read_out"):
    """asked: 'auto', 'mean', 'shape_mode' or 'sample' -> (read_out, patch vectors per id or None, the product
    code's factors or None): 'auto' is map_read_out where the target is depth or normal from a patch codebook,
    else 'sample'. A read-out the tokenizer cannot give is refused, naming the script's `setting`."""
    fits = map_read_out(tok, target) if full_name(target) in ("tok_depth", "tok_normal") else None
    if asked in ("mean", "shape_mode") and (fits is None or (asked == "shape_mode" and not hasattr(tok, "factors"))):
        raise ValueError(f"--{setting}={asked} reads depth or normal from a patch codebook (shape_mode: a product "
                         f"code), not {target} ({type(tok).__name__})")
    read_out = asked if asked != "auto" else (fits or "sample")
    if read_out == "sample":
        return read_out, None, None
    return read_out, tok.id_features(), (tok.factors if read_out == "shape_mode" else None)


@torch.no_grad()
def expected_patches(model, tokens, target, features, device, factors=None):
    """The minimum-squared-error read-out of a target from a patch codebook (depth, normal): one pass, every
    target cell masked, the other modalities of tokens {name: ids [B, L]} given -> the expected patch of each
    cell under the decoder's distribution [B, L, D] (features [codes, D]: the patch each id decodes to) and the
    argmax ids [B, L]. For smooth fields many ids decode alike, so one id is a poor point estimate.
    factors (Km, Ks), for a product code (id = mean code * Ks + shape code, patch = mean + shape): the expected
    mean with the likeliest shape instead ('shape_mode'). Averaging shapes blurs an edge whose place is unsure."""
    target = full_name(target)
    ids, pos, given, t = target_layout(tokens, {}, target, device)
    t_pos = pos[:, t]
    logits, _, _ = target_logits(model, modality_index(target), pos, t_pos, ids, given, torch.ones_like(given[:, t]))
    p = torch.softmax(logits[:, :len(features)], -1)
    f = features.to(device, p.dtype)
    if factors is None:
        v = p @ f
    else:
        km, ks = factors
        p, f = p.view(-1, km, ks), f.view(km, ks, -1)
        shape = p.sum(1).argmax(-1)                      # each cell's likeliest shape code
        # sum_a p(a) patch(a, shape) = E[mean code] + that shape, as patch(a, b) = mean(a) + shape(b)
        v = p.sum(2) @ (f[:, 0] - f[0, 0]) + f[0, shape]
    return v.view(*t_pos.shape, -1), logits.argmax(-1).view(t_pos.shape)


def continuation_prefix(frac=0.8):
    """Audio tokens given in a continuation: the first `frac` of the T frames, rounded to whole frames
    (EnCodec: 0.8 -> 205 of 256 frames = 410 tokens), so a frame's K codebook tokens are never split."""
    return int(round(frac * M.AUDIO_FRAMES)) * M.AUDIO_CODEBOOKS


def flat_inputs(inputs, device):
    """{name: (ids Long [B, L], given Bool [B, L])} -> the flat layout (ids, pos, given) [B, sum of L], the
    modalities in the order given. A caption counts as given up to its padding (caption_valid), as training
    feeds it. Ids outside a modality's vocabulary are refused where given."""
    ids, pos, given = [], [], []
    B = next(iter(inputs.values()))[0].size(0)
    for name, (x, g) in inputs.items():
        L = M.BY_NAME[name].length
        x, g = x.to(device).long(), g.to(device).bool()
        for what, t in (("tokens", x), ("known", g)):
            if t.shape != (B, L):
                raise ValueError(f"{what}[{name!r}] has shape {tuple(t.shape)}, expected ({B}, {L})")
        if name == "caption":
            g = g & caption_valid(x)
        if (g & ((x < 0) | (x >= M.BY_NAME[name].vocab))).any():
            raise ValueError(f"tokens[{name!r}] holds ids outside [0, {M.BY_NAME[name].vocab})")
        ids.append(x)
        pos.append(M.POS_OFFSETS[modality_index(name)] + torch.arange(L, device=device).expand(B, L))
        given.append(g)
    return torch.cat(ids, 1), torch.cat(pos, 1), torch.cat(given, 1)


def pack_inputs(inputs, device):
    """{name: (ids, given)} -> the encoder's packed input (ids, pos, valid): the given entries only."""
    ids, pos, given = flat_inputs(inputs, device)
    valid, _, (e_ids, e_pos) = pack(given, ids, pos)
    return e_ids, e_pos, valid


def sample_ids(logits, temperature, top_k, top_p, generator, device):
    """One id per row of logits [n, V] and its log-probability: argmax when temperature <= 0, else a draw
    from the filtered softmax (Gumbel-max on the filtered logits)."""
    if temperature <= 0:
        sampled = logits.argmax(dim=-1)
    else:
        logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
        sampled = (logits + _gumbel(logits.shape, generator, device)).argmax(dim=-1)
    return sampled, torch.log_softmax(logits, dim=-1).gather(-1, sampled[:, None])[:, 0]


def random_units(masked, masked_u, n_commit, group, generator):
    """ROAR's pick: n_commit masked units of each row in a random order -> Bool [B, L_target]."""
    score = torch.where(masked_u, _rand(masked_u.shape, generator, masked.device), -1.0)
    rank = torch.argsort(torch.argsort(score, dim=1, descending=True), dim=1)
    return masked & (rank < n_commit[:, None]).repeat_interleave(group, dim=1)


def first_units(masked, masked_u, n_commit, group, generator=None):
    """The raster pick: the first n_commit masked units of each row in position order -> Bool [B, L_target]."""
    rank = masked_u.long().cumsum(dim=1) - 1
    return masked & (masked_u & (rank < n_commit[:, None])).repeat_interleave(group, dim=1)


PICK = {"roar": random_units, "raster": first_units}   # the schedules that accept every unit they query


def confident_units(masked, logp, rows, cols, n_commit, group, noise, anneal, generator):
    """MaskGIT's commit: the n_commit masked units of each row whose sampled tokens have the highest summed
    log-probability, plus Gumbel noise x noise x anneal when noise > 0 (stable ties: lower index first).
    -> Bool [B, L_target]."""
    B, L = masked.shape
    if noise > 0:
        logp = logp + noise * anneal * _gumbel(logp.shape, generator, logp.device)
    conf = torch.full((B, L), float("-inf"), device=masked.device)
    conf[rows, cols] = logp
    masked_u = masked.view(B, L // group, group).any(-1)
    conf_u = torch.where(masked_u, torch.where(masked, conf, 0.0).view(B, L // group, group).sum(-1), float("-inf"))
    rank = torch.argsort(torch.argsort(-conf_u, dim=1, stable=True), dim=1)
    return masked & (rank < n_commit[:, None]).repeat_interleave(group, dim=1)


def end_captions(out, masked):
    """A caption ends at its first end-of-text and training only ever fed end-of-text after it (the loss never
    scored those positions, so the model's guesses there are noise): once an end-of-text is in, every later
    position is padding, committed now. -> (out, masked)."""
    ended = (out == CAPTION_PAD) & ~masked
    after = (ended.long().cumsum(dim=1) - ended.long()) > 0
    return torch.where(after, torch.full_like(out, CAPTION_PAD), out), masked & ~after


def checkpoint_dataset(ckpt, dataset="", data_root="", where="the checkpoint"):
    """(dataset, data_root) a run reads: the ones given, else those the checkpoint's training config recorded."""
    train_cfg = ckpt.get("config", {})
    dataset = dataset or train_cfg.get("dataset")
    if not dataset:
        raise ValueError(f"{where} records no dataset: pass --dataset=NAME")
    return dataset, data_root or train_cfg.get("data_root", "data")

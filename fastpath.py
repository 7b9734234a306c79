"""
The fast path: the same numbers as model.py's and masking.py's plain code, computed with less memory traffic
and fewer host waits. Chosen by one setting, train.py --fast_path (model.fast = True, and masking's CUDA
graph); packing.py (the trunk on real tokens only) and the static head are its two options.

  loss(model, h, ...)    the per-modality loss of Nano4M.loss through hand-written autograd functions:
                         PerModalityCE (per-modality head) and FullVocabCE (head='full'), or, with
                         model.static_head, static_shape_loss (static shapes, no host sync, compilable)
  target_counts(...)     each modality's scored-target count, copied to the host without waiting (HostCounts),
                         made when train.py draws a batch, so the step never drains the GPU queue to read it
  graphed_batch(...)     masking.build_batch's ~370 small ops captured once as a CUDA graph and replayed
  estimate_mfu(...)      model FLOPs utilization of a step (flops_per_step), for train.py's log and bench.py

tests/test_model.py and tests/test_packing.py hold each to the plain path's loss and gradients.
"""
import torch

import modalities as M
from model import mean_over_modalities


class PerModalityCE(torch.autograd.Function):
    """Summed cross-entropy of each modality's rows (h and ids sorted by modality, counts rows each) over its
    own id range, the head rows weight[start:start + vocab] (rows: one (start, vocab) per modality), in float32:
    the numbers of F.cross_entropy(h_m @ weight[start:start + vocab].T, ids_m,
    reduction="sum"), with less memory traffic over the [rows, vocab] logits, the largest tensors of a step:
    - forward: one log_softmax pass over each modality's logits (logsumexp costs several), kept for backward;
    - backward: the log-probabilities turn into the softmax in place (one pass), the one-hot is subtracted
      at the target ids, and the upstream gradient scales the small [rows, D] side of each matmul instead of
      the [rows, vocab] matrix; the head's gradient is one buffer, not a zero-padded one per modality.
    Counts may be zero; rows beyond sum(counts) (the padding) get a zero gradient.
    The matmuls stay float32 (TF32 on CUDA): bf16 head matmuls with float32 accumulation measured no faster
    on an H100 (docs/speed.md)."""

    @staticmethod
    def forward(ctx, h, weight, ids, counts, rows):
        with torch.autocast(device_type=h.device.type, enabled=False):
            saved, sums = [], []
            sizes = list(counts) + [h.size(0) - sum(counts)]       # the modalities', then the padding rows
            for h_m, ids_m, (start, vocab) in zip(h.split(sizes), ids.split(sizes), rows):
                if h_m.size(0) == 0:
                    saved.append(None)
                    sums.append(h.new_zeros((), dtype=torch.float32))
                    continue
                logp = torch.log_softmax(h_m.float() @ weight[start:start + vocab].float().t(), dim=1)
                sums.append(-logp.gather(1, ids_m[:, None]).sum())
                saved.append(logp)
        ctx.saved, ctx.counts, ctx.rows = saved, list(counts), list(rows)
        ctx.save_for_backward(h, weight, ids)
        return torch.stack(sums)

    @staticmethod
    def backward(ctx, grad_sums):
        h, weight, ids = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            start = 0
            for m, n in enumerate(ctx.counts):
                if n == 0:
                    continue
                grad = ctx.saved[m].exp_()                                           # softmax, in place
                ctx.saved[m] = None                                                  # free as we go
                w0, vocab = ctx.rows[m]
                grad[torch.arange(n, device=h.device), ids[start:start + n]] -= 1.0  # minus the one-hot
                w_m, h_m = weight[w0:w0 + vocab].float(), h[start:start + n].float()
                torch.mm(grad, w_m, out=grad_h[start:start + n])
                grad_h[start:start + n] *= grad_sums[m]
                grad_w[w0:w0 + vocab].addmm_(grad.t(), h_m * grad_sums[m])
                start += n
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None, None


class FullVocabCE(torch.autograd.Function):
    """head='full': the cross-entropy of each row of h [N, D] over all rows of the head weight [V, D] (one
    softmax over the whole vocabulary, the report's head), in float32; rows where scored is False give 0 and
    no gradient. The numbers of F.cross_entropy(h @ weight.T, ids, reduction='none') * scored, done in row
    chunks so the [N, V] logits (V = 50,304) never exist whole: each chunk's softmax is recomputed in backward
    instead of kept, which costs one more matmul per chunk and saves the largest tensor of the step."""
    CHUNK = 2048

    @staticmethod
    def forward(ctx, h, weight, ids, scored):
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.float()
            out = []
            for s in range(0, h.size(0), FullVocabCE.CHUNK):
                logits = h[s:s + FullVocabCE.CHUNK].float() @ w.t()
                i = ids[s:s + FullVocabCE.CHUNK]
                out.append(torch.logsumexp(logits, dim=1) - logits.gather(1, i[:, None])[:, 0])
            ce = torch.cat(out) * scored if out else h.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(h, weight, ids, scored)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        h, weight, ids, scored = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.float()
            g = grad_ce.float() * scored
            for s in range(0, h.size(0), FullVocabCE.CHUNK):
                h_c = h[s:s + FullVocabCE.CHUNK].float()
                grad = torch.softmax(h_c @ w.t(), dim=1)
                grad[torch.arange(grad.size(0), device=h.device), ids[s:s + FullVocabCE.CHUNK]] -= 1.0
                grad *= g[s:s + FullVocabCE.CHUNK, None]
                grad_h[s:s + FullVocabCE.CHUNK] = grad @ w
                grad_w.addmm_(grad.t(), h_c)
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None


class HostCounts:
    """A small device tensor copied to the host without blocking. tolist() waits for that copy alone, not
    for the work queued on the GPU after it (a plain .tolist() waits for everything queued so far)."""

    def __init__(self, counts):
        self.host = counts.to("cpu", non_blocking=True)
        self.copied = None
        if counts.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def tolist(self):
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


def target_counts(model, dec_pos, dec_valid, dec_ids):
    """-> HostCounts: each modality's number of scored targets (and the rest's, last), copied to the host
    without waiting. train.py calls this when it makes a batch, long before the step's head needs the
    numbers, so the step never stalls the GPU queue to read them."""
    return HostCounts(torch.bincount(model.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1),
                                     minlength=len(model.modalities) + 1))


def loss(model, h, dec_pos, dec_ids, dec_valid, dec_counts=None):
    """Nano4M.loss's numbers -> (loss, {name: (sum_ce, count)})."""
    if model.config.head == "full":
        return full_vocab_loss(model, h, dec_pos, dec_ids, dec_valid)
    if model.static_head:
        if model.adapters is not None and model.adapters.factors:
            raise ValueError("the static head does not take adapters' factored_head")
        return getattr(model, "compiled_static_head", static_shape_loss)(model, h, dec_pos, dec_ids, dec_valid)
    return per_modality_loss(model, h, dec_pos, dec_ids, dec_valid, dec_counts)


def per_modality_loss(model, h, dec_pos, dec_ids, dec_valid, dec_counts=None):
    """Sorts the scored target rows by modality so each modality's logits are one matmul over its own id
    range (PerModalityCE). The row counts must be known on the host: from dec_counts (target_counts) if
    given, else read here, which waits for the whole forward pass."""
    n = len(model.modalities)
    h = h.reshape(-1, h.size(-1))
    ids = dec_ids.reshape(-1)
    mod = model.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1)
    order = torch.argsort(mod, stable=True)
    counts_t = torch.bincount(mod, minlength=n + 1)
    counts = dec_counts.tolist() if dec_counts is not None else counts_t.tolist()
    rows = [(start, m.vocab) for start, m in zip(model.row_offset, model.modalities)]
    factored = {} if model.adapters is None else model.adapters.factors
    if factored:   # adapters.py's factored head: a product-coded modality's rows go in twice, scored over its Km
        # means' rows by id // Ks and over its Ks shapes' rows by id % Ks, in the same one PerModalityCE (one
        # gradient buffer for the head: a slice of it per modality would cost a full-size buffer each)
        segs, at = [], 0   # (modality, its head rows (start, size), its target rows in h, their ids)
        for m in range(n):
            sel, at = order[at:at + counts[m]], at + counts[m]
            if m in factored:
                (start, _), (Km, Ks) = rows[m], factored[m]
                segs += [(m, (start, Km), sel, ids[sel] // Ks), (m, (start + Km, Ks), sel, ids[sel] % Ks)]
            else:
                segs.append((m, rows[m], sel, ids[sel]))
        sums = PerModalityCE.apply(torch.cat([h[s[2]] for s in segs]), model.lm_head.weight,
                                   torch.cat([s[3] for s in segs]), [len(s[2]) for s in segs], [s[1] for s in segs])
        owner = torch.tensor([s[0] for s in segs], device=h.device)
        return mean_over_modalities(sums.new_zeros(n).index_add(0, owner, sums), counts_t[:n].float())
    sums = PerModalityCE.apply(h[order], model.lm_head.weight, ids[order], counts[:n], rows)
    return mean_over_modalities(sums, counts_t[:n].float())


def full_vocab_loss(model, h, dec_pos, dec_ids, dec_valid):
    """head='full': every target scored by one softmax over all the head's rows (FullVocabCE), still averaged
    per modality; static shapes, no host sync."""
    n = len(model.modalities)
    mod = model.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1)
    rows = dec_ids.reshape(-1).clamp_min(0) + model.pos_row_offset[dec_pos].reshape(-1)
    ce = FullVocabCE.apply(h.reshape(-1, h.size(-1)), model.lm_head.weight, rows, mod < n)
    sums = torch.zeros(n + 1, dtype=torch.float32, device=h.device).index_add(0, mod, ce)[:n]
    return mean_over_modalities(sums, torch.bincount(mod, minlength=n + 1)[:n].float())


def static_shape_loss(model, h, dec_pos, dec_ids, dec_valid):
    """per_modality_loss's numbers in static shapes with no host sync (model.static_head), so that
    torch.compile / CUDA graphs can take the head with the trunk. Instead of one matmul per modality at
    its row count (known only on the host), every target row gets logits over one fixed column range, the
    span of every modality's ids but the widest's (the caption's 50,304: with the shared table rows
    0..16,383), with the columns outside its own modality's ids masked out; the widest modality's rows,
    at most B * its length of them, get the rest of its range in a second fixed-size matmul. Costs more
    FLOPs than the per-modality head (every row over 16k columns): the price of static shapes."""
    B, No, D = h.shape
    MODALITIES, offsets = model.modalities, model.row_offset
    n_mod = len(MODALITIES)
    device = h.device
    mod = model.target_modality(dec_pos, dec_valid, dec_ids).reshape(-1)        # n_mod = not scored
    scored = mod < n_mod
    ids = dec_ids.reshape(-1)
    # each row's id range [lo, hi) in the head; a row that is not scored gets [0, 1) (finite, then zeroed)
    # rather than none, whose NaN gradient would leak. Built from constants: a tensor copied here would sync
    vocab = torch.ones_like(mod)
    for k, m in enumerate(MODALITIES):
        vocab = torch.where(mod == k, m.vocab, vocab)
    lo = torch.where(scored, model.pos_row_offset[dec_pos].reshape(-1), 0)
    hi = lo + vocab
    wide = max(range(n_mod), key=lambda m: MODALITIES[m].vocab)
    others = [m for m in range(n_mod) if m != wide]
    c0, c1 = min(offsets[m] for m in others), max(offsets[m] + MODALITIES[m].vocab for m in others)
    with torch.autocast(device_type=device.type, enabled=False):
        hf, weight = h.reshape(-1, D).float(), model.lm_head.weight.float()
        cols = torch.arange(c0, c1, device=device)
        # masked columns: a large finite negative, not -inf, so a row with none of its ids in this range
        # (the widest modality's, with separate_vocab) gets a zero gradient here rather than NaN
        logits = (hf @ weight[c0:c1].t()).masked_fill((cols < lo[:, None]) | (cols >= hi[:, None]), -1e30)
        lse = torch.logsumexp(logits, dim=1)
        # the widest modality's rows come first in this order; its columns outside [c0, c1) for them
        w0, w1 = offsets[wide], offsets[wide] + MODALITIES[wide].vocab
        cap = B * min(No, MODALITIES[wide].length)
        rows = torch.argsort((mod != wide).to(torch.uint8), stable=True)[:cap]
        spans = [(a, b) for a, b in ((w0, min(w1, c0)), (max(w0, c1), w1)) if b > a]
        tail = torch.logsumexp(torch.cat([hf[rows] @ weight[a:b].t() for a, b in spans], 1), dim=1)
        tail = torch.where(mod[rows] == wide, tail, float("-inf"))
        lse = lse.index_put((rows,), torch.logaddexp(lse[rows], tail))
        target = torch.where(scored, lo + ids.clamp_min(0), 0)
        ce = torch.where(scored, lse - (hf * weight[target]).sum(1), 0.0)
    sums = ce.new_zeros(n_mod + 1).index_add(0, mod, ce)[:n_mod]
    counts = ce.new_zeros(n_mod + 1).index_add(0, mod, torch.ones_like(ce))[:n_mod]
    return mean_over_modalities(sums, counts)


# ---------------------------------------------------------------------------------------------------
# masking.build_batch as one CUDA graph

_GRAPHS = {}


def graphed_batch(tokens, cfg, generator, B, device):
    """masking.build_batch's batch from a captured CUDA graph of masking._assemble (captured on the first call
    for each config and batch size), or None (and eager from then on) if capture fails on this setup.
    Launching the ~370 small ops one by one costs the host ~4 ms, the replay plus the copies ~0.4 ms. The
    random numbers are drawn outside the graph from `generator`, so both paths give identical batches."""
    import masking
    key = (repr(cfg), B, str(device), M.AUDIO_LAYOUT)
    n_u, n_z = masking._num_draws(cfg)
    if key not in _GRAPHS:
        static_in = {m.name: torch.zeros(B, m.length, dtype=torch.long, device=device) for m in M.MODALITIES}
        static_in["caption"].fill_(M.CAPTION_PAD)
        static_in["U"] = torch.full((B, n_u), 0.5, device=device)   # (not torch.rand: leave the global RNG alone)
        static_in["Z"] = torch.zeros(B, n_z, device=device)
        run = lambda: masking._assemble(static_in, static_in["U"], static_in["Z"], cfg)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):      # warm-up off the main stream, as torch.cuda.graph asks
                for _ in range(2):
                    run()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run()
            _GRAPHS[key] = (static_in, graph, static_out)
        except RuntimeError as e:
            print(f"masking.py: CUDA graph capture failed ({e}); building batches op by op")
            _GRAPHS[key] = None
    if _GRAPHS[key] is None:
        return None
    static_in, graph, static_out = _GRAPHS[key]
    for name in M.MODALITY_NAMES:
        static_in[name].copy_(tokens[name])
    torch.rand(B, n_u, generator=generator, device=device, out=static_in["U"])
    torch.randn(B, n_z, generator=generator, device=device, out=static_in["Z"])
    graph.replay()
    # copies: the next replay overwrites the static outputs, maybe before this batch's backward ran
    return {k: v.clone() for k, v in static_out.items()}


# ---------------------------------------------------------------------------------------------------
# how fast a step runs against the hardware (train.py's mfu on CUDA, bench.py)

def flops_per_step(model, batch_size, n_in, n_out):
    """Training FLOPs of a step (3x forward) with n_in / n_out slots per sample, padding included; the head
    at the modalities' mean vocabulary."""
    D, Le, Ld = model.config.n_embd, model.config.n_enc_layer, model.config.n_dec_layer
    enc = n_in * Le * (12 * D * D + 4 * n_in * D)
    dec = Ld * (n_out * (14 * D * D + 4 * n_out * D + 4 * n_in * D) + n_in * 2 * D * D)
    mean_vocab = sum(m.vocab for m in model.modalities) / len(model.modalities)
    if model.config.head == "full":
        mean_vocab = model.lm_head.weight.shape[0]       # every target against every row
    head = n_out * D * mean_vocab
    # grid_conv: two 3x3 convolutions over every cell of each image grid, whatever the inputs
    stem = (len(model.adapters.grid_conv) if model.adapters else 0) * M.GRID * M.GRID * 2 * 9 * D * D
    return 3 * 2 * batch_size * (enc + dec + head + stem)


def estimate_mfu(model, batch_size, n_in, n_out, dt, peak_flops=989e12):
    """Model FLOPs utilization of a dt-second step; peak_flops: H100 bf16 989e12 (TF32 ~494e12)."""
    return flops_per_step(model, batch_size, n_in, n_out) / dt / peak_flops

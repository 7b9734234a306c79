"""
Packing: the trunk runs on the real tokens only. (Speed machinery, kept out of model.py's reading path.)

A batch from masking.py has fixed widths (256 input + 256 target slots at the report's budgets), but each
sample's input and target budgets are drawn from 16..256, so about half of the slots are padding. The padded
path (model.py, Nano4M.decode_hidden) computes them all and masks them out; here every sample's real tokens
are laid one after another in one sequence [1, T, D], so the Linears, MLPs and LayerNorms see only real
tokens, and attention runs segment by segment with the same rules as the padded masks:

  - encoder self-attention: one segment per sample (its real inputs);
  - decoder self-attention: one segment per sample, with a mask that keeps each target to the targets of its
    own modality (dec_same_modality, 4M's rule);
  - cross-attention: a sample's targets see that sample's real inputs only.

The result is the same decoder output at every real target row (zeros at the padding rows, which the head
never reads), so the loss and the gradients equal the padded path's to float rounding
(tests/test_packing.py). Turned on by model.packed = True (train.py --packing).

Attention route, chosen by measurement on the 2-core CPU (`python packing.py`: forward + backward of one
attention over 8 samples of 16..256 tokens, d512, 8 heads, CPU time of one thread, so that other work on the
machine does not blur it): a loop of plain SDPA calls, one per sample, 28 ms; one SDPA over the packed
sequence with a block-diagonal bool mask, 109-119 ms (it scores every pair of the batch's ~1,000 tokens);
unpacking to [B, longest, D] for the padded mask and packing back, 66-87 ms; SDPA over jagged nested tensors,
145-152 ms (and no mask for the decoder's modality rule; built from a non-leaf tensor it fails on this CPU-only
machine, probing CUDA). So the loop. On a GPU a varlen kernel (FlexAttention block masks, SDPA over jagged
tensors) would replace it; unmeasured here.

Packing reads the per-sample lengths on the host (a sync), so it is for eager steps; under torch.compile or
CUDA graphs the padded path keeps its static shapes.
"""
import torch
import torch.nn.functional as F


class Segments:
    """Varlen attention over packed rows: the query rows are cut into consecutive segments of q_lens rows,
    the key rows into segments of k_lens rows (python lists of equal length, zeros allowed where both are
    zero), and each query segment attends to its own key segment only; masks (optional, one per segment:
    an additive float mask [q_len, k_len], 0 = may attend, -inf = may not) restrict it further."""

    def __init__(self, q_lens, k_lens=None, masks=None):
        self.q_lens = q_lens
        self.k_lens = q_lens if k_lens is None else k_lens
        self.masks = masks or [None] * len(q_lens)
        self._masks = {}

    def attend(self, q, k, v, dropout_p=0.0):
        """q [1, H, Tq, Dh], k and v [1, H, Tk, Dh] -> [1, H, Tq, Dh]."""
        if q.dtype not in self._masks:   # the masks in the attention's dtype, cast once for all layers
            self._masks[q.dtype] = [None if m is None else m.to(q.dtype) for m in self.masks]
        outs = [F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, dropout_p=dropout_p)
                for qs, ks, vs, m in zip(q.split(self.q_lens, 2), k.split(self.k_lens, 2), v.split(self.k_lens, 2),
                                         self._masks[q.dtype]) if qs.size(2)]
        return torch.cat(outs, 2)


def can_pack(enc_valid, dec_valid):
    """Whether a batch can take the packed path: eager (not being compiled), every sample with at least one
    input (the padded path's fallback for an empty encoder attends to a padding slot, which packing drops)
    and at least one target somewhere."""
    if torch.compiler.is_compiling():
        return False
    return bool(enc_valid.any(1).all()) and bool(dec_valid.any())


def decode_hidden_packed(model, enc_ids, enc_pos, enc_valid, dec_pos, dec_valid):
    """Nano4M.decode_hidden on the real tokens only -> [B, No, D], zeros at the padding rows."""
    B, No = dec_pos.shape
    x, y = model.embed(enc_ids, enc_pos, enc_valid, dec_pos)      # per-token gathers: cheap even padded
    D = x.size(-1)
    # encoder rows: every sample's real inputs, sample after sample (wherever they sit in the row)
    enc_rows = enc_valid.reshape(-1).nonzero()[:, 0]
    enc_lens = enc_valid.sum(1).tolist()
    # decoder rows: every sample's real targets, sample after sample
    dec_rows = dec_valid.reshape(-1).nonzero()[:, 0]
    dec_lens = dec_valid.sum(1).tolist()
    masks = None
    if model.config.dec_same_modality:
        # 4M's rule, a target sees the targets of its own modality: one SDPA per sample with a mask, rather
        # than one per (sample, modality) segment: 5x fewer small calls (each a parallel region, costly on a
        # busy CPU), and no dependence on the order the caller's targets come in
        mod = model.pos_modality[dec_pos.reshape(-1)[dec_rows]].split(dec_lens)
        masks = [torch.zeros(m.size(0), m.size(0), device=m.device).masked_fill(m[:, None] != m[None, :], float("-inf"))
                 for m in mod]
    enc_seg = Segments(enc_lens)
    self_seg = Segments(dec_lens, masks=masks)
    cross_seg = Segments(dec_lens, enc_lens)

    x = x.reshape(-1, D)[enc_rows][None]                                     # [1, Ti, D]
    for block in model.encoder:
        x = block(x, enc_seg)
    memory = model.enc_ln_f(x)
    y = y.reshape(-1, D)[dec_rows][None]                                     # [1, To, D]
    for block in model.decoder:
        y = block(y, memory, self_seg, cross_seg)
    y = model.dec_ln_f(y)[0]
    return y.new_zeros(B * No, D).index_copy(0, dec_rows, y).view(B, No, D)


if __name__ == "__main__":
    # python packing.py: the attention routes above, timed on this machine
    import time
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, H, Dh = 8, 8, 64
    lens = torch.randint(16, 257, (B,)).tolist()
    T, L = sum(lens), max(lens)
    x = torch.randn(T, 3 * H * Dh, requires_grad=True)
    heads = lambda t: t.view(1, t.size(0), H, Dh).transpose(1, 2)

    def loop():
        q, k, v = (heads(t) for t in x.split(H * Dh, 1))
        Segments(lens).attend(q, k, v).sum().backward()

    sample = torch.repeat_interleave(torch.arange(B), torch.tensor(lens))

    def block_diagonal():
        q, k, v = (heads(t) for t in x.split(H * Dh, 1))
        F.scaled_dot_product_attention(q, k, v, attn_mask=sample[:, None] == sample[None, :]).sum().backward()

    valid = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    rows = valid.flatten().nonzero()[:, 0]
    pad_mask = (valid[:, None, :] | torch.eye(L, dtype=torch.bool))[:, None]

    def unpack_padded():
        q, k, v = (t.view(B, L, H, Dh).transpose(1, 2)
                   for t in x.new_zeros(B * L, x.size(1)).index_copy(0, rows, x).view(B, L, -1).split(H * Dh, 2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask)
        y.transpose(1, 2).reshape(B * L, -1)[rows].sum().backward()

    leaf = torch.randn(T, H, Dh, requires_grad=True)

    def jagged():
        qn = torch.nested.nested_tensor_from_jagged(leaf, torch.tensor([0] + lens).cumsum(0)).transpose(1, 2)
        F.scaled_dot_product_attention(qn, qn, qn).values().sum().backward()

    print(f"attention fwd + bwd, {B} samples of {lens} tokens, d{H * Dh}, {H} heads, CPU ms of one thread:")
    for name, fn in (("loop of SDPA, one per sample", loop), ("block-diagonal mask", block_diagonal),
                     (f"unpacked to [{B}, {L}] + mask", unpack_padded), ("jagged nested tensors", jagged)):
        try:
            fn()
            t0 = time.thread_time()
            for _ in range(3):
                fn()
            print(f"  {name}: {(time.thread_time() - t0) / 3 * 1000:.1f}")
        except Exception as e:   # (a route this torch build lacks)
            print(f"  {name}: failed, {type(e).__name__}: {str(e).splitlines()[0][:120]}")

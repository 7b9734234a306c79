"""
Level-wise audio (SoundStorm, Borsos et al. 2023): the training half, train.py's --audio_levels. The sampling
half is generation.generate(by_level=True): every frame's level 0 first, then each level given those below.

Whole-frame masking (masking.py) never gives a frame in part, so a model trained on it alone never reads a
frame's level 0 to draw its level 1, and its sampler draws a frame's K ids blind to each other.
"""
import torch

import modalities as M
from masking import kept_first


def audio_levels(batch, rate, generator=None):
    """With probability `rate` a sample whose targets are all audio learns one codebook level q (uniform over
    the K): its audio targets of levels below q become inputs, its audio targets and inputs above q are dropped
    (a sample that also predicts, say, the caption would be handed audio it should not see). The encoder grows
    by the moved targets' width. Returns a new dict (masking.build_batch's keys), sync-free."""
    if rate <= 0:
        return batch
    enc = [batch[k] for k in ("enc_ids", "enc_pos", "enc_valid")]
    dec = [batch[k] for k in ("dec_ids", "dec_pos", "dec_valid")]
    B, device, K = enc[0].size(0), enc[0].device, M.AUDIO_CODEBOOKS
    audio = M.modality_index("tok_audio")
    gdev = generator.device if generator is not None else device
    u = torch.rand(B, 2, generator=generator, device=gdev).to(device)
    q = (u[:, 1:] * K).long().clamp_max(K - 1)                                          # [B, 1]
    level = lambda pos: (pos - M.POS_OFFSETS[audio]) % K                              # stream slot K*t + k: level k
    enc_audio = enc[2] & (M.position_modality(enc[1]) == audio)
    dec_audio, dec_level = dec[2] & (M.position_modality(dec[1]) == audio), level(dec[1])
    pick = ((u[:, 0] < rate) & dec_audio.any(1) & (dec_audio == dec[2]).all(1))[:, None]   # audio targets only
    enc_keep = enc[2] & ~(pick & enc_audio & (level(enc[1]) > q))
    moved = pick & dec_audio & (dec_level < q)
    ev, (e_ids, e_pos) = kept_first(torch.cat([enc_keep, moved], 1), *(torch.cat(c, 1) for c in zip(enc[:2], dec[:2])))
    dv, (d_ids, d_pos) = kept_first(dec[2] & ~(pick & dec_audio & (dec_level != q)), *dec[:2])
    return dict(batch, enc_ids=e_ids, enc_pos=e_pos, enc_valid=ev, dec_ids=d_ids, dec_pos=d_pos, dec_valid=dv)

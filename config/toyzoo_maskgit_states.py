# Issue #31's lever "the masking mismatch" (the report's fix 2, taken one step further): MaskGIT's later steps
# give the model the caption plus the audio frames decoded so far, scattered, and ask for the rest, a condition
# that neither caption -> whole audio nor the 4M component (budgets of 8-64) trains. This adds it: the whole
# caption plus 0-448 audio ids in 1-128 spans in, every other audio id out, at weight 0.20 beside the default's
# caption -> audio (0.10 when measured): the same share of caption-conditioned audio batches as
# config/toyzoo_more_caption_audio.py, so the two runs differ in the masking state alone. All else as config/toyzoo.py.
#     python train.py config/toyzoo_maskgit_states.py   (after config/toyzoo_rgb.py)
# Its row in docs/experiments.md was measured on the default of main 94d02a7 (rgb -> depth / normal at
# 0.025 each, since raised to 0.45 / 0.14): on today's default the same command is the same lever, not the same run.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())
out_dir = 'out/toyzoo_maskgit_states'
_mixture.append(dict(weight=0.20, input_full=('caption',), input_alphas=_only['audio'], input_budget=(0, 448),
                     target_full=('audio',), target_alphas=_none, target_budget=(0, 0), audio_spans=(1, 128)))
masking = dict(masking, mixture=_mixture)

# The default (config/toyzoo.py) with half of its caption -> audio batches made infill: the caption and a random
# share of the audio in (1-4 spans of frames), the rest of the audio out. That is the condition of MaskGIT's later
# steps, which the default otherwise trains only in its 4M-recipe batches (issue #31, docs/experiments.md):
#   python train.py config/toyzoo_audio_infill.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())   # the default, stage 2
out_dir = 'out/toyzoo_audio_infill'
_infill = dict(weight=0.05, input_full=('caption',), input_alphas=_only['audio'], input_budget=(0, 448),
               target_full=('audio',), target_alphas=_none, target_budget=(0, 0))
masking = dict(masking, mixture=[dict(c, weight=0.05) if c.get('input_full') == ('caption',) else c
                                 for c in _mixture] + [_infill])

# Issue #33's lever "a larger share of rgb -> depth / normal batches", as measured (docs/experiments.md): stage 2
# with the other shares of the default it was measured on, and those two components at 0.25 each instead of
# 0.10. The default has since gone further (config/toyzoo.py: rgb -> depth 0.45).
#     python train.py config/toyzoo_most_structure.py   (after config/toyzoo_rgb.py)
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())
out_dir = 'out/toyzoo_most_structure'
_mixture = [dict(weight=0.10),
            _whole('audio', 'caption', 0.30, also='rgb'),
            _whole('rgb', 'caption', 0.45, also='audio'),
            _whole('caption', 'audio', 0.10),
            _whole('rgb', 'depth', 0.25, also='audio'),
            _whole('rgb', 'normal', 0.25, also='audio')]
masking = dict(masking, mixture=_mixture)

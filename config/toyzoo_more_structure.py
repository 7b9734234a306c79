# Issue #33's lever "the share of rgb -> depth / normal batches": stage 2 of the ToyZoo default with those two
# components at weight 0.10 each instead of 0.025; all else as config/toyzoo.py.
#     python train.py config/toyzoo_more_structure.py   (after config/toyzoo_rgb.py)
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())
out_dir = 'out/toyzoo_more_structure'
_mixture[4] = dict(_mixture[4], weight=0.10)
_mixture[5] = dict(_mixture[5], weight=0.10)
masking = dict(masking, mixture=_mixture)

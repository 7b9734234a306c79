# Issue #33's next lever, "a larger share of rgb -> depth / normal batches": stage 2 of the ToyZoo default with
# those two components at weight 0.25 each instead of its 0.10; all else as config/toyzoo.py.
#     python train.py config/toyzoo_most_structure.py   (after config/toyzoo_rgb.py)
import os
exec(open(os.path.join(os.path.dirname(__file__), 'toyzoo.py')).read())
out_dir = 'out/toyzoo_most_structure'
_mixture[4] = dict(_mixture[4], weight=0.25)
_mixture[5] = dict(_mixture[5], weight=0.25)
masking = dict(masking, mixture=_mixture)

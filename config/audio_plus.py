# The report's run (config/audio.py) with the departures we recommend turned on, one switch each (README, "Where
# the default departs from the report", says why and what each was measured to do):
#   python train.py config/audio_plus.py --dry_run=True
#   python train.py config/audio_plus.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'audio.py')).read())   # relative to this file
out_dir = 'out/audio_plus'
wandb_run_name = 'audio-plus-d6-6w512'
head = 'modality'               # each target scored over its own modality's ids (see README for the measurement)
pos_emb = 'learned'             # factorised learned positions: image row + col, audio frame + codebook
cond_dropout = 0.1              # guidance then has a learnt unconditional model (masking.condition_dropout)

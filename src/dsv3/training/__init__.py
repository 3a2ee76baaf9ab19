"""Training DeepSeek-V3 from outside the model: data packing, losses, aux-loss-free balancing, runs.

data.py (documents -> packed windows with boundary-masked targets), losses.py (next-token, MTP and
sequence-wise balance losses), balance.py (bias update, MaxVio), trainer.py (steps, checkpoints,
resume, torchrun data parallelism), plot.py (PNGs of runs), commands.py (`dsv3 train`, `dsv3 plot`).
"""

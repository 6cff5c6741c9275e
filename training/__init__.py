"""How the shipped testbed model was trained: trainers, the training driver and the probes of what it learnt.

Not part of the installed package (the wheel holds ``dit_accel*`` only). Run from the repository root, e.g.
``python training/train_testbed.py --stage smoke --out .runs/tb``; see ``training/README.md``.
"""

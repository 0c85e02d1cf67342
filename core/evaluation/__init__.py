"""Evaluators: each scores an image's label maps under one set of rules (`base.Evaluator`).

  official  cityscapesscripts' rules at full resolution; also every fit's (cluster, class) counts
  seed      the seed paper's evaluate_cascade_pseudolabels.py (512 x 1024, no void or crowd rules)
  cause     CAUSE's test_tr.py: the baseline on the 322 centre crop, 27 classes, Hungarian
"""

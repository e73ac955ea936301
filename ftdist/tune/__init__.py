"""`ftdist tune`: a Ray Tune search over an ftdist config.

  space.py       the search space: checked against the config, turned into Ray Tune domains
  trial.py       one trial = one Ray Train run of the one loop, reporting each evaluation to Tune
  experiment.py  the driver: preflight, shared base model and data, the Tuner (new or restored)
  results.py     the results table (printed and CSV), best.yaml, plots
"""

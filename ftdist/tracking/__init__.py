"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, from the `logging:` section.

  preflight.py   each asked-for backend installed and reachable, checked on the driver
  hub.py         Tracking: rank 0's reporters, fed from the metrics log on a background thread
  run.py         open_tracking (a run, a trial) and open_search_tracking (a search's parent run)
  tensorboard.py / mlflow_run.py / wandb_run.py   one backend each
  params.py      what a tracker is told of a run: flat config parameters, tags, metrics

The loop never knows which trackers exist: the metrics log hands each record to the hub.
"""

"""The names of what ftdist writes: a run directory, a search's directory, an export.

  <run>/                      RUN_MARKER       ftdist's own mark: this directory is an ftdist run
                                               (or a search: its "kind")
                              LOCK_FILE        who writes it now (LEASE_FILE on s3://): runlock.py
                              SNAPSHOT         the resolved config (secrets redacted)
                              METRICS          one JSON line per step, evaluation and event
                              SUMMARY          the final numbers
                              REPORT           what `ftdist report` prints
                              *.png            PLOTS
                              BASE_DIR/        the initial weights of a model.init run
                              CHECKPOINTS/     step-N/ (checkpoint.py)
                              FINAL_DIR/       the trained model; FINAL_META in it, written last,
                                               marks the run finished
                              RAY_DIR/         Ray Train's own bookkeeping
                              TRACKING         the tracker runs this run reports to (their ids)
                              TENSORBOARD_DIR/ TensorBoard event files (logging.tensorboard: true)
                              WANDB_DIR/       W&B's run files (offline runs: for `wandb sync`)
  <search>/                   the same marker and snapshot, BASE_DIR/, TUNER_DIR/ (Ray Tune's
                              state), trial-N/ (each an ftdist run), SEARCH_OUTPUTS
  <export>/                   FINAL_META, with what was exported (method, merged, source, step)

Only what is named here is ever deleted by ftdist (`--restart`, `export --force`), and only
inside a directory that bears ftdist's marker: nothing of the user's is lost.
"""

from __future__ import annotations

RUN_MARKER = ".ftdist-run"
# One writer at a time (runlock): a local directory's lock file, an s3:// one's lease object.
# Neither is ever deleted by --restart: another process may be holding it.
LOCK_FILE = ".ftdist-lock"
LEASE_FILE = ".ftdist-lease.json"
SNAPSHOT = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
REPORT = "report.json"
BASE_DIR = "base"
CHECKPOINTS = "checkpoints"
FINAL_DIR = "final"
FINAL_META = "ftdist.json"  # in final/ and in an export: what the directory holds
FINISHED = f"{FINAL_DIR}/{FINAL_META}"
RAY_DIR = "ray"
TUNER_DIR = "tuner"
TRACKING = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"

PLOTS = ("loss.png", "forgetting.png", "lr.png", "throughput.png")
SEARCH_OUTPUTS = ("results.csv", "best.yaml", "tune.json", "eval_curves.png", "metric_vs_params.png")
# Written aside and renamed into place; left behind only by a crash.
STAGING = (f"{FINAL_DIR}.tmp", f"{BASE_DIR}.tmp", f"{BASE_DIR}.download", f"{BASE_DIR}.lock", f"{METRICS}.tmp")

# Everything a run or a search writes at its top level (trial-N/ of a search are runs of their own).
RUN_ENTRIES = frozenset({SNAPSHOT, METRICS, SUMMARY, REPORT, BASE_DIR, CHECKPOINTS, FINAL_DIR, RAY_DIR, TUNER_DIR,
                         TRACKING, TENSORBOARD_DIR, WANDB_DIR, *PLOTS, *SEARCH_OUTPUTS, *STAGING})
TRIAL_PREFIX = "trial-"


def is_ftdist_entry(name: str) -> bool:
    """A top-level name of a run or search directory that ftdist writes (a file's staged
    <name>.tmp too: safewrite writes whole files that way)."""
    return (name in RUN_ENTRIES or name.removesuffix(".tmp") in RUN_ENTRIES
            or (name.startswith(TRIAL_PREFIX) and name[len(TRIAL_PREFIX):].isdigit()))

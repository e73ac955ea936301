"""metrics.jsonl handling and what a person sees while training."""

import io
import json

from ftdist.io.metrics_log import MetricsLog, read_metrics
from ftdist.training.metrics import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


RECORD = {"loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0}


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(total=20, start=0, log_every=10, stream=out)
    for step in range(1, 21):
        progress.step({"step": step, **RECORD})
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/20", "20/20"]


def test_a_progress_bar_on_a_terminal():
    out = FakeTerminal()
    progress = Progress(total=20, start=5, log_every=10, stream=out)
    progress.step({"step": 6, **RECORD})
    progress.close()
    assert "6/20" in out.getvalue() and "loss=1.5000" in out.getvalue()


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 8):
        log.append({"step": step, "loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # a line cut short by a crash
    log.truncate_after(5)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_ray_noise_and_its_tracebacks_are_filtered_but_progress_is_kept():
    import io

    from ftdist.io.quiet import NoiseFilter

    out = io.StringIO()
    stream = NoiseFilter(out)
    stream.write("(TrainController pid=1) Failed to stop PlacementGroupCleaner gracefully.\n"
                 "(TrainController pid=1) Traceback (most recent call last):\n"
                 '(TrainController pid=1)   File "x.py", line 1, in f\n'
                 "(TrainController pid=1) ray.exceptions.GetTimeoutError: Get timed out\n"
                 "(RayTrainWorker pid=2) step 10/60  loss 4.5856  lr 3.00e-03\n"
                 "(TrainController pid=1) Failed to send resource request for train-1. If this only happens "
                 "transiently ... If this error persists, file a GitHub issue.\n"
                 "(TrainController pid=1) Traceback (most recent call last):\n"
                 "(TrainController pid=1) ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.\n"
                 "[2026-11-23 14:51:42,393 E 11662 11690] core_worker.cc:2465: Actor with class name\n"
                 "(RayTrainWorker pid=2) step 20/60  loss 2.4")
    stream.write("800\n")
    stream.flush()
    assert out.getvalue() == ("(RayTrainWorker pid=2) step 10/60  loss 4.5856  lr 3.00e-03\n"
                              "(RayTrainWorker pid=2) step 20/60  loss 2.4800\n")


def test_the_forgetting_plot_reads_retention_at_each_evaluation(tmp_path):
    from ftdist.artifacts.report import plot_forgetting, retention_curve

    records = [{"step": 0, "event": "start", "retention_loss_before": 3.0},
               {"step": 0, "eval_loss": 5.0},
               {"step": 10, "eval_loss": 2.0, "retention_loss": 3.5, "forgetting": 0.5},
               {"step": 20, "eval_loss": 1.0, "forgetting": 1.25}]  # written before retention_loss was logged
    assert retention_curve(records) == (3.0, [10, 20], [3.5, 4.25])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_forgetting(tmp_path).stat().st_size > 1000
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "event": "start"}) + "\n")
    assert plot_forgetting(tmp_path) is None  # no data.retention: no plot

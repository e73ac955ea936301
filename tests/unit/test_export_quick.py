"""ftdist export: each method's export loads with plain transformers / peft and computes what
the trained model computes; checkpoints (local mode and DeepSpeed ZeRO 0-3) export their own
weights; bad inputs are refused with one message."""

from tests.conftest import run_cli


def test_missing_path_exits_2_without_a_traceback(tmp_path):
    result = run_cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"ftdist: error: {tmp_path / 'nope'}: no such directory; give a run directory" in result.stderr
    assert result.stdout == ""

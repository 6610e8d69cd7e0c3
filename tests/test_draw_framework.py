import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from draw_framework import draw, step_phases  # noqa: E402


def test_phases_follow_the_trainer_step_order():
    # The diagram reads the trainer's timed sections; this is the order the fit loop runs them.
    assert step_phases() == ["gen", "reward", "old_log_prob", "ref", "values", "adv", "update_critic", "update_actor"]


def test_draw_writes_a_png(tmp_path):
    out = draw(tmp_path / "framework.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""bench.py --quick: every figure comes out, with its unit, as a JSON line (no timing assertions)."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_emits_every_figure_with_its_unit(tmp_path):
    out = tmp_path / "bench.jsonl"
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert printed == rows
    figures = {r["figure"]: r for r in rows}
    expected = {"rollout_one_at_a_time_tokens_per_s": "tokens/s", "rollout_one_at_a_time_episodes_per_s": "episodes/s",
                "rollout_batched_4_tokens_per_s": "tokens/s", "rollout_batched_4_episodes_per_s": "episodes/s",
                "rollout_batched_4_speedup_tokens": "x", "rollout_batched_4_speedup_episodes": "x",
                "rollout_batched_4_prompt_tokens_cached": "fraction",
                "train_tiny-text_tokens_per_s": "tokens/s", "train_tiny-text_peak_rss": "GiB",
                "env_gp_reset_verify_per_s": "resets+verifies/s per core", "env_virl_steps_per_s": "steps/s per core",
                "env_gp_vl_images_per_s": "images/s per core", "env_virl_vl_grids_per_s": "2x2 view grids/s per core"}
    assert set(figures) == set(expected), set(figures) ^ set(expected)
    for name, unit in expected.items():
        assert figures[name]["unit"] == unit and math.isfinite(figures[name]["value"]) and figures[name]["value"] > 0
    assert "| env_gp_reset_verify_per_s |" in run.stdout  # the table


def test_bad_section_is_one_line():
    run = subprocess.run([sys.executable, "bench.py", "--sections", "gpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "sections='gpu'" in run.stderr and run.stderr.strip().count("\n") == 0

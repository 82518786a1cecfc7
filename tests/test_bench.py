"""bench.py --quick: every figure comes out, with its unit, as a JSON line (no timing assertions); the memory
estimate's arithmetic."""
import json
import math
import os
import subprocess
import sys

from launch import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_emits_every_figure_with_its_unit(tmp_path):
    out = tmp_path / "bench.jsonl"
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=HANG_S)
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
                "train_tiny-text_padding_share": "fraction",
                "env_gp_reset_verify_per_s": "resets+verifies/CPU-s", "env_virl_steps_per_s": "steps/CPU-s",
                "env_gp_vl_images_per_s": "images/CPU-s", "env_virl_vl_grids_per_s": "2x2 view grids/CPU-s",
                "rollout_first_s": "s", "rollout_second_s": "s",
                "decode_plain_step_ms": "ms", "decode_plain_tokens_per_s": "tokens/s", "decode_engine_step_ms": "ms",
                "decode_engine_tokens_per_s": "tokens/s", "decode_engine_vs_plain": "x",
                "decode_engine_warmup_s": "s", "rollout_engine_tokens_per_s": "tokens/s",
                "rollout_engine_vs_raw_decode": "fraction",
                "host_prefix_cache_ops_16": "aten ops/round", "host_prefix_cache_ops_64": "aten ops/round",
                "host_prefix_cache_ops_64_vs_16": "x", "host_rollout_ms_per_round_16": "CPU-ms/round",
                **{f"memory_{m}": "GiB per GPU (estimate)"
                   for m in ("tiny-text_1gpu_ppo", "llama-3.2-11b-vision_8gpu_ppo", "llama-3.2-11b-vision_8gpu_sft",
                             "llama-3.2-11b-vision_1gpu_ppo")}}
    assert set(figures) == set(expected), set(figures) ^ set(expected)
    for name, unit in expected.items():
        value = figures[name]["value"]  # a padding share may be 0: turns of one length
        assert figures[name]["unit"] == unit and math.isfinite(value) and (value > 0 or name.endswith("padding_share"))
    assert "| env_gp_reset_verify_per_s |" in run.stdout  # the table
    paper = figures["memory_llama-3.2-11b-vision_8gpu_ppo"]
    assert paper["params_b"] == 10.67 and 20 < paper["value"] < 80   # the published 10.67B fits 80 GB sharded 8 ways
    assert figures["memory_llama-3.2-11b-vision_1gpu_ppo"]["value"] > 160  # 16 bytes a parameter: not on one GPU


def test_memory_estimate_counts_what_training_really_holds():
    """The estimate's weights, gradients and Adam state (runs.training_memory) against the bytes a real fp32 training
    step of the model holds after one Adam step: the parts of the formula a CPU can check."""
    import torch
    import model as M
    import runs as R
    policy = M.load_policy("tiny-text")
    params = list(policy.model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    batch = policy.collate([policy.encode([{"role": "user", "content": "hi"}])], [torch.tensor([5, 6, 7])])
    policy(batch)["logprobs"].sum().backward()
    opt.step()
    held = {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "adam": sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                        if torch.is_tensor(t) and t.dim())}   # m and v, not the step counters
    est = R.training_memory(policy.model, world=1, tokens=100, response_tokens=10)
    assert {k: est[k] * 2**30 for k in held} == held
    assert est["total"] == sum(est[k] for k in ("weights", "gradients", "adam", "bf16_copy", "activations", "logits"))


def test_bad_section_is_one_line():
    run = subprocess.run([sys.executable, "bench.py", "--sections", "gpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=HANG_S)
    assert run.returncode == 2 and "sections='gpu'" in run.stderr and run.stderr.strip().count("\n") == 0


def gpu_check(tmp_path, *args, quick=True):
    """(exit code, report rows, stdout and stderr) of `bench.py --gpu-check --device cpu [--quick] *args`."""
    out = tmp_path / "check.jsonl"
    cmd = [sys.executable, "bench.py", "--gpu-check", "--device", "cpu", "--out", str(out),
           *(["--quick"] if quick else []), *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return run.returncode, rows, run.stdout + run.stderr


def test_gpu_check_on_cpu_runs_the_gpu_tests_there_and_reports_every_target(tmp_path):
    import bench as B
    code, rows, output = gpu_check(tmp_path, "--sections", "train", "--check-tests", "tests/test_gpu.py -k one_process",
                                   "--deadline-minutes", "0")   # no deadline: a slow machine must not cut a part
    assert code == 0, output[-3000:]
    env = rows[0]
    assert env["figure"] == "environment" and env["torch"] and env["transformers"] and env["device"].startswith("CPU")
    figures = {r["figure"]: r for r in rows}
    # the GPU test ran on the CPU (bf16 autocast there) and its measurements are in the report, before its verdict
    test = "test test_gpu::test_one_process_training_moves_the_master_weights_at_the_papers_learning_rates"
    assert figures[test]["value"] == "passed"
    assert figures["ppo_1_update_changed_share"]["value"] >= 0.9
    assert rows.index(figures["ppo_1_update_changed_share"]) < rows.index(figures[test])
    assert figures["train_tiny-text_tokens_per_s"]["value"] > 0
    skipped = {r["value"]: r["reason"] for r in rows if r["figure"] == "skipped"}
    assert skipped == {"train tiny-text MFU and peak memory": "needs a CUDA GPU"}
    targets = [r for r in rows if r["figure"].startswith("target_")]
    assert len(targets) == len(B.TARGETS)
    verdicts = {r["figure"]: (r["met"], r.get("why")) for r in targets}
    assert verdicts["target_ppo_1_update_changed_share"] == (True, None)   # device-independent: judged here
    assert verdicts["target_train_tiny-text_mfu"] == (None, "not measured")
    assert "| target_ppo_1_update_changed_share |" in output and "(target >= 0.9: met)" in output


def test_gpu_check_deadline_keeps_what_was_measured_and_names_what_it_cut(tmp_path):
    code, rows, output = gpu_check(tmp_path, "--check-tests", "", "--deadline-minutes", "0.05")
    assert code == 0, output[-3000:]
    printed = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert printed == rows   # every figure printed was written, the ones before the cut included
    skipped = {r["value"]: r["reason"] for r in rows if r["figure"] == "skipped"}
    assert any("cut by the deadline of 0.05 minutes" in reason for reason in skipped.values()), skipped
    measured = {r["figure"].split("_")[0] for r in rows if isinstance(r["value"], float)}
    sections = {"rollout", "decode", "train"}   # what is not skipped whole was measured, at least in part
    assert all(s in measured or any(p.startswith(s) for p in skipped) for s in sections), (measured, skipped)
    assert "train tiny-text" in skipped      # three seconds are not enough for the rollouts and the decode timing


def test_gpu_check_goes_on_after_a_failure_reports_the_targets_and_fails(tmp_path):
    import bench as B
    missing = str(tmp_path / "no-model")
    code, rows, output = gpu_check(tmp_path, "--sections", "rollout", "--model", missing,
                                   "--check-tests", "tests/test_gpu.py::no_such_test", quick=False)
    assert code == 1, output[-3000:]
    failed_tests = [r for r in rows if r["unit"] == "test" and r["value"] == "failed"]
    assert len(failed_tests) == 1 and "pytest exited with code 4" in failed_tests[0]["reason"]
    failed_parts = {r["value"]: r["reason"] for r in rows if r["figure"] == "failed"}
    assert set(failed_parts) == {"first rollout", "rollout"} and all(missing in r for r in failed_parts.values())
    assert len([r for r in rows if r["figure"].startswith("target_")]) == len(B.TARGETS)

"""--precision bf16 on CPU: fp32 master weights that an Adam step of the paper's learning rates moves (where
bf16 weights round it away), exact resume, plain-transformers checkpoints, the 2-process FSDP2 path, and
PPO's re-scoring of the rollout with the training numerics."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import model as M
import train_ppo as P
import train_sft as S
from launch import HANG_S, report, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def changed_share(before: str, after: str) -> float:
    """Share of the language model's parameter elements that differ between two model folders (a checkpoint
    gathered from FSDP also writes a tied output layer under its own name: compared through its input twin)."""
    a, b = load_file(os.path.join(before, "model.safetensors")), load_file(os.path.join(after, "model.safetensors"))
    assert a.keys() <= b.keys()
    changed = sum(int((a[k].float() != b[k].float()).sum()) for k in a)
    return changed / sum(a[k].numel() for k in a)


def sft(out, **kw):
    base = dict(task="gp-l", model="tiny-text", examples=8, steps=1, batch_size=4, micro_batch=2, lr=1e-6,
                warmup_steps=0, save_every=1, precision="bf16", out=str(out))
    return S.SFTConfig(**{**base, **kw})


def ppo(out, **kw):
    base = dict(task="gp-l", model="tiny-text", updates=1, turns=8, envs=4, minibatch=4, micro_batch=2,
                max_new_tokens=12, lr=1e-6, precision="bf16", out=str(out))
    return P.PPOConfig(**{**base, **kw})


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_bf16_weights_round_an_adam_step_of_1e_6_away():
    """The failure this file guards against, shown on CPU: Adam on bf16 parameters (what GPU training did
    before fp32 master weights) leaves almost every weight where it was."""
    policy = M.load_policy("tiny-text", dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    examples = S.encode_examples(policy, S.expert_examples("gp-l", 4, seed=0))
    opt = torch.optim.Adam(policy.model.parameters(), lr=1e-6)
    loss, _ = S.sft_loss(policy, policy.collate([p for p, _ in examples], [r for _, r in examples]), 100)
    loss.backward()
    opt.step()
    after = policy.model.state_dict()
    share = sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())
    assert share < 0.1, share


def test_bf16_compute_moves_the_fp32_master_weights_at_the_papers_learning_rate(tmp_path):
    base = M.resolve("tiny-text")
    S.train(sft(tmp_path / "sft"))
    ckpt = str(tmp_path / "sft" / "step-000001")
    assert M.load_policy(ckpt, precision="bf16").compute_dtype == torch.bfloat16
    assert changed_share(base, ckpt) >= 0.9          # one SFT step at lr 1e-6
    P.train(ppo(tmp_path / "ppo"))
    assert changed_share(base, str(tmp_path / "ppo" / "step-000001")) >= 0.9   # one PPO update at lr 1e-6
    log = metrics(tmp_path / "ppo")[0]
    # bf16 compute: the rollout was re-scored and the gap to generation's log-probs logged
    assert 0 <= log["logprob_gap_mean"] <= log["logprob_gap_max"] < 1.0, log


def test_bf16_sft_at_1e_5_changes_most_of_the_saved_checkpoint_which_plain_transformers_loads(tmp_path):
    S.train(sft(tmp_path / "run", steps=20, lr=1e-5, warmup_steps=2, save_every=20))
    ckpt = str(tmp_path / "run" / "step-000020")
    assert changed_share(M.resolve("tiny-text"), ckpt) > 0.5
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(ckpt)
    master = load_file(os.path.join(ckpt, "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in master.values())
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in master.items())


def test_fp32_ppo_does_not_rescore_and_bf16_can_be_told_not_to(tmp_path):
    P.train(ppo(tmp_path / "fp32", precision="fp32"))
    P.train(ppo(tmp_path / "off", recompute_logprobs=False))
    for run in ("fp32", "off"):
        log = metrics(tmp_path / run)[0]
        assert log["logprob_gap_mean"] is None and log["logprob_gap_max"] is None


def test_bf16_sft_resume_reproduces_the_uninterrupted_run(tmp_path, killed_after_save):
    S.train(sft(tmp_path / "a", steps=4, save_every=2, lr=1e-3))
    with killed_after_save("step-000002"):
        S.train(sft(tmp_path / "b", steps=4, save_every=2, lr=1e-3))
    S.train(sft(tmp_path / "b", steps=4, save_every=2, lr=1e-3, resume=True))
    assert [m["loss"] for m in metrics(tmp_path / "a")] == [m["loss"] for m in metrics(tmp_path / "b")]
    a = load_file(str(tmp_path / "a" / "step-000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # the fp32 master weights, bit for bit


def test_bf16_ppo_resume_reproduces_the_uninterrupted_run(tmp_path, killed_after_save):
    P.train(ppo(tmp_path / "a", updates=2, save_every=1, lr=1e-4, grad_clip=1.0))
    with killed_after_save("step-000001"):
        P.train(ppo(tmp_path / "b", updates=2, save_every=1, lr=1e-4, grad_clip=1.0))
    P.train(ppo(tmp_path / "b", updates=2, save_every=1, lr=1e-4, grad_clip=1.0, resume=True))
    keys = ("reward_mean", "policy_loss", "value_loss", "logprob_gap_mean")
    logged = [[[m[k] for k in keys] for m in metrics(tmp_path / run)] for run in ("a", "b")]
    assert logged[0] == logged[1]
    a = load_file(str(tmp_path / "a" / "step-000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-000002" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_fsdp2_bf16_mixed_precision_moves_fp32_shards(tmp_path):
    args = ["--model", "tiny-text", "--examples", "8", "--steps", "1", "--batch-size", "4", "--micro-batch", "2",
            "--lr", "1e-6", "--warmup-steps", "0", "--save-every", "1", "--precision", "bf16"]
    two = torchrun("train_sft.py", [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, report(two)
    ckpt = str(tmp_path / "two" / "step-000001")
    assert changed_share(M.resolve("tiny-text"), ckpt) >= 0.9
    assert all(v.dtype == torch.float32 for v in load_file(os.path.join(ckpt, "model.safetensors")).values())
    S.train(sft(tmp_path / "one"))
    # FSDP computes in bf16 throughout, one process under autocast (fp32 residual stream): close, not equal
    assert abs(metrics(tmp_path / "two")[0]["loss"] - metrics(tmp_path / "one")[0]["loss"]) < 0.05


def test_bad_precision_is_one_line(tmp_path):
    for script in ("train_sft.py", "train_ppo.py"):
        out = subprocess.run([sys.executable, script, "--precision", "fp16", "--out", str(tmp_path / "r")], cwd=ROOT,
                             capture_output=True, text=True, timeout=HANG_S)
        assert out.returncode == 2 and "precision='fp16': expected one of auto, fp32, bf16" in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0

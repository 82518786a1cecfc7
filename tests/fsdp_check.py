"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2-sharded scoring, one optimizer step,
generation of different lengths per rank, and a sharded save, each compared with one unsharded process.
Rank 0 prints one JSON line of measured differences for tests/test_model.py to judge."""
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import runs as R  # noqa: E402


def batch_for(policy, idx):
    convs = [[{"role": "user", "content": f"question number {i} " + "word " * (3 * i)}] for i in idx]
    prompts = [policy.encode(c) for c in convs]
    responses = [torch.arange(5 + i, 9 + 2 * i) for i in idx]
    return policy.collate(prompts, responses)


def loss_of(out):
    mask = out["response_mask"].float()
    return -(out["logprobs"] * mask).sum(1).mean() + out["values"].pow(2).mean()


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    name = sys.argv[1] if len(sys.argv) > 1 else "tiny-text"
    everyone = list(range(2 * world))
    mine = everyone[rank::world]

    torch.manual_seed(0)
    ref = M.load_policy(name)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    full = ref(batch_for(ref, everyone))
    loss_of(full).backward()
    ref_opt.step()
    ref_after = ref(batch_for(ref, everyone))

    torch.manual_seed(0)
    policy = R.shard(M.load_policy(name))
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    out = policy(batch_for(policy, mine))
    loss_of(out).backward()   # FSDP averages gradients over ranks: the mean of equal halves' means
    opt.step()
    after = policy(batch_for(policy, mine))

    def diff(a, b):
        return float((a - b).abs().max())
    rows = torch.tensor(mine)
    d_score = max(diff(out["logprobs"].detach(), full["logprobs"][rows, :out["logprobs"].shape[1]].detach()),
                  diff(out["values"].detach(), full["values"][rows].detach()))
    d_step = max(diff(after["logprobs"].detach(), ref_after["logprobs"][rows, :after["logprobs"].shape[1]].detach()),
                 diff(after["values"].detach(), ref_after["values"][rows].detach()))

    # different prompts and lengths per rank: must not hang (weights are gathered once per call)
    conv = [{"role": "user", "content": "hi " * (rank + 1)}]
    gen = policy.generate([conv], max_new_tokens=4 + 7 * rank, temperature=1.0)
    rescored = policy(policy.collate([gen[0].prompt], [gen[0].response_ids]))
    d_gen = diff(rescored["logprobs"][0, :len(gen[0].response_ids)].detach(), gen[0].logprobs)

    folder = os.path.join(tempfile.gettempdir(), f"fsdp-check-{os.environ.get('MASTER_PORT', '0')}")
    policy.save(folder, extras={"trainer_state.json": {"step": 1}})
    dist.barrier()
    if rank == 0:
        loaded = M.load_policy(folder)
        again = loaded(batch_for(loaded, everyone))
        d_save = max(diff(again["logprobs"].detach(), ref_after["logprobs"].detach()),
                     diff(again["values"].detach(), ref_after["values"].detach()))
        with open(os.path.join(folder, "trainer_state.json")) as f:
            extras_ok = json.load(f) == {"step": 1}
        print(json.dumps({"score": d_score, "step": d_step, "generate": d_gen, "save": d_save,
                          "gen_lengths_differ": True, "extras": extras_ok, "world": world}))
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): two PPO updates (ppo_update) on a fixed batch of
turns, sharded with FSDP2 (each rank holds half of the turns) and in one unsharded process (all of them),
from the same weights. Rank 0 prints one JSON line of measured differences for tests/test_train_ppo.py.

`make_batch` is also used by the single-process tests."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import runs as R
import train_ppo as P  # noqa: E402


def make_batch(policy, n: int, seed: int = 0, rows=None) -> P.Batch:
    """n turns with varied prompt and response lengths; old log-probs are the policy's own plus noise,
    so that some ratios start outside the clip range; seeded advantages and returns."""
    g = torch.Generator().manual_seed(seed)
    prompts = [policy.encode([{"role": "user", "content": f"turn {i} " + "word " * (i % 5)}]) for i in range(n)]
    responses = [torch.randint(10, 1000, (3 + i % 4,), generator=g) for i in range(n)]
    own, _ = P.score_turns(policy, prompts, responses, micro_batch=4)
    old = [lp + 0.2 * torch.randn(lp.shape, generator=g) for lp in own]
    weights = [torch.where(torch.arange(len(r)) < 2, 0.5, 1.0) for r in responses]
    adv, ret, vals = torch.randn(n, generator=g), torch.randn(n, generator=g), 0.3 * torch.randn(n, generator=g)
    rows = list(range(n)) if rows is None else rows
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    return P.Batch(pick(prompts), pick(responses), pick(old), pick(weights), vals[rows], adv[rows], ret[rows])


def two_updates(policy, batch, cfg, world):
    opt = P.build_optimizer(policy, cfg)
    sums = [P.ppo_update(policy, opt, batch, cfg, update=u, world=world) for u in range(2)]
    return sums


def main():
    token_level = len(sys.argv) > 1 and sys.argv[1] == "token"
    n = 8
    cfg = P.PPOConfig(model="tiny-text", turns=n, minibatch=n, micro_batch=2, epochs=2, lr=1e-3, grad_clip=1.0,
                      token_level=token_level, out="unused")

    torch.manual_seed(0)
    ref = M.load_policy("tiny-text", temperature=cfg.temperature)
    ref_sums = two_updates(ref, make_batch(ref, n), cfg, world=1)  # before the process group exists
    ref_state = R.full_state_dict(ref)

    dist.init_process_group("gloo")  # only now: the reference's all-reduces must be no-ops
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    policy = M.load_policy("tiny-text", temperature=cfg.temperature)
    mine = make_batch(policy, n, rows=list(range(rank, n, world)))
    R.shard(policy)
    # a rollout's no-gradient passes come first in every update: they must leave no stale weights behind
    policy.generate([[{"role": "user", "content": "hi " * (rank + 1)}]], max_new_tokens=3 + 4 * rank)
    P.score_turns(policy, mine.prompts, mine.responses, micro_batch=3)
    sums = two_updates(policy, mine, cfg, world)
    state = R.full_state_dict(policy)

    pg = [R.all_reduce_sum(s["pg"]) for s in sums]
    if rank == 0:
        d_weights = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
        moved = max(float((ref_state[k] - R.full_state_dict(M.load_policy("tiny-text"))[k]).abs().max())
                    for k in ref_state if not k.startswith("value_head."))
        d_pg = max(abs(a - s["pg"]) for a, s in zip(pg, ref_sums))
        print(json.dumps({"weights": d_weights, "moved": moved, "pg": d_pg,
                          "steps": [s.get("steps", 0) for s in sums], "clipped": sum(s["clipped"] for s in ref_sums),
                          "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

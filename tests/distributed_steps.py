"""One reward-model step and one policy update (RLOO, DPO on users' pairs, KTO) on fixed data, in one process or as a
rank under torchrun (tests/test_distributed.py runs it both ways and compares what it saves).

Usage: python tests/distributed_steps.py MODEL_DIR OUT.pt     (or under torchrun --nproc-per-node N)
"""

from __future__ import annotations

import random
import sys

import torch

from duet.wiring import policy_config, reward_config
from trainer.distributed import init_world
from trainer.examples import to_prompt_group
from trainer.lora import adapter_state_dict
from trainer.policy import PolicyTrainer
from trainer.reward_trainer import RewardTrainer
from trainer.synthetic import marker_event


def main(model: str, out: str) -> None:
    torch.manual_seed(0)
    world = init_world(torch.device("cpu"))
    rng = random.Random(3)
    groups = [to_prompt_group(marker_event(rng, k=rng.choice([2, 3]))) for _ in range(10)]
    # thumbs on two answers: KTO's share too
    labelled = [to_prompt_group(marker_event(rng).model_copy(update={"choice": "both_bad", "ranking": None}))
                for _ in range(3)]

    rm = RewardTrainer(reward_config(backbone=model, lr=1e-3, max_tokens=96, precision="fp32"), world=world)
    reward_init = {k: v.clone() for k, v in rm.model.state_dict().items()}
    rm_out = rm.train_on(groups, n_new=len(groups))

    pt = PolicyTrainer(policy_config(precision="fp32", k=4, groups_per_round=8, steps_per_round=2, min_spread=0.0,
                                     max_new_tokens=8, prompts_per_step=2, micro_batch=2), model, world)
    adapters_init = {k: v.clone() for k, v in adapter_state_dict(pt.model).items()}
    gen = torch.Generator().manual_seed(1)

    def rollouts(prompt_ids: list[list[int]], n: int) -> list[list[list[int]]]:  # as serving would answer
        return [[torch.randint(100, 2000, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(n)] for _ in prompt_ids]

    prompts = [g.messages for g in groups[:6]]
    rloo = pt.rloo_round(prompts, lambda m, answers: torch.tensor([-len(a) / 10 for a in answers]), rollouts)
    dpo = pt.pair_round(groups)
    if world.main:  # rank 0 alone forgets its reference cache (as when it alone restarts from base): the ranks'
        pt.ref_cache.clear()  # caches differ, and the next DPO steps must still pair each value with its key
    dpo_again = pt.pair_round(groups)
    kto = pt.signal_round(labelled, z_ref=0.1)
    if world.main:
        torch.save({"world": world.size, "reward": rm.model.state_dict(), "adapters": adapter_state_dict(pt.model),
                    "reward_init": reward_init, "adapters_init": adapters_init,
                    "losses": [rm_out["loss"], rloo["loss"], dpo["dpo_loss"], dpo_again["dpo_loss"], kto["kto_loss"]],
                    "grad_norms": [rm_out["grad_norm"], rloo["grad_norm"]],
                    "groups_trained": rloo["groups_trained"]}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

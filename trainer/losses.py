"""Losses, as pure functions of tensors: the reward model's (Bradley–Terry, prompt-aware) and the policy's
(RLOO with PPO's clipped ratio, DPO with label smoothing, KTO, SFT). All return a scalar mean over the batch.

Notation: r_w, r_l are the rewards (logits) of the preferred and the other answer; σ is the sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: L = −log σ(r_w − r_l)."""
    return -F.logsigmoid(r_w - r_l).mean()


def tie_loss(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Ties: the Bradley–Terry likelihood with target ½. With d = r_a − r_b,
    L = −½ log σ(d) − ½ log σ(−d), minimised (at log 2) when r_a = r_b."""
    d = r_a - r_b
    return (-0.5 * F.logsigmoid(d) - 0.5 * F.logsigmoid(-d)).mean()


def kwise_loss(rewards: torch.Tensor, pairs: list[tuple[int, int]], ties: list[tuple[int, int]] = ()) -> torch.Tensor:
    """K-wise ranking of one prompt (InstructGPT): the mean over its C(K,2) pairs,
    L = 1/|P| Σ_{(w,l)∈P} −log σ(r_w − r_l)  (+ tie terms for pairs ranked equal),
    so a prompt counts once however many pairs its ranking yields."""
    terms = []
    if pairs:
        w, l = zip(*pairs)
        terms.append(-F.logsigmoid(rewards[list(w)] - rewards[list(l)]))
    if ties:
        a, b = zip(*ties)
        d = rewards[list(a)] - rewards[list(b)]
        terms.append(-0.5 * F.logsigmoid(d) - 0.5 * F.logsigmoid(-d))
    if not terms:
        return rewards.sum() * 0.0
    return torch.cat(terms).mean()


def utility(x: torch.Tensor, open_ended: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """Prompt-aware utility U (Song et al., 2023, "Reward Collapse", arXiv 2305.17608):
    U(x) = x for closed-ended prompts; U(x) = −1/x for open-ended ones, which has no finite value at
    x ≤ 0, so below ε it continues as its tangent at ε: U(x) = −1/ε + (x − ε)/ε²."""
    safe = torch.clamp(x, min=eps)
    concave = torch.where(x >= eps, -1.0 / safe, -1.0 / eps + (x - eps) / eps**2)
    return torch.where(open_ended, concave, x)


def prompt_aware_loss(logit_w: torch.Tensor, logit_l: torch.Tensor, open_ended: torch.Tensor,
                      eps: float = 0.05) -> torch.Tensor:
    """Maximise Σ U(R_w − R_l) over the bounded rewards R = σ(logit): L = −mean U(σ(logit_w) − σ(logit_l))."""
    return -utility(torch.sigmoid(logit_w) - torch.sigmoid(logit_l), open_ended, eps).mean()


# --- policy losses -----------------------------------------------------------------------


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al., 2023), on sequence log-probabilities log π(y|x), with h the margin
    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    L = −(1 − ε) log σ(β h) − ε log σ(−β h)
    ε = 0 is DPO; ε > 0 (conservative DPO, Mitchell 2023) assumes a share ε of the labels is flipped, so a
    careless vote cannot push a margin without bound (the loss is minimised at a finite β h = log((1−ε)/ε))."""
    h = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return (-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)).mean()


def kl_penalized_rewards(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """The reward RLOO maximises, with the KL anchor folded in (TRL's RLOO; Ahmadian et al. 2024), per sample:
    r̃_i = r_i − β · kl_i,  kl_i = Σ_t (log π(y_t) − log π_ref(y_t)),  treated as a constant (detached).

    Why in the reward and not as a loss term: for y ~ π, the score-function gradient E[r̃ ∇ log π(y)]
    (differentiating log π inside r̃ adds β E[∇ log π] = 0) equals ∇(E[r] − β KL(π‖π_ref)). A loss term
    β Σ_t (log π(y_t) − log π_ref(y_t)) on π's own samples instead has gradient β ∇ log π(y), zero in
    expectation: it does not pull the policy back at all."""
    return (rewards - beta * kl).detach()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out baseline over the k samples of each prompt (rewards: [prompts, k]):
    A_i = r_i − 1/(k−1) Σ_{j≠i} r_j."""
    k = rewards.shape[-1]
    return rewards - (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)


def rloo_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """RLOO policy-gradient loss (logp, mask: [samples, tokens]; advantages: [samples], from
    `kl_penalized_rewards` then `rloo_advantages`): L = −mean_i A_i · Σ_t log π(y_t)."""
    return (-advantages.detach() * (logp * mask).sum(-1)).mean()


def rloo_clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                      eps: float = 0.2) -> torch.Tensor:
    """RLOO on samples drawn by an earlier policy π_old (a later step of the same round), with PPO's clipped
    per-token importance ratio ρ_t = π(y_t)/π_old(y_t) (as TRL's RLOO / GRPO):
    L = −mean_i Σ_t m_t · min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε) A_i).
    At π = π_old (ρ = 1) its gradient is `rloo_loss`'s: ∇ρ_t = ∇ log π(y_t)."""
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach().unsqueeze(-1)
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    return -(per_token * mask).sum(-1).mean()


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """KTO's class weights (λ_D, λ_U) that correct for label imbalance: λ_D n_D = λ_U n_U (the paper asks for
    λ_D n_D / λ_U n_U ∈ [1, 4/3]; 1 is its lower end), normalised so the weights average 1 over the examples:
    λ_D = N / (2 n_D), λ_U = N / (2 n_U), N = n_D + n_U. With only one kind, that kind weighs 1."""
    n = n_desirable + n_undesirable
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    return n / (2 * n_desirable), n / (2 * n_undesirable)


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z_ref: float | torch.Tensor,
             beta: float, w_desirable: float = 1.0, w_undesirable: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al., 2024, arXiv 2402.01306) on unpaired good / bad answers, per example i with
    sequence log-probabilities pi = log π(y|x), ref = log π_ref(y|x):
        r_i = log π(y_i|x_i) − log π_ref(y_i|x_i)
        v_i = λ_D σ(β (r_i − z_ref))   if y_i is desirable,   λ_U σ(β (z_ref − r_i))   if undesirable
        L   = mean_i (λ_i − v_i)
    z_ref, the reference point, is an estimate of KL(π‖π_ref) ≥ 0 treated as a constant: raising one
    answer's likelihood only pays beyond what the policy has drifted overall."""
    z = torch.as_tensor(z_ref, dtype=pi.dtype, device=pi.device).detach().clamp(min=0)
    r = pi - ref.detach()
    lam = torch.where(desirable, torch.full_like(r, w_desirable), torch.full_like(r, w_undesirable))
    v = lam * torch.where(desirable, torch.sigmoid(beta * (r - z)), torch.sigmoid(beta * (z - r)))
    return (lam - v).mean()


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning on demonstrations (logp, mask: [examples, tokens]): the mean over examples of
    the per-token negative log-likelihood, L = mean_i −(Σ_t log π(y_t) m_t) / Σ_t m_t, so a long edit
    counts as much as a short one."""
    return (-(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def pointwise_loss(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """The reward model on thumbs (and both-bad) labels: logistic regression of the label on the reward,
    L = mean_i −log σ(s_i r_i), s_i = +1 for a desirable answer, −1 for an undesirable one. The
    Bradley–Terry terms fix only differences of rewards; this term also gives σ(r) the meaning
    "chance of a thumbs-up", on the same scale."""
    sign = desirable.to(rewards.dtype) * 2 - 1
    return -F.logsigmoid(sign * rewards).mean()

"""One policy round at the defaults, timed and weighed (prints JSON): where a round's time and the trainer's
memory go, on this machine (CPU) or a GPU when torch sees one.

Builds what `duet train` builds from default settings (SmolLM2-135M-Instruct policy as fp32 LoRA adapters on
the frozen base, all-MiniLM-L6-v2 reward model and gate judges), pinned to the cores `duet up` gives the trainer
on this machine (duet/cpus.py) and in the precision it picks (DUET_TRAINER_PRECISION=fp32 to compare), trains the
reward model on --votes synthetic votes (the answer with a marker word wins), then runs --rounds policy rounds of
the default size (16 prompts × k, DPO on users' pairs, gate on the 48 gate prompts × 2 samples a side). With no
serving here, the RLOO samples come from HF `generate` (slower than serving's engine: `sample_s` is not what a
served round spends). Peak RSS is read from the kernel (VmHWM, reset before each phase through
/proc/self/clear_refs).

With --ranks N the same work runs as N data-parallel ranks under torchrun (trainer/distributed.py; gloo on CPUs),
each rank on its share of the trainer's cores (one core here: the ranks share it; DUET_CPU_SPLIT=off gives them
every core), and `ranks` in the result says so: compare its `seconds` with a 1-rank run's.

Usage: python bench/trainer_round.py [--rounds 2] [--prompts 16] [--gate-prompts 16] [--sample-batch 128] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # keep bench/ from shadowing packages

import torch  # noqa: E402

import feedback  # noqa: E402,F401  (the package, before bench/ joins the path: bench/feedback.py shares its name)
from duet.settings import Settings  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # for benchlib
from benchlib import scratch_home  # noqa: E402
from trainer.examples import to_prompt_group  # noqa: E402
from trainer.synthetic import marker_event  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def watch_phases(svc) -> tuple[dict[str, int], dict[str, float]]:
    """Peak RSS (MB) and seconds of each phase of a round — RLOO (with its local sampling here), DPO, signals, export, the
    gate's live/base answers, the gate and, within it, its parts (loading the candidate, its answers, the KL
    pass, the release checks, the judges) — each measured from its own start. The kernel keeps one peak, reset at
    every phase's start, so what it held until then is first credited to every phase still open."""
    import trainer.gate as gate_module
    import trainer.rounds as rounds_module

    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    open_phases: list[str] = []

    def credit(names) -> None:
        hwm = round(rss_mb("VmHWM"))
        for n in names:
            peaks[n] = max(peaks.get(n, 0), hwm)

    def watched(name, fn):
        def run(*a, **kw):
            credit(open_phases)
            reset_peak()
            open_phases.append(name)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t, 2)
                open_phases.pop()
                credit([name, *open_phases])
        return run

    pt = svc.rounds.pt
    for name in ("rloo_round", "pair_round", "signal_round", "export", "sample"):
        setattr(pt, name, watched(name, getattr(pt, name)))
    svc.rounds._gate_answers = watched("gate_answers(live, base)", svc.rounds._gate_answers)
    rounds_module.evaluate = watched("gate", rounds_module.evaluate)
    gate_module._model = watched("gate: load candidate", gate_module._model)
    gate_module.gate_answers = watched("gate: answers", gate_module.gate_answers)
    gate_module._judged = watched("gate: judges", gate_module._judged)
    pt.sequence_kl = watched("gate: KL", pt.sequence_kl)
    if svc.rounds.checker is not None:
        svc.rounds.checker.run = watched("gate: release checks", svc.rounds.checker.run)
    rounds_module.probe_logprobs = watched("probe log-probs", rounds_module.probe_logprobs)
    return peaks, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--votes", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=Settings().policy_prompts)
    ap.add_argument("--gate-prompts", type=int, default=Settings().gate_prompts)
    ap.add_argument("--sample-batch", type=int, default=0,
                    help="sequences per local generate call (0: the default, PolicyConfig.sample_batch)")
    ap.add_argument("--no-warm", action="store_true",
                    help="skip what `duet train` does while idle before its first round (the base's gate answers and "
                         "release-check values): the first round then computes them itself")
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel ranks under torchrun (1: one process)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.ranks > 1 and "RANK" not in os.environ:  # become torchrun, which starts the ranks
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={args.ranks}", *sys.argv])

    from duet.wiring import build_trainer

    s = Settings(kafka_bootstrap="unused:9092", home=scratch_home("duet-round-"))
    from duet.cpus import available_cpus, plan_split, pin_trainer, rank_cpus

    split = plan_split(available_cpus(), s.serving_cpus, s.trainer_cpus) if s.cpu_split == "auto" else None
    cores = split.trainer if split else available_cpus()
    pin_trainer(rank_cpus(cores, int(os.environ.get("LOCAL_RANK", "0")), args.ranks))
    rss0 = rss_mb()
    t = time.perf_counter()
    svc = build_trainer(s)
    svc.rounds.cfg.bootstrap = ""  # no broker here: publish to the scratch registry, announce nothing
    load_s = time.perf_counter() - t
    if not svc.world.main:  # rank > 0: its share of each step rank 0 takes below
        svc.follow_rank0()
        return
    with svc.leading():
        result = measure(svc, args, load_s, rss0, cores)
    out = Path(args.out or f"bench/results/trainer_round-{result['precision']}"
               f"{'-ranks%d' % args.ranks if args.ranks > 1 else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def measure(svc, args, load_s: float, rss0: float, cores) -> dict:
    """Rank 0 (or the one process): reward-model steps, the warm-up, then the rounds, timed and weighed."""
    from trainer.precision import cpu_has_fast_bf16

    rss_loaded = rss_mb()
    rng = random.Random(0)
    groups = [to_prompt_group(marker_event(rng)) for _ in range(args.votes)]
    svc.held_out = groups[:8]  # the reward model's accuracy; the gate samples its own prompts
    reset_peak()
    t = time.perf_counter()
    for i in range(0, len(groups), 8):
        svc.reward_step(groups[i:i + 8])
    rm_s = (time.perf_counter() - t) / max(1, len(groups) // 8)
    rm_peak = rss_mb("VmHWM")
    svc.cfg.policy_prompts, svc.rounds.cfg.gate.prompts = args.prompts, args.gate_prompts
    if args.sample_batch:
        svc.rounds.pt.cfg.sample_batch = args.sample_batch
    phase_peaks, phase_seconds = watch_phases(svc)
    warm_s = None
    if not args.no_warm:  # as the trainer does while idle before its first round (TrainerService.warm_gate)
        t = time.perf_counter()
        svc.rounds.warm(svc.gate_prompts())
        warm_s = round(time.perf_counter() - t, 1)
        phase_peaks.clear(), phase_seconds.clear()
    rounds = []
    for r in range(args.rounds):
        reset_peak()
        t = time.perf_counter()
        result = svc.policy_round()
        total = time.perf_counter() - t
        rounds.append({"seconds": round(total, 1), "published": result.published is not None,
                       "reasons": result.gate.reasons, "peak_rss_mb": round(rss_mb("VmHWM")),
                       **{k: v for k, v in result.train_metrics.items() if k.endswith("_s") or k in
                          ("kl", "changed_fraction", "answer_tokens", "updates", "groups_trained",
                           "informative_fraction", "dpo_pairs")},
                       "gate_kl": result.gate.metrics.get("kl"), "judged_win_rate": result.gate.metrics.get("win_rate"),
                       "peak_rss_mb_by_phase": dict(phase_peaks), "seconds_by_phase": dict(phase_seconds)})
        phase_peaks.clear(), phase_seconds.clear()
        print(json.dumps(rounds[-1]), file=sys.stderr)

    def mb(module) -> float:
        return round(sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20)

    pt = svc.rounds.pt
    adapters = [p for p in pt.model.parameters() if p.requires_grad]
    result = {
        "device": str(pt.device), "ranks": svc.world.size, "torch_threads": torch.get_num_threads(),
        "cores": list(cores),
        "precision": "bf16" if pt.bf16 else "fp32", "cpu_bf16_instructions": cpu_has_fast_bf16(),
        "policy_prompts": args.prompts, "k": pt.cfg.k, "sample_batch": pt.cfg.sample_batch,
        "max_new_tokens": pt.cfg.max_new_tokens,
        "gate_prompts": args.gate_prompts, "warm_s": warm_s, "load_s": round(load_s, 1), "rm_step_s": round(rm_s, 2),
        "rss_mb": {"python+torch": round(rss0), "all loaded": round(rss_loaded), "peak during RM steps": round(rm_peak)},
        "weights_mb": {"policy base fp32 (also the reference)": mb(pt.model) - round(sum(p.numel() * 4 for p in adapters) / 2**20),
                       "adapters fp32": round(sum(p.numel() * 4 for p in adapters) / 2**20),
                       "adam moments": round(sum(p.numel() * 8 for p in adapters) / 2**20),
                       "reward model": mb(svc.reward.model), "judge encoder": mb(svc.rounds.judges.encoder.model)},
        "rounds": rounds,
    }
    return result


if __name__ == "__main__":
    main()

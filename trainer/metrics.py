"""Prometheus metrics of the trainer (served on its own port by `duet train`)."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("duet_trainer_events_total", "Vote events consumed, by what became of them",
                 ["outcome"])  # trained, held_out, quarantined
QUARANTINED_VOTERS = Counter("duet_trainer_quarantined_voters_total", "Voters quarantined: their agreement with "
                             "the reward model fell below chance with confidence (trainer/voters.py)")
VOTES_BY_CHOICE = Counter("duet_trainer_votes_total", "Vote events consumed, by choice, rating or edit", ["choice"])
RM_LOSS = Gauge("duet_rm_loss", "Reward-model loss of the last training step")
RM_ACCURACY = Gauge("duet_rm_heldout_accuracy", "Reward-model accuracy on held-out comparisons (0-1)")
RM_ACCURACY.set(float("nan"))  # not measured yet: NaN, not a misleading 0
CHECKPOINT_FALLBACKS = Counter("duet_trainer_checkpoint_fallbacks_total", "Checkpoints found damaged at start "
                               "(checksum or load failed), moved aside; the trainer resumed from an older one")
RM_STEPS = Counter("duet_rm_steps_total", "Reward-model optimizer steps")
STEP_TIME = Histogram("duet_rm_step_seconds", "Time of one reward-model step",
                      buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
LAG = Gauge("duet_trainer_consumer_lag", "Vote events on Kafka not yet consumed by the trainer")
UNTRAINED = Gauge("duet_trainer_votes_untrained", "Vote events the trainer consumed but has not trained on yet")
CHECKPOINT_TIME = Gauge("duet_trainer_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint")
POLICY_ROUNDS = Counter("duet_policy_rounds_total", "Policy rounds, by result (published, rejected, held, failed)",
                        ["result"])
POLICY_REWARD_MEAN = Gauge("duet_policy_reward_mean", "Mean reward of the last round's samples")
POLICY_REWARD_STD = Gauge("duet_policy_reward_std", "Std of the reward of the last round's samples")
POLICY_SIGNAL_LOSS = Gauge("duet_policy_signal_loss", "Last round's mean loss on users' direct signals, by loss "
                           "(kto: thumbs and both-bad; sft: edits)", ["loss"])
POLICY_SIGNAL_ANSWERS = Counter("duet_policy_signal_answers_total", "Answers the policy trained on directly, by "
                                "kind (desirable, undesirable, edit)", ["kind"])
POLICY_INFORMATIVE = Gauge("duet_policy_informative_fraction", "Share of the last round's RLOO groups whose rewards "
                           "spread enough to carry signal (PolicyConfig.min_spread)")
POLICY_KL = Gauge("duet_policy_kl", "Mean KL (nats per answer) of the last candidate to the reference")
GATE_WIN_RATE = Gauge("duet_gate_win_rate", "The gate judges' win rate of the last candidate against the live "
                      "version on the gate prompts (ties count 1/2)")
GATE_REJECTED_IN_A_ROW = Gauge("duet_gate_consecutive_rejections", "Policy rounds the gate refused since the "
                               "last publication")
GATE_REJECTIONS = Counter("duet_gate_rejections_total", "Candidates the eval gate refused, by reason", ["reason"])
RELEASE_CHECK_FAILURES = Counter("duet_release_check_failures_total", "Release checks candidates failed, by check",
                                 ["check"])
PUBLISHED_VERSION = Gauge("duet_published_version", "Newest published policy version number")
VOTE_TO_PUBLISH = Histogram("duet_vote_to_publish_seconds", "From the oldest vote a version learned from to "
                            "its publication", buckets=(10, 30, 60, 120, 300, 600, 1200, 3600, 7200))

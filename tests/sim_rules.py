"""A preference rule for the end-to-end test, loaded by `duet simulate --rule tests.sim_rules:likes_blue`
(the pluggable-rule path): users like answers that say "blue", the more often the better."""


def likes_blue(prompt: str, answer: str) -> float:
    return float(answer.lower().count("blue"))

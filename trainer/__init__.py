"""Duet trainer: turns users' votes into a reward model and, round by round, a better policy (LoRA adapters on
the frozen base, checked by a gate and release checks, published to the registry). Entry: trainer/service.py."""

"""Prompts for simulated users: topics crossed with request templates. Held-out prompts use topics
never voted on, so the final win rate measures what generalises, not what was memorised."""

from __future__ import annotations

import random

TOPICS = ["the ocean", "bicycles", "volcanoes", "bread baking", "the moon", "honey bees", "chess", "rain",
          "libraries", "trains", "gardening", "coffee", "mountains", "music", "the internet", "owls", "winter",
          "bridges", "photography", "tea", "deserts", "clocks", "football", "rivers", "recycling", "kites",
          "forests", "robots", "maps", "sleep", "cheese", "lighthouses", "penguins", "umbrellas", "dinosaurs",
          "painting", "the sun", "boats", "friendship", "apples"]
KEYWORDS = ["blue", "quick", "simple", "bright", "calm", "green", "small", "warm"]
TEMPLATES = ["Tell me something about {topic}.", "Give me one tip about {topic}.", "Explain {topic} to a child.",
             "Write two sentences about {topic}.", "Why do people like {topic}?", "Describe {topic} briefly."]


def prompt_sets(held_out_topics: int = 8, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts); each ends with a key word for the `keyword` rule."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    held, train = topics[:held_out_topics], topics[held_out_topics:]

    def make(ts: list[str]) -> list[str]:
        return [f"{t.format(topic=topic)} Key word: {KEYWORDS[(i + j) % len(KEYWORDS)]}."
                for i, topic in enumerate(ts) for j, t in enumerate(TEMPLATES)]

    return make(train), make(held)

"""Duet serving: the OpenAI-compatible HTTP API, the vLLM engine, pairing and weight swaps."""

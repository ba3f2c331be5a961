"""pytest-benchmark suites for steermoe: the fused op, its saved activations, the steered encoder, a train step."""

"""A run: the input pipeline, the loop, the recipes' phases, preemption, TensorBoard summaries."""

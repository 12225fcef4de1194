"""The sampling engine (private): N stochastic forward passes of one batch, drawn in batch, checked.

One module per concern, lowest first:

* :mod:`~mcdrop.engine.rng` -- who may draw from torch's generators; snapshots; seeded streams.
* :mod:`~mcdrop.engine.probe` -- observing one forward pass (random draws, trunk FLOPs, peak bytes).
* :mod:`~mcdrop.engine.fastdropout` -- faster same-law dropout masks on the CPU.
* :mod:`~mcdrop.engine.inputs` -- preparing, slicing and replicating inputs; copies; generators.
* :mod:`~mcdrop.engine.outputs` -- choosing the output; samples-first reshaping; finite checks.
* :mod:`~mcdrop.engine.plan` -- every sizing rule and constant, as pure functions.
* :mod:`~mcdrop.engine.state` -- the model's state across passes: what checks write, what vmap leaves.
* :mod:`~mcdrop.engine.strategies` -- vmap, replicate, loop: running work items.
* :mod:`~mcdrop.engine.choose` -- the probe pass and trials, returning a decision.
* :mod:`~mcdrop.engine.checks` -- the gate check and the row check, on one harness.
* :mod:`~mcdrop.engine.discover` -- run-time discovery of train-gated randomness the policy missed.
* :mod:`~mcdrop.engine.sample` -- :func:`sample_chunks`, the entry point.

The engine knows nothing of the policy (which modules are random) nor of predictions: it runs the
model it is given, in the modes it is in, and hands back samples-first chunks. Its public face is
:class:`mcdrop.MCDropout`.
"""

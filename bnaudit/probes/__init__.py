"""Dynamic probes: the experiments that back the rules needing data. ``modes`` holds the eval-mode and
running-statistics experiments (co-batch invariance, buffer snapshots, train-vs-eval passes; BN3xx);
``data`` holds the ``inspect --data`` probe (a few train-mode forward passes recorded with
``bnaudit.record``; BN2xx); ``state`` puts a model back after an experiment. Each experiment runs on the
audit's one copy of the model, puts it back afterwards (modes, buffers, parameters) and restores the RNG it
touches."""

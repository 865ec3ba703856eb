"""Dynamic probes: the experiments that back the rules needing data. ``modes`` holds the eval-mode and
running-statistics experiments (co-batch invariance, buffer snapshots, train-vs-eval passes; BN3xx);
``data`` holds the ``inspect --data`` probe (a few train-mode forward passes recorded with
``bnaudit.record``; BN2xx). Each runs on a copy of the audited model and restores the RNG it touches."""

"""Dynamic probes: the experiments that back the rules needing data, one module per experiment.

The BN3xx experiments: ``inference`` (co-batch invariance, what ``predict`` leaves in train mode or changes in
the buffers; BN301, BN306, BN308), ``running_stats`` (the data's train-mode statistics against the running
buffers; BN302, BN303, ``bnaudit recalibrate``), ``train_eval`` (train- vs eval-mode loss, frozen layers'
drift; BN304, BN305) and ``eval_steps`` (eval mode during a recorded training run; BN307), sharing the input
and layer-state helpers of ``common``. ``data`` holds the ``inspect --data`` probe (a few train-mode forward
passes recorded with ``bnaudit.record``; BN2xx); ``state`` puts a model back after an experiment. Each
experiment runs on the audit's one copy of the model, puts it back afterwards (modes, buffers, parameters)
and restores the RNG it touches."""

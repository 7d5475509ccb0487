"""The parts the :class:`~avi_scale.engine.trainer.Trainer` is made of, one concern each:

* :mod:`.model`: the AttentiveVAE under DeepSpeed with its guarded optimizer and EMA (``build_model``),
  BatchNorm statistics averaged over ranks, the weight fingerprint;
* :mod:`.streams`: this rank's training data slots (``TrainStreams``) and the ``train.batch_log`` audit;
* :mod:`.state`: the step and skip counters (``TrainState``), RNG capture/restore, the noise seeds;
* :mod:`.checkpointer`: the client state, saves at most once per step, ``train.resume``;
* :mod:`.validator`: the validation pass and the sample/reconstruction grids of the EMA weights;
* :mod:`.metrics`: the named loss sums (``Sums``), the log window and the ``train`` rows.

Each takes the config sections it reads; those holding state have ``state_dict``/``load_state_dict``.
"""

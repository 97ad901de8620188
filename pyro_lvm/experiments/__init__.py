"""The experiment layer: run configuration, the training loop, checkpoints, run folders,
health checks, schedules, evaluation, loading runs and the run lifecycle.

Data flows one way: data -> models -> inference -> experiments -> CLI. The CLI
(:mod:`pyro_lvm.cli`) only parses; everything a run does lives here, one concept a module:

=================  ==============================================================
``config``         :class:`TrainConfig`, every setting of a run, validated once
``settings``       the CLI's flags, ``--config`` and ``--resume`` -> :class:`TrainConfig`
``trainer``        :class:`Trainer`, minibatch loop with exact resume
``checkpoint``     atomic, two-slot, ``weights_only`` checkpoints
``params``         the Pyro params outside the modules, as checkpoint data
``rundir``         run folders: never overwritten, one writer, strict JSON
``health``         finite-but-hopeless training detection
``schedules``      learning-rate schedules for any driver
``evaluation``     one evaluator for every model
``build``          config -> :class:`Experiment` (shared by training and loading)
``lifecycle``      train / evaluate / sample a run (what the CLI calls)
``runs``           :func:`load_run`
``figures``        the figures of a run (no backend change on import)
``recipes``        the registry: model name -> ``build(config)`` -> :class:`Experiment`
``compare``        ``pyro-lvm compare`` (``compare_figure``: its plot)
``fabric``         the Lightning Fabric launcher for data-parallel runs
=================  ==============================================================
"""

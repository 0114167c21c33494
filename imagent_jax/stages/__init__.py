"""The stages of a run (``config.stages``): each a ``run(config, workdir, report, metrics)``."""

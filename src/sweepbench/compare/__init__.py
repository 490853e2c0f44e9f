"""The sampler comparison (issue 19): which search strategy to trust on a model and budget, over paired seeds.

``spec`` (a study spec with a ``[compare]`` table: samplers, seeds, target; one member study per sampler x seed),
``run`` (the members as normal studies under one comparison parent run in MLflow, resumable; the report logged
to that run and rebuilt from the stores), ``results`` (what the member studies hold, read from Optuna's
storage), ``report`` (the table, verdicts, conclusion and anytime curves) and ``stats`` (the statistics)."""

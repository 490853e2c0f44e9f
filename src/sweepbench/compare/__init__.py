"""The sampler comparison (issue 19): which search strategy to trust on a model and budget, over paired seeds.

Built so far: ``stats``, the statistics (best-so-far curves, IQM with a bootstrap interval, area under the curve,
Wilcoxon signed-rank verdicts with Holm's correction, mean ranks). Not built yet: the ``study compare`` command that
runs one study per sampler and seed under a comparison parent run, and its report."""

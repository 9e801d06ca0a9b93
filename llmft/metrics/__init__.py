"""Offline ``evaluate`` modules: ``evaluate.load(llmft.evaluation.metric_path("bleu"))``. Each is a thin
``evaluate.Metric`` over :mod:`llmft.evaluation`."""

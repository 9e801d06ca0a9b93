"""Offline ``evaluate`` modules: ``evaluate.load(llmft.evaluation.metric_path("bleu"))``. Each is a thin
``evaluate.Metric`` over :mod:`llmft.evaluation`."""


def metric_info(description: str, citation: str):
    """The ``evaluate.MetricInfo`` of a module: its docstring, a citation and the text-pair features."""
    import evaluate

    return evaluate.MetricInfo(description=description, citation=citation, inputs_description="",
                               features=text_pair_features())


def text_pair_features():
    """Input features shared by the modules: one prediction with one reference string or a list of them."""
    import datasets

    return [datasets.Features({"predictions": datasets.Value("string"),
                               "references": datasets.Sequence(datasets.Value("string"))}),
            datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})]

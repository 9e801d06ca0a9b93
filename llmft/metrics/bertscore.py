"""BERTScore precision/recall/F1 lists (as the hub's evaluate "bertscore"), computed by llmft with bert-score; loads
offline: ``evaluate.load(llmft.evaluation.metric_path("bertscore"))``. ``lang`` picks bert-score's default model for
the language ("vi" -> bert-base-multilingual-cased); pass ``model_type=<local dir>`` and ``num_layers`` to run
without the hub."""
import evaluate

from llmft.evaluation import DEFAULT_BERTSCORE_LANG, bertscore, bertscore_model
from llmft.metrics import metric_info


class BERTScore(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Zhang et al., 2020")

    def _compute(self, predictions, references, lang=DEFAULT_BERTSCORE_LANG, model_type=None, num_layers=None,
                 batch_size=64, device=None):
        scores = bertscore(predictions, references, model_type=model_type, num_layers=num_layers, lang=lang,
                           batch_size=batch_size, device=device, aggregate=False)
        if model_type is None:
            model_type, default_layers = bertscore_model(lang)
            num_layers = num_layers or default_layers
        return {**scores, "hashcode": f"llmft-bertscore:{model_type}:L{num_layers}"}

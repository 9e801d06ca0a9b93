"""ROUGE-1/2/L/Lsum F-measures with the hub's evaluate "rouge" settings, computed by llmft with rouge-score, with
words in any script by default (``tokenizer="hub"`` for rouge-score's ASCII-only tokens); loads offline:
``evaluate.load(llmft.evaluation.metric_path("rouge"))``."""
import evaluate

from llmft.evaluation import ROUGE_TYPES, rouge
from llmft.metrics import metric_info


class Rouge(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Lin, 2004")

    def _compute(self, predictions, references, rouge_types=ROUGE_TYPES, use_stemmer=False, use_aggregator=True,
                 tokenizer=None):
        return rouge(predictions, references, rouge_types=rouge_types, use_stemmer=use_stemmer,
                     aggregate=use_aggregator, tokenizer=tokenizer)

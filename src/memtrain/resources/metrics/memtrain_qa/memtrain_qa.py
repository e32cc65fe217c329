"""MemTrain's QA metrics as a Hugging Face ``evaluate`` module: ``evaluate.load(<path to this folder>)``.

Computed by :mod:`memtrain.metrics` itself (no second implementation): EM, sub-EM (MemAgent's accuracy: a
normalised gold inside the normalised prediction) and token F1, all with SQuAD normalisation, on the extracted
answer (``extraction``: ``strict`` = last ``\\boxed{}``, ``lenient`` = box, answer tag, "answer:" line or first line),
and MemTrain's masked-entity match on the raw reply (``masked_entity``: strict boxed; ``masked_entity_lenient``).
Each is the mean over predictions; a prediction is right when it matches any of its accepted answers.
It loads offline (the module is a local file), unlike ``evaluate.load("squad")``.
"""

import datasets
import evaluate

from memtrain.metrics import exact_match, extract_answer, f1_score, masked_entity_match, substring_match


_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: raw model replies (strings).
    references: for each prediction, the list of accepted answers.
    extraction: `lenient` (default) or `strict`, how the answer is taken from a reply for em / sub_em / f1.
Returns:
    em, sub_em, f1, masked_entity, masked_entity_lenient: means over the predictions, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MemtrainQA(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, extraction: str = "lenient") -> dict[str, float]:
        if extraction not in ("strict", "lenient"):
            raise ValueError(f"extraction must be strict or lenient, got {extraction!r}.")
        n = len(predictions)
        if n == 0:
            return {name: float("nan") for name in ("em", "sub_em", "f1", "masked_entity", "masked_entity_lenient")}
        totals = dict.fromkeys(("em", "sub_em", "f1", "masked_entity", "masked_entity_lenient"), 0.0)
        for text, golds in zip(predictions, references):
            golds = list(golds)
            answer = extract_answer(text, extraction)
            totals["em"] += exact_match(answer, golds)
            totals["sub_em"] += substring_match(answer, golds)
            totals["f1"] += f1_score(answer, golds)
            totals["masked_entity"] += float(masked_entity_match(text, golds))
            totals["masked_entity_lenient"] += float(masked_entity_match(text, golds, lenient=True))
        return {name: total / n for name, total in totals.items()}

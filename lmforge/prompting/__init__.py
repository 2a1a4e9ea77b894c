"""Prompt learning: a pretrained language model classifies with few or no labelled examples,
the task turned into text the model was trained on.

- :mod:`.templates`: templates with ``{column}`` slots and a ``{label}`` slot, raw or through the
  model's chat template, YAML template files, built-ins; verbalizers (label → words). Vocabulary
  after OpenPrompt (Ding et al. 2022).
- :mod:`.scoring`: a decoder scores every label word after one prompt pass, the words packed in
  one continuation pass sharing the prompt's KV cache; an encoder fills ``[MASK]`` (cloze, PET).
- :mod:`.calibration`: contextual calibration with content-free inputs (Zhao et al. 2021,
  "Calibrate Before Use") and domain-conditional calibration (Fei et al. 2023).
- :mod:`.demonstrations`: in-context examples chosen at random (seeded, class-balanced) or by
  kNN over sentence embeddings (Liu et al. 2022, KATE), and their order.
- :mod:`.classifier`: zero- and few-shot classification with calibration and template ensembles.

Prompt-based fine-tuning (PET, Schick & Schütze 2021; LM-BFF, Gao et al. 2021) — the template
with the label word as the LM target, any PEFT method, the one training loop — is the task
``prompt_classification`` (:mod:`lmforge.tasks.prompt`); ``lmforge prompt`` runs all of it
through :mod:`lmforge.pipeline.prompting`.
"""

from __future__ import annotations

from .calibration import (
    BATCH_SAMPLES,
    CONTENT_FREE,
    Calibration,
    calibrate,
    content_free_texts,
    domain_texts,
    reference_distribution,
)
from .classifier import PromptClassifier, PromptEncoder, PromptScores
from .demonstrations import Order, Selection, arrange, balanced_sample, embed_texts, nearest, per_class_sample
from .scoring import ClozeScorer, DecoderScorer, WordTable, full_pass_log_probs, label_log_probs
from .templates import (
    BUILTIN,
    LABEL,
    Prompt,
    PromptTemplate,
    Verbalizer,
    read_template_file,
    resolve_templates,
)

__all__ = [
    "BUILTIN",
    "BATCH_SAMPLES",
    "CONTENT_FREE",
    "LABEL",
    "Calibration",
    "ClozeScorer",
    "DecoderScorer",
    "Order",
    "Prompt",
    "PromptClassifier",
    "PromptEncoder",
    "PromptScores",
    "PromptTemplate",
    "Selection",
    "Verbalizer",
    "WordTable",
    "arrange",
    "balanced_sample",
    "calibrate",
    "content_free_texts",
    "domain_texts",
    "embed_texts",
    "full_pass_log_probs",
    "label_log_probs",
    "nearest",
    "per_class_sample",
    "read_template_file",
    "reference_distribution",
    "resolve_templates",
]

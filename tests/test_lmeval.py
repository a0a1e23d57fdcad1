"""The lm-eval bridge: local JSONL tasks (no download) give the same log-likelihoods and the
same generations on a scalelab model as lm-eval's own `hf` model on its exported twin."""

import json
import os

import pytest
import torch

from scalelab.config import ModelConfig
from scalelab.model import Transformer
from scalelab.train.checkpoint import save_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASKS = """
task: toy_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
---
task: toy_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list: [{{metric: word_perplexity}}]
---
task: toy_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


def test_lm_eval_scalelab_matches_hf_twin(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=24, n_layer=2,
                                    n_head=4, n_kv_head=2, d_model=32)).eval()
    save_model(model, tokenizer, tmp_path / "model")
    from scalelab.hf_export import export
    export(tmp_path / "model", tmp_path / "hf", "float32", log=lambda *_: None)

    data = tmp_path / "toy.jsonl"
    rows = [{"question": f"Mia has {i} apples and Tom has {i + 1}. Who has more?",
             "choices": [" Mia", " Tom", " nobody"], "answer": 1} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for k, text in enumerate(TASKS.format(data=data).split("---")):
        (tasks / f"t{k}.yaml").write_text(text.strip() + "\n")

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import scalelab.lmeval  # noqa: F401  (registers the `scalelab` model type)
    manager = TaskManager(include_path=str(tasks))
    names = ["toy_choice", "toy_rolling", "toy_generate"]
    ours = simple_evaluate(model="scalelab", model_args=f"path={tmp_path / 'model'}", batch_size=4,
                           tasks=names, task_manager=manager, log_samples=True, device="cpu")
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                             tasks=names, task_manager=manager, log_samples=True, device="cpu",
                             batch_size=4)
    for task in names:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == len(rows)
        for sa, sb in zip(a, b):
            ra, rb = sa["resps"], sb["resps"]
            if task == "toy_generate":
                assert ra == rb
                continue
            flat_a = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in ra]
            flat_b = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in rb]
            assert flat_a == pytest.approx(flat_b, abs=1e-4), task
    assert any(s["resps"][0][0] for s in ours["samples"]["toy_generate"])  # text came out
    assert ours["results"]["toy_choice"]["acc,none"] == theirs["results"]["toy_choice"]["acc,none"]
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"

"""An lm-eval experiment whose data set cannot be loaded (not in the local Hugging Face
cache on a machine without a hub, or a data file gone): refused when it is added, and a
clean exit 2 when it is run, not a traceback from inside lm-eval (after ~30 s of retries
on a machine without a hub) that stopped every later `track model add` and `track run`."""

import json

import pytest
import torch
from test_track_registry import track

from scalelab.config import ModelConfig
from scalelab.model import Transformer
from scalelab.track.registry import Registry
from scalelab.train.checkpoint import save_model

pytest.importorskip("lm_eval")

TASK = """task: toy_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
"""


def test_lm_eval_task_whose_data_cannot_be_loaded_exits_2(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data, tasks, reg = tmp_path / "toy.jsonl", tmp_path / "tasks", tmp_path / "reg.db"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(TASK.format(data=data))
    add = ["experiment", "add", "--name", "mc", "--lm-eval", "toy_mc", "--include-path",
           str(tasks), "--threshold", "0.5"]
    r = track(reg, *add)  # the data file is not there (yet)
    assert r.returncode == 2, r
    assert "lm-eval task 'toy_mc': its data set could not be loaded" in r.stderr, r.stderr
    assert not reg.exists()

    data.write_text("".join(json.dumps({"question": f"{i} or {i + 1}?", "choices": [" a", " b"],
                                        "answer": i % 2}) + "\n" for i in range(4)))
    assert track(reg, *add).returncode == 0
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1,
                                    n_head=2, d_model=16))
    save_model(model, tokenizer, tmp_path / "m" / "model")
    data.unlink()  # gone since it was added
    r = track(reg, "model", "add", str(tmp_path / "m" / "model"))
    assert r.returncode == 2 and "its data set could not be loaded" in r.stderr, r
    assert Registry(reg).results() == [] and [m["name"] for m in Registry(reg).models()] == ["m"]

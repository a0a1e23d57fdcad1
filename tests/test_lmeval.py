"""The lm-eval bridge: local JSONL tasks (no download) give the same log-likelihoods and the
same generations on a scalelab model as lm-eval's own `hf` model on its exported twin."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
---
task: toy_multi
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{golds}}}}"
metric_list: [{{metric: acc}}]
"""


def toy_model_and_tasks(tmp_path, tokenizer, monkeypatch) -> tuple:
    """A tiny random scalelab model in tmp_path/model, six JSONL questions and their four
    task YAMLs in tmp_path/tasks; the datasets library kept offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=24, n_layer=2,
                                    n_head=4, n_kv_head=2, d_model=32)).eval()
    save_model(model, tokenizer, tmp_path / "model")
    data = tmp_path / "toy.jsonl"
    rows = [{"question": f"Mia has {i} apples and Tom has {i + 1}. Who has more?",
             "choices": [" Mia", " Tom", " nobody"], "answer": 1, "golds": [1, 2]}
            for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for k, text in enumerate(TASKS.format(data=data).split("---")):
        (tasks / f"t{k}.yaml").write_text(text.strip() + "\n")
    return model, tasks, rows


def direct_loglik(model, tokenizer, ctx: str, cont: str) -> tuple[float, int]:
    """(log p(cont | ctx), tokens of cont) from one plain forward pass, no batching; the
    context starts with BOS, as lm-eval encodes it (the tokenizer's post-processor), and
    loses its start where it does not fit the model's context."""
    ids = tokenizer.hf.encode(ctx + cont, add_special_tokens=False).ids
    n = len(ids) - len(tokenizer.hf.encode(ctx, add_special_tokens=False).ids)
    ids = ([tokenizer.bos_id] + ids)[-(model.cfg.seq_len + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
    return logp[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum().item(), n


def scalelab_and_hf(ours: Path, hf: Path, tasks: Path, names: list[str]) -> tuple:
    """simple_evaluate's results for the tasks: the `scalelab` model on folder `ours`, and
    lm-eval's own `hf` model on the Hugging Face folder `hf`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import scalelab.lmeval  # noqa: F401  (registers the `scalelab` model type)
    manager = TaskManager(include_path=str(tasks))
    return tuple(simple_evaluate(model=model, model_args=args, batch_size=4, tasks=names,
                                 task_manager=manager, log_samples=True, device="cpu")
                 for model, args in [("scalelab", f"path={ours}"),
                                     ("hf", f"pretrained={hf},dtype=float32")])


def same_scores(ours: dict, theirs: dict, task: str, n: int) -> None:
    a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
    b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    assert len(a) == len(b) == n
    for sa, sb in zip(a, b):
        flat_a = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in sa["resps"]]
        flat_b = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in sb["resps"]]
        assert flat_a == pytest.approx(flat_b, abs=1e-4), task


def test_lm_eval_scalelab_matches_hf_twin(tmp_path, tokenizer, monkeypatch):
    _, tasks, rows = toy_model_and_tasks(tmp_path, tokenizer, monkeypatch)
    from scalelab.hf_export import export
    export(tmp_path / "model", tmp_path / "hf", "float32", log=lambda *_: None)
    names = ["toy_choice", "toy_rolling", "toy_generate"]
    ours, theirs = scalelab_and_hf(tmp_path / "model", tmp_path / "hf", tasks, names)
    for task in ["toy_choice", "toy_rolling"]:
        same_scores(ours, theirs, task, len(rows))
    a, b = (sorted(r["samples"]["toy_generate"], key=lambda s: s["doc_id"])
            for r in (ours, theirs))
    assert [s["resps"] for s in a] == [s["resps"] for s in b]
    assert any(s["resps"][0][0] for s in ours["samples"]["toy_generate"])  # text came out
    assert ours["results"]["toy_choice"]["acc,none"] == theirs["results"]["toy_choice"]["acc,none"]
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


@pytest.mark.parametrize("bos_processor", [True, False])
def test_lm_eval_scalelab_matches_hf_on_an_imported_folder(tmp_path, tokenizer, monkeypatch,
                                                           bos_processor):
    """On a Hugging Face folder whose tokenizer adds BOS to a text (Llama) or adds nothing
    though it names a bos_token (GPT-2 style): the same log-likelihoods, rolling ones too, as
    lm-eval's `hf` model. A 16-token context cuts contexts and splits rolling windows."""
    from hf_folders import make_hf_folder
    _, tasks, rows = toy_model_and_tasks(tmp_path, tokenizer, monkeypatch)
    folder = make_hf_folder(tmp_path / "hf", seq_len=16, template=None,
                            bos_processor=bos_processor)
    names = ["toy_choice", "toy_rolling"]
    ours, theirs = scalelab_and_hf(folder, folder, tasks, names)
    for task in names:
        same_scores(ours, theirs, task, len(rows))


def test_lm_eval_command_line_knows_scalelab(tmp_path, tokenizer, monkeypatch):
    """lm-eval's own `lm_eval` script (no wrapper) runs `--model scalelab`: the installed
    scalelab_lmeval.pth registers it. Each answer's log-likelihood is checked against a plain
    forward pass of the model over context + continuation."""
    model, tasks, rows = toy_model_and_tasks(tmp_path, tokenizer, monkeypatch)
    script = Path(sys.executable).parent / "lm_eval"
    r = subprocess.run([str(script), "--model", "scalelab", "--model_args",
                        f"path={tmp_path / 'model'}", "--tasks", "toy_choice", "--include_path",
                        str(tasks), "--device", "cpu", "--batch_size", "4", "--log_samples",
                        "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_toy_choice*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == len(rows)
    correct = 0
    for s in samples:
        got = [float(resp[0][0]) for resp in s["resps"]]
        want = []
        for args in s["arguments"].values():
            want.append(direct_loglik(model, tokenizer, args["arg_0"], args["arg_1"])[0])
        assert got == pytest.approx(want, abs=1e-4)
        correct += max(range(len(want)), key=want.__getitem__) == s["doc"]["answer"]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["toy_choice"]["acc,none"] == pytest.approx(correct / len(rows))


def test_tracker_runs_an_lm_eval_task_as_an_experiment(tmp_path, tokenizer, monkeypatch, capsys):
    """`track experiment add --lm-eval TASK --include-path DIR`, then `track model add`: the
    task runs through the bridge and its metrics (lm-eval's and the tracker's continuous
    ones) are recorded, checked against plain forward passes; bad input exits 2."""
    from scalelab.cli import main
    from scalelab.track.registry import Registry
    model, tasks, rows = toy_model_and_tasks(tmp_path, tokenizer, monkeypatch)
    reg = str(tmp_path / "reg.db")
    add = ["track", "experiment", "add", "--registry", reg, "--threshold", "0.5"]
    assert main(add + ["--name", "choice", "--lm-eval", "toy_choice", "--include-path",
                       str(tasks)]) == 0
    assert main(add + ["--name", "gen", "--lm-eval", "toy_generate", "--include-path",
                       str(tasks), "--limit", "4"]) == 0
    assert main(add + ["--name", "multi", "--lm-eval", "toy_multi", "--include-path",
                       str(tasks)]) == 0
    capsys.readouterr()
    assert main(add + ["--name", "x", "--lm-eval", "nope", "--include-path", str(tasks)]) == 2
    assert "lm-eval task 'nope' not found in" in capsys.readouterr().err
    assert main(add + ["--name", "x", "--lm-eval", "toy_choice", "--include-path", str(tasks),
                       "--metric", "edit_distance"]) == 2
    assert main(add + ["--name", "x", "--task", "builtin:qa", "--include-path", "."]) == 2
    assert main(["track", "model", "add", "--registry", reg, str(tmp_path / "model"),
                 "--name", "toy"]) == 0

    results = {r["experiment"]: r for r in Registry(tmp_path / "reg.db").results()}
    choice, gen = results["choice"]["metrics"], results["gen"]["metrics"]
    q = [r["question"] for r in rows]
    lls = [[direct_loglik(model, tokenizer, x, " " + c)[0] for c in r["choices"]]
           for x, r in zip(q, rows)]
    right = [max(range(3), key=ll.__getitem__) == r["answer"] for ll, r in zip(lls, rows)]
    assert choice["mc_accuracy"] == pytest.approx(sum(right) / len(rows))
    assert choice["acc"] == choice["mc_accuracy"]  # lm-eval's own, kept under its name
    probs = [torch.softmax(torch.tensor(ll), 0) for ll in lls]
    brier = [float(((p - torch.eye(3)[r["answer"]]) ** 2).sum()) for p, r in zip(probs, rows)]
    assert choice["brier"] == pytest.approx(sum(brier) / len(rows), abs=1e-5)
    assert results["choice"]["passed"] == (choice["mc_accuracy"] >= 0.5)
    # two right answers (" Tom", " nobody"): right if the argmax is either, as lm-eval's acc
    multi = results["multi"]["metrics"]
    assert multi["mc_accuracy"] == pytest.approx(sum(max(range(3), key=ll.__getitem__) > 0
                                                     for ll in lls) / len(rows))
    assert multi["acc"] == multi["mc_accuracy"]
    brier = [float((1 - p[1] - p[2]) ** 2 + p[0] ** 2) for p in probs]
    assert multi["brier"] == pytest.approx(sum(brier) / len(rows), abs=1e-5)
    assert len(multi["per_item"]["x"]) == len(rows)
    assert results["gen"]["n_items"] == 4 and "exact_match" in gen
    per_token = [ll / n for ll, n in (direct_loglik(model, tokenizer, x, " Tom") for x in q[:4])]
    assert gen["token_logprob"] == pytest.approx(sum(per_token) / 4, abs=1e-4)
    assert gen["per_item"]["x_is"] == "token_logprob" and len(gen["per_item"]["ok"]) == 4

    assert main(["track", "report", "--registry", reg, "--out", str(tmp_path / "rep")]) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "lm_eval:toy_choice" in html and "lm_eval:toy_generate" in html


def test_a_context_that_already_starts_with_bos_gets_no_second_one(tokenizer):
    """As lm-eval's `hf` model: a string that starts with the BOS text is encoded without
    the post-processor's BOS, its leading text read as the token (as transformers reads it)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    from scalelab.lmeval import ScalelabEvalLM
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=24, n_layer=1,
                                    n_head=2, d_model=32)).eval()
    lm = ScalelabEvalLM.around(model, tokenizer)
    theirs = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer.hf.to_str()),
                                     bos_token="<|bos|>")  # a copy, as saved to a file
    text = "Mia has 3 apples"
    want = [tokenizer.bos_id] + tokenizer.encode(text)
    assert lm.tok_encode(text) == theirs.encode(text) == want
    assert lm.tok_encode("<|bos|>" + text) == theirs.encode("<|bos|>" + text,
                                                            add_special_tokens=False) == want
    assert lm.tok_encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_generation_without_max_gen_toks_fits_a_short_context(tokenizer):
    """A generate_until task that sets no max_gen_toks gets the default 256, more than a
    tiny model's whole context: the prompt keeps (at least) half the context and the answer
    runs to the context's end, rather than the run failing."""
    from types import SimpleNamespace

    from scalelab.generate import generate
    from scalelab.lmeval import ScalelabEvalLM
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=24, n_layer=1,
                                    n_head=2, d_model=32)).eval()
    lm = ScalelabEvalLM.around(model, tokenizer)
    question = "Mia has 3 apples and Tom has 4 apples. Who has more apples?"
    (text,) = lm.generate_until([SimpleNamespace(args=(question, {"until": ["\n\n"]}))])
    ids = tokenizer.hf.encode(question).ids[-12:]
    assert len(tokenizer.hf.encode(question).ids) > 12  # the prompt was cut to its end
    new = generate(model, [ids], 24 - len(ids), tokenizer.pad_id, tokenizer.eos_id,
                   temperature=0)[0]
    assert text == tokenizer.decode(new).split("\n\n")[0]


def test_generation_stops_at_the_end_of_document(tokenizer):
    """An imported base model with a chat template (end of turn <|end|> here, end of document
    <|eos|>): generate_until stops at the tokenizer's eos_token, as lm-eval's `hf` model
    does, instead of running past it and appending what follows."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HFTokenizer

    from scalelab.hf_tokenizer import HFStyleTokenizer
    from scalelab.lmeval import ScalelabEvalLM
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = HFStyleTokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()),
                           {"eos_token": "<|eos|>", "chat_template": template})
    assert tok.eos_id != tok.doc_eos_id
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, seq_len=24, n_layer=1, n_head=2,
                                    d_model=32)).eval()

    class Scripted(torch.nn.Module):  # the end of document first, then "x" for ever
        def __init__(self, head):
            super().__init__()
            self.head, self.calls = head, 0

        def forward(self, h):
            logits = self.head(h).clone()
            logits[..., tok.doc_eos_id if self.calls == 0 else tok.encode("x")[0]] = 1e4
            self.calls += 1
            return logits
    model.lm_head = Scripted(model.lm_head)
    lm = ScalelabEvalLM.around(model, tok)
    assert lm.generate_until([SimpleNamespace(args=("Alice", {"until": ["\n"],
                                                              "max_gen_toks": 6}))]) == [""]

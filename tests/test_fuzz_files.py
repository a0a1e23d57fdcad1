"""Property-based bad input in files: prompt/data JSONL files, model folders (config.json,
tokenizer.json, model.safetensors missing, corrupt or of the wrong shape) and registry files
(not SQLite, truncated, foreign or wrong schema). Every case exits 0 or 2; a 2 comes with one
'scalelab: error:' line naming the file at fault, no traceback and nothing on stdout that a
script could mistake for a result. More examples: SCALELAB_FUZZ_EXAMPLES=200."""

import contextlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scalelab import cli  # noqa: E402
from scalelab.config import ModelConfig  # noqa: E402
from scalelab.data.formats import read_conversations, read_preferences, read_prompts  # noqa
from scalelab.model import Transformer  # noqa: E402
from scalelab.train.checkpoint import save_model  # noqa: E402

EXAMPLES = int(os.environ.get("SCALELAB_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))  # an exception here is the traceback a user would see
    return rc, out.getvalue(), err.getvalue()


def exits_0_or_2_naming(rc: int, out: str, err: str, names: str, case) -> None:
    assert rc in (0, 2), (case, err)
    if rc == 2:
        lines = [x for x in err.splitlines() if x.startswith("scalelab: error")]
        assert len(lines) == 1, (case, err)
        assert names in lines[0], (case, lines[0])
        assert "Traceback" not in err and not out.strip(), (case, out, err)


# ---- prompt and data files ------------------------------------------------------------------

LINES = [
    '{"prompt": "Mia has 3 apples.", "completion": "3"}', '{"prompt": "hi"}',
    '{"prompt": "a", "chosen": "b", "rejected": "c"}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
    '{"messages": []}', '{"messages": [{"role": "robot", "content": 1}]}', '{"prompt": ""}',
    '{"prompt": 3}', '{"prompt": null}', '{"prompt": ["a"]}', '[1, 2]', '"text"', "42", "{",
    '{"prompt": "a"', "", "   ", "\ufeff{\"prompt\": \"bom\"}", '{"completion": "x"}', "{}",
    '{"prompt": "\\ud800"}', "null", '{"prompt": "a", "chosen": "", "rejected": "c"}',
]


@st.composite
def jsonl_bytes(draw) -> bytes:
    lines = draw(st.lists(st.sampled_from(LINES), min_size=0, max_size=5))
    data = "\n".join(lines).encode()
    if draw(st.booleans()) and data:  # cut anywhere, or a byte that is not UTF-8
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 5)) == 0:
        data += b"\xff\xfe"
    return data


@FUZZ
@given(jsonl_bytes())
@example(b"\xff")  # not UTF-8
@example(b'{"prompt": "\\ud800"}')  # a lone surrogate, legal JSON
def test_any_prompt_or_data_file_is_read_or_refused_with_its_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        for read in (read_prompts, read_conversations, read_preferences):
            try:
                rows = read(path)
            except cli.UserError as e:
                assert str(e).startswith(str(path)), (data, e)  # names the file (and line)
                continue
            assert rows and all(isinstance(r, (str, list, tuple)) for r in rows)


def test_bad_prompt_file_for_ppo_exits_2_leaving_nothing(tmp_path, model_dir):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    out = tmp_path / "run"
    rc, so, se = run("ppo", "--policy", str(model_dir), "--reward", "builtin:gold", "--prompts",
                     str(bad), "--out", str(out))
    exits_0_or_2_naming(rc, so, se, f"{bad}:2", "ppo prompts")
    assert rc == 2 and not out.exists()


# ---- model folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("good") / "model"
    save_model(Transformer(ModelConfig(vocab_size=512, seq_len=32, n_layer=1, n_head=2,
                                       d_model=16)), tokenizer, d)
    return d


def damage(folder: Path, file: str, how: str, value) -> None:
    """One injury to one file of a model folder."""
    path = folder / file
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * value)])
    elif how == "garbage":
        path.write_bytes(bytes(value))
    elif how == "set" and file.endswith(".json"):  # a key of the JSON set to another value
        try:
            obj = json.loads(path.read_text())
        except ValueError:  # an earlier injury already broke it
            return
        key, v = value
        if isinstance(obj, dict):
            obj[key] = v
        path.write_text(json.dumps(obj))


INJURIES = st.one_of(
    st.tuples(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors"]),
              st.just("delete"), st.none()),
    st.tuples(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors"]),
              st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors"]),
              st.just("garbage"), st.lists(st.integers(0, 255), max_size=40)),
    st.tuples(st.just("config.json"), st.just("set"), st.tuples(
        st.sampled_from(["d_model", "n_layer", "n_head", "vocab_size", "seq_len", "mlp",
                         "rope_theta", "tie_embeddings", "bogus", "norm_eps", "n_kv_head"]),
        st.sampled_from([-3, 0, 1, 7, 24, 2**40, 1.5, "x", None, True, [1], {}]))),
    st.tuples(st.just("tokenizer.json"), st.just("set"), st.tuples(
        st.sampled_from(["merges", "vocab", "model", "version", "special"]),
        st.sampled_from([None, 3, "x", [], {}, [[1, 2]]]))),
)


@FUZZ
@given(st.lists(INJURIES, min_size=1, max_size=2))
@example([("config.json", "set", ("d_model", 24))])  # shapes that don't match the weights
@example([("config.json", "set", ("vocab_size", 7))])
@example([("tokenizer.json", "set", ("merges", [[1, 2]]))])
@example([("config.json", "set", ("seq_len", 1))])  # no room for the prompt: which model's?
def test_any_damaged_model_folder_exits_0_or_2_naming_it(model_dir, injuries):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(model_dir, folder)
        for file, how, value in injuries:
            if (folder / file).exists():
                damage(folder, file, how, value)
        rc, out, err = run("generate", "--model", str(folder), "--prompt", "Mia has",
                           "--max-new-tokens", "2")
        exits_0_or_2_naming(rc, out, err, str(folder), injuries)
        reg = Path(tmp) / "reg.db"
        rc, out, err = run("track", "model", "add", str(folder), "--no-run",
                           "--registry", str(reg))
        exits_0_or_2_naming(rc, out, err, str(folder), injuries)


# ---- registry files --------------------------------------------------------------------------

def good_registry(path: Path) -> None:
    from scalelab.track.registry import Registry
    reg = Registry(path)
    reg.add_experiment("e", "builtin:qa", "exact_match", 0.5)
    reg.db.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, as if copied
    reg.close()


def sql_registry(path: Path, statements: list[str]) -> None:
    good_registry(path)
    db = sqlite3.connect(path)
    for s in statements:
        with contextlib.suppress(sqlite3.Error):
            db.execute(s)
    db.commit()
    db.close()


DAMAGE_SQL = [
    "DROP TABLE results", "DROP TABLE models", "DROP TABLE scalelab_registry",
    "UPDATE scalelab_registry SET value = '99'", "DELETE FROM scalelab_registry",
    "ALTER TABLE experiments DROP COLUMN threshold", "ALTER TABLE models RENAME TO m2",
    "UPDATE experiments SET threshold = 'high'", "UPDATE experiments SET task = 'builtin:nope'",
    "UPDATE experiments SET metric = 'bogus'", "CREATE TABLE other (x)",
    "INSERT INTO models (name, path, kind, params, non_embedding_params, created) "
    "VALUES ('m', '/nowhere', 'scalelab', 'many', 1, 'now')",
    "INSERT INTO results (experiment_id, model_id, metrics, passed, samples, n_items, seconds, "
    "code_version, time) VALUES (1, 1, '{bad', 1, '[]', 1, 0.0, 'x', 'now')",
]


@st.composite
def registry_file(draw):
    kind = draw(st.sampled_from(["bytes", "truncated", "sql", "empty"]))
    if kind == "bytes":
        return kind, bytes(draw(st.lists(st.integers(0, 255), max_size=200)))
    if kind == "truncated":
        return kind, draw(st.floats(0.0, 0.99))
    if kind == "sql":
        return kind, draw(st.lists(st.sampled_from(DAMAGE_SQL), min_size=1, max_size=3))
    return kind, None


@FUZZ
@given(registry_file())
@example(("bytes", b"SQLite format 3\x00" + bytes(84)))  # a header and nothing else
@example(("sql", ["UPDATE experiments SET threshold = 'high'"]))
@example(("sql", ["ALTER TABLE models RENAME TO m2"]))
def test_any_damaged_registry_exits_0_or_2_naming_it(case):
    kind, value = case
    with tempfile.TemporaryDirectory() as tmp:
        reg = Path(tmp) / "reg.db"
        if kind == "bytes":
            reg.write_bytes(value)
        elif kind == "truncated":
            good_registry(reg)
            data = reg.read_bytes()
            reg.write_bytes(data[:int(len(data) * value)])
        elif kind == "sql":
            sql_registry(reg, value)
        else:
            reg.write_bytes(b"")
        for argv in (["status"], ["status", "--json"], ["experiment", "list"],
                     ["model", "list"], ["experiment", "show", "e"], ["backtest"]):
            rc, out, err = run("track", *argv, "--registry", str(reg))
            exits_0_or_2_naming(rc, out, err, str(reg), (case, argv))

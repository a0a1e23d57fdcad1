"""`scalelab serve`: the OpenAI API through the official client against a live uvicorn server
on a loopback port, the web app in a real headless Chromium, and a short load test."""

import asyncio
import importlib.util
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from scalelab.config import UserError, load_config, resolve_config_path
from scalelab.data.formats import read_preferences
from scalelab.generate import generate
from scalelab.model import Transformer
from scalelab.train.checkpoint import load_model, save_model

pytest.importorskip("fastapi", reason="scalelab[serve] not installed")
uvicorn = pytest.importorskip("uvicorn", reason="scalelab[serve] not installed")
openai = pytest.importorskip("openai", reason="the official openai client is a dev dependency")
httpx = pytest.importorskip("httpx")

from scalelab.serve.app import ServeOptions, check_host, create_app, load_engines  # noqa: E402
from scalelab.serve.web import LabelStore  # noqa: E402

KEY = "test-key-123"
PRETRAIN = ["model.seq_len=128", "model.n_layer=2", "model.n_head=2", "model.d_model=32",
            "data.n_docs=1000", "data.tokenizer_vocab=400", "train.batch_size=8",
            "train.eval_every=100", "train.checkpoint_every=100", "train.warmup_steps=5",
            "train.lr=0.01", "train.max_steps=40"]


class LiveServer:
    """uvicorn in a thread, on a loopback port the OS picked."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from scalelab.track.registry import Registry
    from scalelab.train.pretrain import pretrain
    root = tmp_path_factory.mktemp("serve")
    tiny = pretrain(load_config(resolve_config_path("tiny"), PRETRAIN), root / "pt")
    model, tok = load_model(tiny)
    torch.manual_seed(1)
    save_model(Transformer(model.cfg), tok, root / "untrained" / "model")
    reg = Registry(root / "registry.db")
    eid = reg.add_experiment("add-small", "addition", "exact_match", 0.5)
    mid = reg.add_model({"name": "tiny", "path": str(tiny), "kind": "scalelab", "params": 9000,
                         "non_embedding_params": 4000, "tokens": 10**5, "flops": 1e9,
                         "val_loss": 3.9, "lineage": "base"})
    reg.add_result(eid, mid, {"exact_match": 0.25}, False, [], 8, 1.0, "test")
    reg.close()
    opts = ServeOptions(models={"tiny": str(tiny), "untrained": str(root / "untrained/model")},
                        labels=str(root / "labels.jsonl"), registry=str(root / "registry.db"))
    engines = load_engines(opts)
    open_server = LiveServer(create_app(engines, opts))
    keyed = ServeOptions(**{**opts.__dict__, "api_key": KEY,
                            "labels": str(root / "labels-keyed.jsonl")})
    key_server = LiveServer(create_app(engines, keyed))
    yield {"root": root, "engines": engines, "url": open_server.url, "key_url": key_server.url,
           "tiny": tiny, "labels": root / "labels.jsonl"}
    open_server.stop()
    key_server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0)


def greedy_reference(engine, prompt_ids, max_new):
    """The same answer computed by scalelab.generate, one prompt alone."""
    new = generate(engine.model, [prompt_ids], max_new, engine.tok.pad_id, engine.tok.eos_id,
                   temperature=0.0)[0]
    return engine.tok.decode(new)


MSGS = [{"role": "user", "content": "Where does Alice live?"}]


def test_models_and_health(setup, client):
    assert {m.id for m in client.models.list().data} == {"tiny", "untrained"}
    h = httpx.get(setup["url"] + "/health").json()
    assert h["status"] == "ok" and set(h["models"]) == {"tiny", "untrained"}


def test_chat_greedy_matches_generate_and_streams_the_same(setup, client):
    eng = setup["engines"]["tiny"]
    ref = greedy_reference(eng, eng.tok.encode_chat(MSGS, True)[0], 24)
    r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0,
                                       max_tokens=24)
    assert r.choices[0].message.content == ref
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(eng.tok.encode_chat(MSGS, True)[0])
    kw = dict(model="untrained", messages=MSGS, temperature=1.0, seed=2, max_tokens=24)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(deltas) > 3 and "".join(deltas) == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    raw = httpx.post(setup["url"] + "/v1/chat/completions", json={
        "model": "tiny", "messages": MSGS, "max_tokens": 4, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_seed_and_top_p(client):
    kw = dict(model="untrained", messages=MSGS, max_tokens=12, temperature=1.0, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert len(texts) == 3 and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # three samples, not one copied
    # top_p = 0 keeps only the most likely token: the greedy answer
    g = client.chat.completions.create(model="untrained", messages=MSGS, max_tokens=12,
                                       temperature=0)
    p = client.chat.completions.create(model="untrained", messages=MSGS, max_tokens=12,
                                       temperature=1.0, top_p=0.0, seed=3)
    assert p.choices[0].message.content == g.choices[0].message.content


def test_stop_strings(client):
    kw = dict(model="untrained", messages=MSGS, max_tokens=30, temperature=1.0, seed=5)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 13, full
    stop = full[10:13]
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(**kw, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    kw = dict(model="untrained", prompt="Alice lives", max_tokens=20, temperature=1.0, seed=9)
    full = client.completions.create(**kw).choices[0].text
    stop = full[8:10]
    done = client.completions.create(**kw, stop=stop).choices[0]
    assert done.text == full[:full.index(stop)] and done.finish_reason == "stop"


def test_completions_logprobs_and_echo(setup, client):
    eng = setup["engines"]["tiny"]
    prompt = "Alice lives in"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and "".join(lp.tokens) == prompt
    ids = eng.tok.encode(prompt, bos=True)
    with torch.no_grad():  # the same numbers from one plain forward pass
        want = eng.model(torch.tensor([ids])).float().log_softmax(-1)[0]
    expect = [want[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs == pytest.approx(expect, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == prompt.rindex(lp.tokens[-1])
    by_ids = client.completions.create(model="tiny", prompt=ids[1:], max_tokens=0, echo=True,
                                       logprobs=1).choices[0]  # token ids, as lm-eval sends
    assert by_ids.text == prompt and by_ids.logprobs.token_logprobs == lp.token_logprobs
    g = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=2)
    glp = g.choices[0].logprobs
    assert "".join(glp.tokens) == g.choices[0].text
    for value, top in zip(glp.token_logprobs, glp.top_logprobs):
        assert len(top) == 2 and value == pytest.approx(max(top.values()))  # greedy = argmax
    assert g.choices[0].text == greedy_reference(eng, ids, 6)


def test_bad_requests_get_openai_errors(setup, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="../etc/passwd", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"
    for bad in [dict(messages=[]), dict(messages=MSGS, temperature=5),
                dict(messages=MSGS, max_tokens=10**6), dict(messages=MSGS, n=100),
                dict(messages=[{"role": "robot", "content": "hi"}]),
                dict(messages=[{"role": "user", "content": "x" * 70_000}])]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", **bad)
        assert e.value.status_code == 400 and e.value.body["message"]
    url = setup["url"] + "/v1/chat/completions"
    big = httpx.post(url, content=b"x" * 2_000_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    junk = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert junk.status_code == 400 and "JSON" in junk.json()["error"]["message"]
    long = httpx.post(url, json={"model": "tiny", "messages": [
        {"role": "user", "content": "Alice " * 200}]})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    missing = httpx.get(setup["url"] + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
    # a page elsewhere reaching the loopback server through DNS rebinding carries its own Host
    assert httpx.get(setup["url"] + "/v1/models", headers={"Host": "evil.example"}
                     ).status_code == 421
    assert "access-control-allow-origin" not in httpx.options(
        url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    ).headers


def test_api_key(setup):
    url = setup["key_url"]
    no_key = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert ok.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3).choices
    assert httpx.get(url + "/health").status_code == 401
    page = httpx.get(url + "/")
    assert page.status_code == 401 and "API key" in page.text  # the login form, not the app
    with httpx.Client(base_url=url) as browser:  # logging in sets a cookie for the web app
        assert browser.post("/login", data={"key": "nope"}).status_code == 401
        assert browser.post("/login", data={"key": KEY}).status_code == 303
        assert browser.get("/").status_code == 200 and browser.get("/api/info").status_code == 200
    with pytest.raises(UserError, match="API key"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", KEY)
    check_host("::1", None)


def test_login_page_gets_its_stylesheet(tmp_path):
    from fastapi.testclient import TestClient
    opts = ServeOptions(models={}, api_key=KEY, labels=str(tmp_path / "l.jsonl"))
    c = TestClient(create_app({}, opts), base_url="http://localhost")
    page = c.get("/")
    assert page.status_code == 401 and 'href="/static/style.css"' in page.text
    css = c.get("/static/style.css")  # asked for by the login page itself, before any key
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert c.get("/static/app.js").status_code == 401 and c.get("/api/info").status_code == 401


def test_cors_preflight_passes_without_the_key(tmp_path):
    """Browsers send the CORS preflight without credentials: with --api-key and
    --cors-origin it must still be answered, while the request itself needs the key."""
    from fastapi.testclient import TestClient
    origin = "http://app.example"
    opts = ServeOptions(models={}, labels=str(tmp_path / "l.jsonl"), api_key=KEY,
                        cors_origins=[origin])
    c = TestClient(create_app({}, opts), base_url="http://localhost")
    pre = c.options("/v1/models", headers={"Origin": origin,
                                           "Access-Control-Request-Method": "GET",
                                           "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
    # the refusal carries CORS headers, or the browser hides it from the page as a CORS error
    refused = c.get("/v1/models", headers={"Origin": origin})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    other = c.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert other.status_code == 401 and "access-control-allow-origin" not in other.headers
    ok = c.get("/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin


def test_tracker_view_of_a_damaged_registry_is_a_400(tmp_path):
    from fastapi.testclient import TestClient
    damaged = tmp_path / "registry.db"
    damaged.write_text("not a database\n")
    opts = ServeOptions(models={}, labels=str(tmp_path / "l.jsonl"), registry=str(damaged))
    c = TestClient(create_app({}, opts), base_url="http://localhost")
    r = c.get("/api/tracker")
    assert r.status_code == 400 and str(damaged) in r.json()["error"]["message"]
    assert damaged.read_text() == "not a database\n"


def test_tracker_view_of_a_nan_result(tmp_path):
    """A nan metric (an lm-eval task nothing could score) reaches the page as null (the
    page called null.toFixed and drew no table; it now shows "nan")."""
    from fastapi.testclient import TestClient

    from scalelab.track.registry import Registry
    reg = Registry(tmp_path / "registry.db")
    reg.add_experiment("e", "builtin:qa", "exact_match", 0.5)
    reg.add_model({"name": "m", "path": str(tmp_path), "kind": "scalelab", "params": 10,
                   "non_embedding_params": 10})
    reg.add_result(1, 1, {"exact_match": float("nan")}, False, [], 0, 0.1, "test")
    opts = ServeOptions(models={}, labels=str(tmp_path / "l.jsonl"), registry=str(reg.path))
    r = TestClient(create_app({}, opts), base_url="http://localhost").get("/api/tracker")
    assert r.status_code == 200, r.text
    assert r.json()["experiments"][0]["results"] == {"m": {"value": None, "passed": False}}


def test_cli_refuses_public_host_without_key(setup):
    r = run_cli("serve", "--model", str(setup["tiny"]), "--host", "0.0.0.0", timeout=60)
    assert r.returncode == 2 and "API key" in r.stderr


def test_cli_refuses_a_bad_or_busy_port_before_loading(tmp_path, capsys):
    from scalelab.cli import main
    missing = str(tmp_path / "not-loaded")  # the port is checked first: this is never read
    assert main(["serve", "--model", missing, "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", missing, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "Traceback" not in err


def test_concurrent_requests_share_batches(setup):
    eng = setup["engines"]["untrained"]
    c = openai.OpenAI(base_url=setup["url"] + "/v1", api_key="x", max_retries=0)
    alone = c.chat.completions.create(model="untrained", messages=MSGS, max_tokens=16,
                                      seed=11).choices[0].message.content
    batches, rows = eng.batches, eng.rows_served
    out = [None] * 12

    def ask(i):
        out[i] = c.chat.completions.create(
            model="untrained", messages=MSGS if i == 0 else
            [{"role": "user", "content": f"Question {i} about Bob?"}], max_tokens=16,
            seed=11 if i == 0 else i).choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert eng.rows_served - rows == 12 and eng.batches - batches < 12
    assert out[0] == alone  # a seeded answer does not depend on its batch-mates


def test_label_store_refuses_a_torn_file(tmp_path):
    f = tmp_path / "labels.jsonl"
    f.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "cho')
    with pytest.raises(UserError, match="incomplete"):
        LabelStore(f)
    f.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(UserError, match="rejected"):
        LabelStore(f)
    with pytest.raises(UserError, match="--labels .*not a file"):  # a folder, not a file
        LabelStore(tmp_path)


def test_label_store_appends_undoes_and_refuses_blank_answers(tmp_path):
    from scalelab.serve.api import APIError
    f = tmp_path / "labels.jsonl"
    f.write_text('{"prompt": "p0", "chosen": "a", "rejected": "b"}\n')
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    store = LabelStore(f, str(prompts))
    assert [store.take_prompt() for _ in range(3)] == ["first", "second", "first"]
    pairs = [{"id": str(i), "prompt": f"p{i}", "answers": [f"x{i}", f"y{i}"], "source": "typed",
              "model": "m", "gold": None} for i in (1, 2)]
    pairs.append({**pairs[0], "id": "3", "answers": ["fine", " "]})
    store.pending = {p["id"]: p for p in pairs}
    assert store.judge("1", "B")["written"] == 2
    with pytest.raises(APIError, match="blank"):
        store.judge("3", "A")
    assert store.judge("3", "skip")["counts"]["skip"] == 1
    store.judge("2", "A")
    assert read_preferences(f) == [("p0", "a", "b"), ("p1", "y1", "x1"), ("p2", "x2", "y2")]
    assert store.undo()["undone"] == "A" and store.undo()["undone"] == "skip"
    assert read_preferences(f) == [("p0", "a", "b"), ("p1", "y1", "x1")]
    with open(f, "a") as out:  # someone else appended: undo must not cut their line
        out.write('{"prompt": "q", "chosen": "c", "rejected": "d"}\n')
    with pytest.raises(APIError, match="changed"):
        store.undo()
    assert len(read_preferences(f)) == 3


def test_load_32_streaming_clients(setup):
    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).parents[1] / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = asyncio.run(bench.run_load(setup["url"], "untrained", 32, 5.0, max_tokens=16))
    assert s["errors"] == 0 and s["malformed"] == 0, s["problems"]
    assert s["requests"] >= 32 and s["tokens_per_s"] > 0


# ---- the web app in a real headless Chromium ---------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("browser tests need Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver); CI installs them")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    yield d
    d.quit()


def wait(d, fn, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: fn())


def open_view(d, url, view):
    d.get(f"{url}/#{view}")
    wait(d, lambda: d.execute_script("return document.body.dataset.ready === '1'"))


def css(d, sel):
    from selenium.webdriver.common.by import By
    return d.find_elements(By.CSS_SELECTOR, sel)


def text(d, el):
    """The exact text (WebElement.text trims and normalises what it shows)."""
    return d.execute_script("return arguments[0].textContent", el)


def set_value(d, id_, value):
    d.execute_script("document.getElementById(arguments[0]).value = arguments[1]", id_, value)


def test_browser_chat_streams(setup, client, browser):
    d = browser
    open_view(d, setup["url"], "chat")
    set_value(d, "chat-model", "untrained")
    set_value(d, "chat-temperature", "1")
    set_value(d, "chat-seed", "4")
    set_value(d, "chat-max-tokens", "24")
    d.execute_script("""window.partials = [];
      new MutationObserver(() => { const s = document.querySelector('.content.streaming');
        if (s && s.textContent) window.partials.push(s.textContent); })
      .observe(document.getElementById('chat-log'),
               {subtree: true, childList: true, characterData: true});""")
    css(d, "#chat-input")[0].send_keys("Where does Alice live?\n")
    wait(d, lambda: css(d, ".msg.assistant .content.done"))
    shown = text(d, css(d, ".msg.assistant .content")[0])
    want = client.chat.completions.create(model="untrained", messages=MSGS, temperature=1,
                                          seed=4, max_tokens=24).choices[0].message.content
    assert shown == want and shown
    partials = set(d.execute_script("return window.partials"))
    assert len(partials) >= 2 and all(want.startswith(p) for p in partials)  # it streamed
    # edit the question: the conversation is cut there and answered again
    css(d, ".msg.user .edit")[0].click()
    area = css(d, ".msg.user textarea")[0]
    area.clear()
    area.send_keys("Where does Bob live?")
    css(d, ".msg.user .save")[0].click()
    wait(d, lambda: css(d, ".msg.assistant .content.done") and
         text(d, css(d, ".msg.user .content")[0]) == "Where does Bob live?")
    assert len(css(d, ".msg")) == 2
    again = client.chat.completions.create(
        model="untrained", messages=[{"role": "user", "content": "Where does Bob live?"}],
        temperature=1, seed=4, max_tokens=24).choices[0].message.content
    assert text(d, css(d, ".msg.assistant .content")[0]) == again


def test_browser_compare_shows_two_answers(setup, client, browser):
    d = browser
    open_view(d, setup["url"], "compare")
    set_value(d, "compare-temperature", "1")
    set_value(d, "compare-seed", "6")
    set_value(d, "compare-max-tokens", "16")
    css(d, "#compare-input")[0].send_keys("Where does Alice live?")
    css(d, "#compare-send")[0].click()
    wait(d, lambda: len(css(d, "#compare-out .answer.done")) == 2)
    cols = {c.find_element("tag name", "h3").text: text(d, c.find_element("tag name", "pre"))
            for c in css(d, "#compare-out .answer")}
    for name in ("tiny", "untrained"):
        want = client.chat.completions.create(model=name, messages=MSGS, temperature=1,
                                              seed=6, max_tokens=16).choices[0].message.content
        assert cols[name] == want
    assert cols["untrained"]


def test_browser_labelling_by_keyboard_trains_a_reward_model(setup, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    d = browser
    open_view(d, setup["url"], "label")
    set_value(d, "label-source", "tasks")
    css(d, "#label-next")[0].click()

    def pair():
        wait(d, lambda: d.execute_script(
            "const p = document.getElementById('label-pair');"
            "return !p.hidden && p.dataset.id !== window.lastId"))
        d.execute_script("window.lastId = document.getElementById('label-pair').dataset.id")
        return tuple(text(d, css(d, f"#label-{k}")[0]) for k in ("prompt-text", "a", "b"))

    def press(key):
        ActionChains(d).send_keys(key).perform()

    seen = []
    for key in "aba":
        seen.append(pair())
        press(key)
    pair()  # the fourth pair is up: three labels written
    assert "you said A; the gold labeler ranks" in css(d, "#label-gold")[0].text
    press("u")  # undo the third: it comes back, and the file has two lines again
    wait(d, lambda: "undid A" in css(d, "#label-gold")[0].text)
    assert len(setup["labels"].read_text().splitlines()) == 2
    assert pair() == seen[2]
    press("b")
    wait(d, lambda: "3 preference lines" in css(d, "#label-count")[0].text)
    assert "agreement with the gold labeler" in css(d, "#label-count")[0].text
    rows = read_preferences(setup["labels"])
    want = [(p, a, b) for (p, a, b) in [seen[0]]] + [(p, b, a) for (p, a, b) in seen[1:]]
    assert rows == want
    out = setup["root"] / "reward"
    r = run_cli("reward", "--base", str(setup["tiny"]), "--data", str(setup["labels"]),
                "--out", str(out), "--max-steps", "2", "--set", "train.batch_size=1",
                "--set", "train.eval_every=1")  # batch 1: a sampled answer longer than the
    # tiny model's context leaves two of the three pairs (one held out), and a batch of 2
    # then refused the run (seen once in CI)
    assert r.returncode == 0, r.stderr
    assert (out / "model" / "model.safetensors").is_file()


def test_browser_tracker_table(setup, browser):
    d = browser
    open_view(d, setup["url"], "tracker")
    wait(d, lambda: len(css(d, "#tracker-table tr")) == 2)
    head = [c.text for c in css(d, "#tracker-table tr")[0].find_elements("tag name", "th")]
    cells = [c.text for c in css(d, "#tracker-table tr")[1].find_elements("tag name", "td")]
    assert head == ["experiment", "pass at", "tiny", "first passing model"]
    assert cells == ["add-small (exact_match)", ">=0.5", "0.25", "not yet"]


# ---- through the app's test client, on a small untrained model (no live server) -----------

@pytest.fixture(scope="module")
def small_app(tokenizer, tmp_path_factory):
    from fastapi.testclient import TestClient

    from scalelab.config import ModelConfig
    from scalelab.serve.engine import Engine
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2,
                      d_model=32)
    engines = {"small": Engine(Transformer(cfg).eval(), tokenizer)}
    opts = ServeOptions(models={}, labels=str(tmp_path_factory.mktemp("small") / "l.jsonl"))
    return TestClient(create_app(engines, opts), base_url="http://localhost")


def sse_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    import json
    return [json.loads(e) for e in events[:-1]]


def test_streamed_chat_logprobs_equal_the_whole_answers(small_app):
    """Streaming chunks carry the logprobs of their tokens when logprobs are asked for: put
    together, the same entries as the answer in one piece (same seed), stop string or not."""
    kw = {"model": "small", "messages": MSGS, "max_tokens": 12, "temperature": 1.0, "seed": 4,
          "logprobs": True, "top_logprobs": 2}
    whole = small_app.post("/v1/chat/completions", json=kw).json()["choices"][0]
    text = whole["message"]["content"]
    assert len(text) > 8, text
    for extra in ({}, {"stop": text[6:8]}):
        if extra:
            whole = small_app.post("/v1/chat/completions", json={**kw, **extra}).json()
            whole = whole["choices"][0]
            assert whole["message"]["content"] == text[:text.index(extra["stop"])]
        chunks = sse_events(small_app.post("/v1/chat/completions",
                                           json={**kw, **extra, "stream": True}))
        got = [e for c in chunks for ch in c["choices"] if ch["logprobs"]
               for e in ch["logprobs"]["content"]]
        assert got == whole["logprobs"]["content"] and got
        assert "".join(ch["delta"].get("content") or "" for c in chunks
                       for ch in c["choices"]) == whole["message"]["content"]


def test_streamed_completions_logprobs_and_usage(small_app):
    kw = {"model": "small", "prompt": ["Alice lives", "Bob"], "max_tokens": 10,
          "temperature": 1.0, "seed": 6, "logprobs": 2, "n": 2}
    whole = small_app.post("/v1/completions", json=kw).json()
    chunks = sse_events(small_app.post("/v1/completions", json={
        **kw, "stream": True, "stream_options": {"include_usage": True}}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == choice["index"]]
        assert "".join(ch["text"] for ch in mine) == choice["text"]
        lp = [ch["logprobs"] for ch in mine if ch["logprobs"]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for x in lp for v in x[key]] == choice["logprobs"][key], key
    plain = sse_events(small_app.post("/v1/completions", json={**kw, "stream": True}))
    assert all("usage" not in c for c in plain)
    bad = small_app.post("/v1/completions", json={**kw, "stream": True, "stream_options": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream_options"

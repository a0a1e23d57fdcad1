"""The web app's pages in a real headless Chromium against a live server with a small
untrained model (seconds, no training): what a person sees when things go wrong, and that
the keyboard labels only the pair on screen."""

import pytest
import test_serve
import torch
from test_serve import LiveServer, css, httpx, open_view, set_value, text, wait

from scalelab.config import ModelConfig
from scalelab.data.formats import read_preferences
from scalelab.model import Transformer

# (importing test_serve skips this module too where scalelab[serve] is not installed)
browser = test_serve.browser  # one headless Chromium for the module (skips without one)


@pytest.fixture
def server(tokenizer, tmp_path):
    from scalelab.serve.app import ServeOptions, create_app
    from scalelab.serve.engine import Engine
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2,
                      d_model=32)
    engines = {"small": Engine(Transformer(cfg).eval(), tokenizer)}
    s = LiveServer(create_app(engines, ServeOptions(models={},
                                                    labels=str(tmp_path / "labels.jsonl"))))
    s.labels = tmp_path / "labels.jsonl"
    yield s
    s.stop()


def chat(url: str, messages: list[dict], **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions",
                      json={"model": "small", "messages": messages, **kw}, timeout=30)


def test_a_failed_chat_answer_shows_its_error_and_is_not_sent_again(server, browser):
    """The error of a refused answer was drawn, then wiped by the redraw that followed: an
    empty answer, as if the model had said nothing."""
    d = browser
    open_view(d, server.url, "chat")
    set_value(d, "chat-max-tokens", "5000")  # above the server's cap: a 400
    css(d, "#chat-input")[0].send_keys("Where does Alice live?\n")
    wait(d, lambda: css(d, ".msg.assistant .content.done"))
    alice = [{"role": "user", "content": "Where does Alice live?"}]
    refused = chat(server.url, alice, max_tokens=5000, stream=True)
    assert refused.status_code == 400
    shown = css(d, ".msg.assistant .content .error")
    assert shown and text(d, shown[0]) == refused.json()["error"]["message"]
    # the next question is answered without the failed turn, whose error stays on screen
    for k, v in (("chat-max-tokens", "12"), ("chat-seed", "3"), ("chat-temperature", "1")):
        set_value(d, k, v)
    css(d, "#chat-input")[0].send_keys("Where does Bob live?\n")
    wait(d, lambda: len(css(d, ".msg.assistant")) == 2 and
         css(d, ".msg.assistant:last-child .content.done"))
    bob = alice + [{"role": "user", "content": "Where does Bob live?"}]
    want = chat(server.url, bob, max_tokens=12, seed=3, temperature=1).json()
    answers = css(d, ".msg.assistant .content")
    assert text(d, answers[1]) == want["choices"][0]["message"]["content"]
    assert css(d, ".msg.assistant .content .error")


def info(url: str) -> dict:
    return httpx.get(url + "/api/info", timeout=30).json()


def pair_id(d) -> str | None:
    """The id of the pair on screen (None while none is)."""
    return d.execute_script("const p = document.getElementById('label-pair');"
                            "return p.hidden ? null : p.dataset.id")


def shown_pair(d) -> tuple[str, str, str]:
    return tuple(text(d, css(d, f"#label-{k}")[0]) for k in ("prompt-text", "a", "b"))


def label_typed(d, url: str, prompt: str) -> None:
    """The labelling view, a pair for a typed prompt, on screen."""
    open_view(d, url, "label")
    set_value(d, "label-source", "typed")
    set_value(d, "label-prompt", prompt)
    css(d, "#label-next")[0].click()
    wait(d, lambda: pair_id(d) is not None)


def press(d, key: str, repeat: bool = False) -> None:
    """A keydown on the page, as a held key repeats it when `repeat`."""
    d.execute_script("document.body.dispatchEvent(new KeyboardEvent('keydown', {key: "
                     "arguments[0], repeat: arguments[1], bubbles: true, cancelable: true}))",
                     key, repeat)


def test_keys_label_only_the_pair_on_screen(server, browser):
    """After a refused "New pair" the old pair was hidden but still armed: the next A wrote
    it to the labels file. And letters typed into a drop-down (which picks options by their
    first letter) were taken as labels."""
    from selenium.webdriver.common.action_chains import ActionChains
    d = browser
    label_typed(d, server.url, "Where does Alice live?")
    for select in ("label-source", "label-model"):
        css(d, f"#{select}")[0].send_keys("tsab")
    assert info(server.url)["counts"] == {"A": 0, "B": 0, "tie": 0, "skip": 0}
    set_value(d, "label-source", "typed")
    set_value(d, "label-prompt", "")  # the server refuses a blank typed prompt
    css(d, "#label-next")[0].click()
    wait(d, lambda: css(d, "#label-gold .error"))
    assert text(d, css(d, "#label-gold .error")[0]).endswith("type a prompt")
    ActionChains(d).send_keys("a").perform()
    set_value(d, "label-prompt", "Where does Bob live?")  # a pair that is shown: labelled
    css(d, "#label-next")[0].click()
    wait(d, lambda: not d.execute_script("return document.getElementById('label-pair').hidden"))
    prompt, a, b = shown_pair(d)
    ActionChains(d).send_keys("b").perform()
    wait(d, lambda: info(server.url)["counts"]["B"] == 1)
    assert info(server.url)["counts"] == {"A": 0, "B": 1, "tie": 0, "skip": 0}
    assert read_preferences(server.labels) == [("Where does Bob live?", b, a)]
    assert prompt == "Where does Bob live?"


def test_a_label_the_disk_cannot_take_is_not_half_written_nor_lost(tmp_path, monkeypatch):
    """A short write (a full disk) left half a line in the labels file, counted as saved;
    a failed one dropped the pair, so labelling it again said 'no pair waiting'."""
    import errno
    import os

    from scalelab.serve import web
    f = tmp_path / "labels.jsonl"
    first = '{"prompt": "p0", "chosen": "a", "rejected": "b"}\n'
    f.write_text(first)
    store = web.LabelStore(f)
    store.pending = {"1": {"id": "1", "prompt": "p1", "answers": ["x", "y"], "source": "typed",
                           "model": "m", "gold": None}}
    real_write = os.write

    def short(fd, data):  # what write(2) does when the disk fills part way through
        return real_write(fd, data[:len(data) // 2])

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    for broken in (short, full):
        monkeypatch.setattr(web.os, "write", broken)
        with pytest.raises(web.APIError, match="could not write to .*labels.jsonl"):
            store.judge("1", "A")
        assert f.read_text() == first and store.tallies()["written"] == 1
    monkeypatch.setattr(web.os, "write", real_write)
    assert store.judge("1", "B")["written"] == 2  # the same pair, labelled again
    assert read_preferences(f) == [("p0", "a", "b"), ("p1", "y", "x")]


def test_regenerate_waits_for_the_answer_being_streamed(server, browser):
    """The answer being streamed already shows its "regenerate" button; a click on it started
    a second answer beside the first, and the first one's end marked the chat idle while the
    second still streamed into it."""
    d = browser
    open_view(d, server.url, "chat")
    calls = d.execute_script("""
      window.calls = 0;
      const real = window.fetch;
      window.fetch = (...args) => { window.calls += 1; return real(...args); };
      document.getElementById('chat-input').value = 'Where does Alice live?';
      document.getElementById('chat-send').click();  // answer() runs up to its fetch
      document.querySelector('.msg.assistant .regenerate').click();
      return window.calls;""")
    assert calls == 1
    wait(d, lambda: css(d, ".msg.assistant .content.done"))
    css(d, ".msg.assistant .regenerate")[0].click()  # once the answer is in, it works
    wait(d, lambda: d.execute_script("return window.calls") == 2)


def test_enter_that_ends_an_input_method_word_does_not_send(server, browser):
    """With an input method (Chinese, Japanese, ...) Enter first confirms the word being
    composed; the chat took that Enter as "send" and sent half a message."""
    d = browser
    open_view(d, server.url, "chat")
    sent = d.execute_script("""
      const box = document.getElementById('chat-input');
      box.value = 'アリスは';
      box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true,
                                                      bubbles: true, cancelable: true}));
      return document.querySelectorAll('.msg').length;""")
    assert sent == 0 and css(d, "#chat-input")[0].get_property("value") == "アリスは"
    css(d, "#chat-input")[0].send_keys("\n")  # a plain Enter sends
    wait(d, lambda: css(d, ".msg.assistant .content.done"))
    assert text(d, css(d, ".msg.user .content")[0]) == "アリスは"


def test_a_held_key_labels_one_pair(server, browser):
    """Holding A a little long sent auto-repeated keydowns, each labelling the next pair as
    soon as it appeared: pairs the person never saw."""
    d = browser
    label_typed(d, server.url, "Where does Alice live?")
    first = pair_id(d)
    press(d, "a")
    wait(d, lambda: pair_id(d) not in (None, first))
    for _ in range(3):  # the key still held: repeats, not new presses
        press(d, "a", repeat=True)
    assert info(server.url)["counts"]["A"] == 1 and len(read_preferences(server.labels)) == 1


def test_a_key_right_after_undo_does_not_label_the_pair_being_replaced(server, browser,
                                                                        monkeypatch):
    """U then A typed quickly ("undo that, it was A"): the A reached the pair still on screen
    before the undone one came back, labelling the wrong pair. (The server's undo is slowed
    down so that the A surely comes before its answer: on an idle machine it could come
    after, and rightly label the pair brought back.)"""
    import time

    from scalelab.serve.web import LabelStore
    undo = LabelStore.undo

    def slow_undo(self):
        time.sleep(0.5)
        return undo(self)
    monkeypatch.setattr(LabelStore, "undo", slow_undo)
    d = browser
    label_typed(d, server.url, "Where does Alice live?")
    first, first_id = shown_pair(d), pair_id(d)
    press(d, "b")
    wait(d, lambda: pair_id(d) not in (None, first_id))  # the next pair is up
    press(d, "u")
    press(d, "a")  # before the undo's answer is in
    wait(d, lambda: "undid B" in css(d, "#label-gold")[0].text)
    assert shown_pair(d) == first
    assert info(server.url)["counts"] == {"A": 0, "B": 0, "tie": 0, "skip": 0}
    assert not server.labels.read_text()


def test_undo_after_the_labels_file_was_moved_away(tmp_path):
    """Moving labels.jsonl away (to train on it) and then pressing U was a bare 500 (the
    page showed a JSON parse error), not the 409 that an outside change gets."""
    from scalelab.serve import web
    f = tmp_path / "labels.jsonl"
    store = web.LabelStore(f)
    store.pending = {"1": {"id": "1", "prompt": "p", "answers": ["x", "y"], "source": "typed",
                           "model": "m", "gold": None}}
    store.judge("1", "A")
    f.rename(tmp_path / "train-on-these.jsonl")
    with pytest.raises(web.APIError, match="labels.jsonl changed") as e:
        store.undo()
    assert e.value.status == 409 and store.tallies()["counts"]["A"] == 1
    assert not f.exists()  # nothing made in its place


def test_an_answer_that_is_not_json_is_named_not_a_parse_error(server, browser):
    """A body that is not JSON (a proxy's error page, or a page where JSON was expected) was
    shown as the browser's JSON parse error; now as its status, or as not JSON."""
    d = browser
    open_view(d, server.url, "chat")
    call = """const done = arguments[arguments.length - 1];
              api(arguments[0]).then(() => done("ok"), e => done(e.message));"""
    assert d.execute_async_script(call, "/") == "/: the server's answer is not JSON"
    # a proxy in front of the server answers with its own HTML page
    d.execute_script("""window.fetch = async () => new Response("<html>bad gateway</html>",
                                                    {status: 502, statusText: "Bad Gateway"});""")
    assert d.execute_async_script(call, "/v1/models") == "502 Bad Gateway"

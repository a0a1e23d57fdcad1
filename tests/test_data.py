import pytest
import torch

from scalelab.config import DataConfig, UserError
from scalelab.data.tokens import (
    TokenLoader,
    read_documents,
    split_documents,
    write_token_files,
)


@pytest.fixture
def data_dir(tokenizer, tmp):
    cfg = DataConfig(n_docs=800, val_fraction=0.05)
    train, val = split_documents(read_documents(cfg), cfg)
    write_token_files({"train": train, "val": val}, tokenizer, tmp / "data")
    return tmp / "data"


def test_token_files_keep_document_boundaries(tokenizer, data_dir):
    import json
    meta = json.loads((data_dir / "meta.json").read_text())
    loader = TokenLoader(data_dir, "train", 4, 16)
    assert int((torch.from_numpy(loader.tokens[:].astype("int64")) == tokenizer.bos_id).sum()) \
        == meta["train"]["docs"]
    assert meta["train"]["docs"] + meta["val"]["docs"] == 800
    assert not (data_dir.parent / "data.tmp").exists()


def test_no_validation_document_is_also_a_training_document(tmp, capsys):
    """The world corpus repeats some short documents (~2% of 20000); the seeded val sample
    took one copy and left the others in train: 16 of the default 400 val documents were
    training text. Copies of a val document now leave train, and so do data.source's
    documents that data.val_source also holds (only a full overlap was refused)."""
    cfg = DataConfig(n_docs=3000, val_fraction=0.1)
    docs = read_documents(cfg)
    train, val = split_documents(docs, cfg)
    assert sum(docs.count(v) - val.count(v) for v in set(val)) > 0  # copies exist to leak
    assert not set(train) & set(val)
    assert len(train) == sum(d not in set(val) for d in docs)  # nothing else is dropped
    assert len(val) == 300
    (tmp / "src.txt").write_text("a\n\nb\n\nc\n\nd\n")
    (tmp / "val.txt").write_text("b\n\ne\n")
    cfg = DataConfig(source=str(tmp / "src.txt"), val_source=str(tmp / "val.txt"))
    assert split_documents(read_documents(cfg), cfg) == (["a", "c", "d"], ["b", "e"])
    assert "1 document(s) of data.source are also in data.val_source" in capsys.readouterr().out


def test_loader_is_deterministic_and_resumes_exactly(data_dir):
    a = TokenLoader(data_dir, "train", 4, 16, seed=3)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(700)]  # crosses an epoch boundary
    b = TokenLoader(data_dir, "train", 4, 16, seed=3)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, [b.next_batch() for _ in range(5)]))
    c = TokenLoader(data_dir, "train", 4, 16, seed=3)
    c.load_state_dict(state)
    again = [c.next_batch() for _ in range(700)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(rest, again))
    assert a.sampler.epoch >= 1
    x, y = rest[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_ranks_read_disjoint_slices_of_the_global_batch(data_dir):
    whole = TokenLoader(data_dir, "train", 8, 16, seed=1)
    ranks = [TokenLoader(data_dir, "train", 4, 16, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def test_accumulated_micro_batches_draw_the_rows_of_one_batch_across_epochs(data_dir):
    """2 data ranks x 2 micro-batches x 2 rows (train.grad_accum=2) read, step by step, the
    rows one batch of 8 reads, also past an epoch's end: the ragged end is dropped per
    optimizer step. Pretraining dropped it per micro-batch, so a step could take its first
    micro-batch from one epoch and its second from the next, and every later step differed
    from the one-process run."""
    seq = next(s for s in range(16, 64) if 4 <= TokenLoader(data_dir, "train", 1, s).n_windows
               % 8)  # an epoch that leaves at least one micro-batch of 4 rows over
    whole = TokenLoader(data_dir, "train", 8, seq, seed=1)
    ranks = [TokenLoader(data_dir, "train", 2, seq, seed=1, rank=r, world=2, accum=2)
             for r in range(2)]
    steps = 2 * whole.n_windows // 8 + 2  # into the third epoch
    for _ in range(steps):
        x = whole.next_batch()[0]
        parts = [r.next_batch()[0] for _ in range(2) for r in ranks]
        assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, x.tolist()))
    assert whole.sampler.epoch == 2


def test_resume_with_another_global_batch_keeps_batches_whole():
    """A checkpoint of batch 4 (index 4) resumed with a global batch of 3 (another
    batch_size, or another number of data ranks): the 6 rows left of the epoch come in two
    whole batches, then the next epoch starts; an index that is no multiple of the new batch
    used to skip the epoch's end and hand out empty batches."""
    from scalelab.data.batches import EpochSampler
    one = EpochSampler(10, 1, seed=5)  # draws every row of each epoch in order
    epoch0 = [one.next_indices()[0] for _ in range(10)]
    epoch1 = [one.next_indices()[0] for _ in range(10)]
    for world, accum in ((1, 1), (1, 3), (3, 1)):  # 3 rows per step, however drawn
        ranks = [EpochSampler(10, 3 // world // accum, seed=5, rank=r, world=world,
                              accum=accum) for r in range(world)]
        for s in ranks:
            s.load_state_dict({"epoch": 0, "index": 4})
        drawn = [[i for s in ranks for _ in range(accum) for i in s.next_indices()]
                 for _ in range(3)]
        assert drawn == [epoch0[4:7], epoch0[7:10], epoch1[:3]], (world, accum)


def test_pretraining_evaluates_the_global_val_batches_in_micro_batches(data_dir):
    """Under a mesh every rank evaluates the windows of eval_batches global batches (the
    same as one process with the whole batch), in batches of train.batch_size rows, not in
    one forward of a whole global batch (8x a training micro-batch on 8 data ranks)."""
    from scalelab.config import TrainConfig
    from scalelab.train.pretrain import val_batches
    one = val_batches(data_dir, TrainConfig(batch_size=8, eval_batches=3), 16, 1)
    mesh = val_batches(data_dir, TrainConfig(batch_size=2, eval_batches=3), 16, 4)
    assert [len(x) for x, _ in one] == [8] * 3 and [len(x) for x, _ in mesh] == [2] * 12
    for k in (0, 1):  # the same inputs and targets, in the same order
        assert torch.equal(torch.cat([b[k] for b in one]), torch.cat([b[k] for b in mesh]))


def test_user_text_files(tmp):
    (tmp / "a.txt").write_text("first document")
    (tmp / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    assert read_documents(DataConfig(source=str(tmp))) == ["first document", "second", "third"]


def test_txt_split_keeps_unicode_line_separators_inside_documents(tmp):
    """str.splitlines also breaks at U+2028, NEL (U+0085) and \\x1c-\\x1e: a document
    holding one was cut in two ("lines") or had it rewritten to \\n ("blank_lines"). Only
    newlines end a line (CRLF and CR already read as \\n)."""
    text = "one\u2028still one\x85and\x1cmore\r\n\r\nnext\rlast"
    (tmp / "u.txt").write_bytes(text.encode("utf-8"))
    for how, want in [("blank_lines", ["one\u2028still one\x85and\x1cmore", "next\nlast"]),
                      ("lines", ["one\u2028still one\x85and\x1cmore", "next", "last"])]:
        assert read_documents(DataConfig(source=str(tmp / "u.txt"), txt_split=how)) == want


def test_jsonl_text_with_unicode_line_separators(tmp):
    """json.dumps(..., ensure_ascii=False) writes U+2028 and NEL unescaped; read_jsonl split
    lines there too and called line 1 'malformed JSON'."""
    import json
    texts = ["para\u2028sep", "nel\x85here"]
    (tmp / "u.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                         for t in texts), encoding="utf-8")
    assert read_documents(DataConfig(source=str(tmp / "u.jsonl"))) == texts


def test_empty_source_is_not_the_current_folder(tmp, monkeypatch):
    """data.source = "" read Path("") = the current folder, recursively: every .txt/.jsonl
    under the working directory became the corpus (or a confusing error about one of them)."""
    (tmp / "stray.txt").write_text("not meant as a corpus")
    monkeypatch.chdir(tmp)
    with pytest.raises(UserError, match="data.source is empty"):
        read_documents(DataConfig(source=""))


def test_upper_case_suffixes(tmp):
    """B.TXT in a corpus folder was skipped without a word, and C.JSONL named alone was read
    as plain text (its JSON syntax became the corpus)."""
    (tmp / "a.txt").write_text("first")
    (tmp / "B.TXT").write_text("second")
    (tmp / "C.JSONL").write_text('{"text": "third"}\n')
    assert read_documents(DataConfig(source=str(tmp))) == ["second", "third", "first"]
    assert read_documents(DataConfig(source=str(tmp / "C.JSONL"))) == ["third"]


def test_corpus_folder_with_a_subfolder_named_like_a_file(tmp):
    """A subfolder called `notes.txt/` was opened as a file: an IsADirectoryError traceback.
    Its files are read like any other subfolder's."""
    (tmp / "a.txt").write_text("first")
    (tmp / "notes.txt").mkdir()
    (tmp / "notes.txt" / "b.txt").write_text("second")
    assert read_documents(DataConfig(source=str(tmp))) == ["first", "second"]


def test_corpus_folder_names_the_files_it_skips(tmp, capsys):
    """A folder's .md/.csv files were skipped without a word: one line now says how many and
    names the first few; a folder of .txt/.jsonl alone prints nothing."""
    (tmp / "a.txt").write_text("first")
    assert read_documents(DataConfig(source=str(tmp))) == ["first"]
    assert capsys.readouterr().out == ""
    for name in ("README.md", "b.md", "c.md", "d.csv"):
        (tmp / name).write_text("not read")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "e.md").write_text("not read")
    assert read_documents(DataConfig(source=str(tmp))) == ["first"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"{tmp}: skipped 5 file(s)" in lines[0], lines
    assert "README.md, b.md, c.md and 2 more" in lines[0]


@pytest.mark.parametrize("content, expected", [
    ('{"text": "ok"}\n{"text": 5}\n', "b.jsonl:2"),
    ('{"text": "ok"}\nnot json\n', "b.jsonl:2: malformed JSON"),
])
def test_bad_jsonl_names_file_and_line(tmp, content, expected):
    (tmp / "b.jsonl").write_text(content)
    with pytest.raises(UserError, match=expected):
        read_documents(DataConfig(source=str(tmp / "b.jsonl")))


def test_a_corpus_byte_that_is_not_utf8_names_its_line(tmp):
    """A Latin-1 'café' on line 3 of a .txt corpus: named with its line (it gave a byte
    offset into the file, which no editor shows)."""
    (tmp / "notes.txt").write_bytes(b"first doc\n\ncaf\xe9 au lait\n")
    with pytest.raises(UserError, match=r"notes.txt:3: not UTF-8 text"):
        read_documents(DataConfig(source=str(tmp / "notes.txt")))


def test_a_lone_surrogate_escape_names_its_line(tmp):
    """'\\ud800' is legal JSON but half a character: it was read, then the tokenizer
    crashed with a UnicodeEncodeError traceback. A whole escaped pair is still text."""
    from scalelab.data.formats import read_conversations
    good = '{"text": "smile \\ud83d\\ude00"}\n'
    (tmp / "a.jsonl").write_text(good + '{"text": "ab\\ud800cd"}\n')
    with pytest.raises(UserError, match=r"a.jsonl:2: a \\u escape is half of a character"):
        read_documents(DataConfig(source=str(tmp / "a.jsonl")))
    (tmp / "b.jsonl").write_text(good)
    assert read_documents(DataConfig(source=str(tmp / "b.jsonl"))) == ["smile \U0001f600"]
    (tmp / "c.jsonl").write_text('{"prompt": "hi", "completion": "\\uDC00"}\n')
    with pytest.raises(UserError, match=r"c.jsonl:1: a \\u escape"):
        read_conversations(tmp / "c.jsonl")


def test_empty_or_missing_corpus(tmp):
    (tmp / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        read_documents(DataConfig(source=str(tmp / "empty.txt")))
    with pytest.raises(UserError, match="not found"):
        read_documents(DataConfig(source=str(tmp / "nope.txt")))


@pytest.mark.parametrize("damage", ["meta", "empty", "odd", "missing"])
def test_damaged_token_files_are_bad_input(data_dir, damage):
    """A run folder whose data/ was damaged (half-copied, truncated) raised numpy/json
    tracebacks on --resume; now one message names the folder and the way out."""
    TokenLoader(data_dir, "train", 4, 16)  # intact: loads
    if damage == "meta":
        (data_dir / "meta.json").write_text('{"dtype": "uint16", "vocab')
    elif damage == "empty":
        (data_dir / "train.bin").write_bytes(b"")
    elif damage == "odd":
        with open(data_dir / "train.bin", "r+b") as f:
            f.truncate(1001)
    else:
        (data_dir / "val.bin").unlink()
    with pytest.raises(UserError, match=f"{data_dir}: the run's token files are damaged"):
        TokenLoader(data_dir, "train", 4, 16)


def test_packed_sft_batches_give_the_padded_loss_and_gradients(tokenizer):
    """sft.pack: conversations packed several to a row, each seeing only itself, give the
    loss and gradients of one right-padded row per conversation; on the built-in SFT data
    the packed rows hold far less padding."""
    from scalelab.config import ModelConfig
    from scalelab.data.batches import pack, pad_right
    from scalelab.model import Transformer
    from scalelab.train.losses import IGNORE
    from scalelab.train.sft import encode_conversations, masked_loss, task_conversations

    convs, _ = task_conversations(2000, seed=0, chatty_fraction=0.3)
    items = encode_conversations(convs, tokenizer, 128)
    padded_real = packed_real = 0.0
    for i in range(0, 1984, 32):
        batch = items[i:i + 32]
        real = sum(len(x) for x, _ in batch)
        padded_real += real / pad_right([x for x, _ in batch], 0).numel()
        x, y, pos, seg = pack(batch, 128, tokenizer.pad_id, IGNORE)
        assert x.size(1) <= 128
        found = []  # every conversation once, whole, with positions from 0
        for r in range(len(x)):
            for k in range(int(seg[r].max()) + 1):
                at = seg[r] == k
                assert pos[r, at].tolist() == list(range(int(at.sum())))
                found.append((x[r, at].tolist(), y[r, at].tolist()))
        assert sorted(found) == sorted((list(a), list(b)) for a, b in batch)
        packed_real += real / x.numel()
    padded_real, packed_real = padded_real / 62, packed_real / 62
    print(f"real tokens of a batch of 32: {padded_real:.2f} padded, {packed_real:.2f} packed")
    assert padded_real < 0.6 and packed_real > 0.9

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=2,
                                    n_head=2, d_model=32))
    batch = [(x[:40], y[:40]) for x, y in items[:24]]
    grads = []
    for tensors in ((pad_right([x for x, _ in batch], tokenizer.pad_id),
                     pad_right([y for _, y in batch], IGNORE)),
                    pack(batch, 64, tokenizer.pad_id, IGNORE)):
        model.zero_grad()
        loss = masked_loss(model, tensors)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(tensors[0]) < len(batch)  # packed: fewer rows
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, atol=1e-6, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g1, g2))


def test_packed_sft_rows_are_never_wider_than_the_padded_batch(tokenizer):
    """A model's context far longer than its conversations (gpt2-124m: 1024 tokens; an HF
    folder's max_position_embeddings: 32k and more) must not widen the packed rows: rows of
    the whole context left the last one mostly padding and made the block-diagonal mask,
    and the attention computed under it, grow with the square of the context (10x the padded
    batch's attention on the built-in conversations at 1024). A packed batch has at most the
    padded batch's rows and width, and so never more tokens or attention than it."""
    from scalelab.data.batches import pack, pad_right
    from scalelab.train.losses import IGNORE
    from scalelab.train.sft import encode_conversations, task_conversations

    items = encode_conversations(task_conversations(256, seed=1)[0], tokenizer, 1024)
    for i in range(0, 256, 32):
        batch = items[i:i + 32]
        padded = pad_right([x for x, _ in batch], tokenizer.pad_id)
        x, y, pos, seg = pack(batch, 1024, tokenizer.pad_id, IGNORE)
        assert x.size(0) <= padded.size(0) and x.size(1) <= padded.size(1), (x.shape,
                                                                             padded.shape)
        assert x.size(0) * x.size(1) ** 2 <= padded.size(0) * padded.size(1) ** 2
        assert int((seg >= 0).sum()) == sum(len(a) for a, _ in batch)  # every token, once


def test_sft_batches_keep_the_padded_layout_where_packing_saves_no_row(tokenizer):
    """sft.pack packs a batch only where that saves a row: a batch of one conversation (batch
    size 1, usual for big models on a GPU), or of conversations too long to share a row,
    stays right-padded with no mask, which on CUDA keeps the flash kernel. The packed layout
    of such a batch would be the same tokens plus a mask."""
    from scalelab.data.batches import pad_right
    from scalelab.train.losses import IGNORE
    from scalelab.train.sft import encode_conversations, sft_batch, task_conversations

    items = encode_conversations(task_conversations(32, seed=1)[0], tokenizer, 128)
    longest = max(items, key=lambda it: len(it[0]))
    long_ones = [it for it in items if 2 * len(it[0]) > len(longest[0])][:3]
    assert len(long_ones) >= 2
    for batch in ([items[0]], long_ones):
        out = sft_batch(batch, 128, tokenizer.pad_id, packing=True)
        assert len(out) == 2  # (inputs, targets): no positions or segments, so no mask
        assert torch.equal(out[0], pad_right([x for x, _ in batch], tokenizer.pad_id))
        assert torch.equal(out[1], pad_right([y for _, y in batch], IGNORE))
    x, _, _, seg = sft_batch(items, 128, tokenizer.pad_id, packing=True)  # a mixed batch packs
    assert x.size(0) < len(items) and int(seg.max()) >= 1
    assert len(sft_batch(items, 128, tokenizer.pad_id, packing=False)) == 2

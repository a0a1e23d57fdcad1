"""EleutherAI's lm-evaluation-harness on scalelab models (`pip install scalelab[eval]`).

Importing this module registers the model type `scalelab` (any folder load_model takes: a
scalelab run's model, or an imported Hugging Face folder). lm-eval's own command line finds it
through scalelab_lmeval.pth (see scalelab/lmeval_plugin.py):

    lm_eval --model scalelab --model_args path=RUN/model --batch_size 16 \\
        --tasks TASK [--include_path DIR_OF_TASK_YAMLS] ...

(`python -m scalelab.lmeval` takes the same arguments where that file is not installed), or
from Python: `import scalelab.lmeval; lm_eval.simple_evaluate(model="scalelab", ...)`.
Scoring is teacher-forced log-likelihood in right-padded batches; generation is
scalelab.generate.generate (the KV-cache rollout engine), greedy unless asked to sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# lm-eval registers its built-in model types only while its registry is empty, which ours
# would make it not be: so `lm_eval.models` is imported (registering them) first.
try:
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError("the lm-eval bridge needs `pip install scalelab[eval]` "
                      f"(lm_eval is missing: {e})") from None

from scalelab.generate import generate
from scalelab.hardware import pick_device
from scalelab.train.checkpoint import load_model


@register_model("scalelab")
class ScalelabEvalLM(TemplateLM):
    def __init__(self, path: str, device: str = "auto", batch_size: int | str = 16,
                 max_gen_toks: int = 256, **_ignored) -> None:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "auto"  # lm-eval's command line asks for cuda by default
        model, tok = load_model(path, pick_device(device))
        batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # no "auto"
        self._setup(model, tok, batch_size, int(max_gen_toks))

    @classmethod
    def around(cls, model, tok, batch_size: int = 16, max_gen_toks: int = 256
               ) -> ScalelabEvalLM:
        """The bridge over a model already loaded (the tracker's)."""
        self = cls.__new__(cls)
        self._setup(model, tok, batch_size, max_gen_toks)
        return self

    def _setup(self, model, tok, batch_size: int, max_gen_toks: int) -> None:
        TemplateLM.__init__(self)
        self.model, self.tok, self.device_ = model, tok, next(model.parameters()).device
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.max_length = model.cfg.seq_len

    # ---- tokens ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.doc_eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        # As lm-eval's `hf` model: the tokenizer's post-processor adds what it adds (BOS for
        # scalelab's and Llama tokenizers, nothing for GPT-2-style ones) unless told not to,
        # or unless the string already starts with the prefix token's text. transformers
        # reads that text as the token; scalelab spells special-token text out, so the
        # token is put back by id.
        if add_special_tokens is None:
            head = self.tok.decode([self.prefix_token_id], skip_special=False)
            if head and string.startswith(head):
                return [self.prefix_token_id] + self.tok.hf.encode(
                    string[len(head):], add_special_tokens=False).ids
        return self.tok.hf.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # ---- scoring --------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per pair,
        longest first in batches (fewer pads), answered in the input order."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0] + pairs[i][1]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b: b + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in idx]
            T = max(len(s) for s in seqs) - 1
            x = torch.full((len(seqs), T), self.tok.pad_id, dtype=torch.long)
            for r, s in enumerate(seqs):
                x[r, : len(s) - 1] = torch.tensor(s[:-1])
            logp = F.log_softmax(self.model(x.to(self.device_)).float(), dim=-1).cpu()
            for r, (i, s) in enumerate(zip(idx, seqs)):
                n = len(pairs[i][1])
                target = torch.tensor(s[-n:])
                rows = logp[r, len(s) - 1 - n: len(s) - 1]
                picked = rows.gather(-1, target[:, None]).squeeze(-1)
                out[i] = (picked.sum().item(), bool((rows.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            # encoded as lm-eval's `hf` model does: with the post-processor's BOS, which the
            # first window (its context is the prefix token) then also scores
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same settings batch together
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            # Room for the prompt: the context less max_gen_toks, but at least half of it (the
            # default 256 is more than a tiny model's whole context); the answer then ends
            # at the context's end, as a server clamps max_tokens.
            room = self.max_length - min(max_new, self.max_length // 2)
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b: b + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id]
                           for i in batch]
                # stop at the tokenizer's eos_token (the end of document), as lm-eval's `hf`
                # model does; tok.eos_id is the chat template's end of turn
                new = generate(self.model, prompts, max_new, self.tok.pad_id,
                               self.eot_token_id, temperature=temperature,
                               vocab_limit=self.tok.vocab_size)
                for i, ids in zip(batch, new):
                    text = self.tok.decode(ids)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

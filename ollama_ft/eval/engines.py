"""Engines that answer test prompts and score reference answers for the eval stage.

LlamaCppEngine runs a GGUF file in-process with llama-cpp-python (the engine Ollama embeds): greedy
generation that stops at the end-of-turn token, and teacher-forced answer-only log-likelihood.
OllamaEngine generates through the Ollama API (ollama_api.py); it cannot score perplexity.
Both render prompts with the same chat template, so base and tuned see identical prompt text.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError


@dataclass
class Generation:
    text: str
    n_tokens: int
    hit_limit: bool  # ran into max_new_tokens instead of ending its turn
    seconds: float


def render_prompt(template: str, messages: list[dict[str, str]], bos_token: str = "", eos_token: str = "") -> str:
    """Render the prompt part of a conversation (generation prompt appended) with an HF chat template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)
    except Exception as e:  # jinja errors are user-facing: the template comes from the run's data
        raise UserError(f"the chat template failed to render a test prompt: {e}",
                        hint="check data/chat_template.jinja of the run (it must accept system/user/assistant)") from None
    return rendered[0]


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading on fd 2 from C; keep the terminal for our progress."""
    if os.environ.get("OLLAMA_FT_LLAMA_VERBOSE") == "1":
        yield
        return
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


class LlamaCppEngine:
    """One loaded GGUF, reused for every example."""

    name = "llama_cpp"

    def __init__(self, gguf: Path, template: str, n_ctx: int = 2048, threads: int | None = None, seed: int = 0,
                 stop_ids: set[int] | None = None):
        try:
            import llama_cpp
        except ImportError as e:
            raise UserError(f"llama-cpp-python is not importable ({e})",
                            hint="run `make install` (it builds llama-cpp-python portably)") from None
        self._lc = llama_cpp
        self.path = Path(gguf)
        if not self.path.is_file():
            raise UserError(f"GGUF not found: {self.path}", hint="run `ollama-ft export RUN` first")
        self.template = template
        # Tokens that end a turn in the training data; some GGUFs do not flag them end-of-generation.
        self.stop_ids = set(stop_ids or ())
        with _quiet_stderr():
            try:
                # n_gpu_layers=-1 offloads everything when llama.cpp was built with a GPU backend; CPU builds ignore it
                self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                                           n_gpu_layers=-1,
                                           n_threads=threads or max(1, min(8, os.cpu_count() or 1)),
                                           seed=seed, verbose=False, logits_all=False)
            except ValueError as e:
                raise UserError(f"llama.cpp could not load {self.path}: {e}",
                                hint="re-run `ollama-ft export RUN --force`; the file may be truncated") from None
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        bos = self.llm.token_bos()
        self.bos_text = self._piece(bos) if bos >= 0 else ""
        eos = self.llm.token_eos()
        self.eos_text = self._piece(eos) if eos >= 0 else ""
        self.add_bos = str(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"

    def _piece(self, tok: int) -> str:
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    def piece(self, tok: int) -> str:
        """The text of one token, special tokens spelled out."""
        return self._piece(tok)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        text = render_prompt(self.template, messages, self.bos_text, self.eos_text)
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int,
                 prompt: list[int] | None = None) -> Generation:
        """Greedy decoding until an end-of-generation token (EOS / end-of-turn) or the token limit.

        prompt: token ids to use instead of rendering `messages` (e.g. the tokens the data stage made).
        """
        prompt = list(prompt) if prompt else self.prompt_tokens(messages)
        if len(prompt) + max_new_tokens > self.n_ctx:
            prompt = prompt[-(self.n_ctx - max_new_tokens):]  # keep the end: the question and the turn marker
        t0 = time.perf_counter()
        out: list[int] = []
        hit_limit = True
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            if tok in self.stop_ids or self._lc.llama_vocab_is_eog(self._vocab, tok):
                hit_limit = False
                break
            out.append(tok)
            if len(out) >= max_new_tokens:
                break
        secs = time.perf_counter() - t0
        text = self.llm.detokenize(out, prev_tokens=prompt).decode("utf-8", errors="replace")
        return Generation(text.strip(), len(out), hit_limit, secs)

    def nll(self, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
        """Teacher-forced negative log-likelihood (nats) summed over trained tokens (labels != -100).

        labels are aligned with input_ids (labels[t] is token t or -100), as in HF; the logits at
        position t-1 score token t. Only positions that score a trained token request logits.
        """
        lc = self.llm
        ids = list(input_ids)[: self.n_ctx]
        lab = list(labels)[: self.n_ctx]
        want = [t - 1 for t in range(1, len(ids)) if lab[t] != -100]
        if not want:
            return 0.0, 0
        want_set = set(want)
        ctx = lc.ctx
        mem = self._lc.llama_get_memory(ctx)
        self._lc.llama_memory_clear(mem, True)
        lc.reset()
        n_batch = lc.n_batch
        batch = self._lc.llama_batch_init(n_batch, 0, 1)
        total = 0.0
        try:
            for start in range(0, len(ids), n_batch):
                chunk = ids[start:start + n_batch]
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = (start + i) in want_set
                rc = self._lc.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} at position {start}")
                for i in range(len(chunk)):
                    pos = start + i
                    if pos not in want_set:
                        continue
                    row = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))
                    row = row.astype(np.float64)
                    m = row.max()
                    lse = m + math.log(np.exp(row - m).sum())
                    total += lse - row[ids[pos + 1]]
        finally:
            self._lc.llama_batch_free(batch)
            self._lc.llama_memory_clear(mem, True)
            lc.reset()
        return float(total), len(want)

    def text_nll(self, text: str) -> tuple[float, int]:
        """NLL (nats) of plain text, every token after the first scored (the forgetting check)."""
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=False)
        return self.nll(ids, [-100] + list(ids[1:]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


class LocalChat:
    """`ollama-ft run --local`: stream an answer from a GGUF with llama.cpp (meant to live in a
    native_worker child). With `text` the prompt is already rendered (the Modelfile's TEMPLATE);
    otherwise llama.cpp applies the GGUF's own chat template to `messages`."""

    def __init__(self, gguf: Path, n_ctx: int = 4096):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, seed=0, verbose=False)

    def stream(self, text: str | None, messages: list[dict[str, str]], max_tokens: int, stops: list[str]):
        if text is not None:
            for c in self.llm.create_completion(text, max_tokens=max_tokens, stop=stops or None, stream=True):
                yield c["choices"][0].get("text", "")
        else:
            for c in self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, stop=stops or None,
                                                     stream=True):
                yield c["choices"][0].get("delta", {}).get("content", "") or ""

    def close(self) -> None:
        self.llm.close()


class ContainedLlamaCppEngine:
    """LlamaCppEngine in a child process (native_worker): a llama.cpp crash becomes a clear error and
    llama.cpp's log goes to `log_path` instead of the terminal. Same methods as LlamaCppEngine."""

    name = "llama_cpp"

    def __init__(self, gguf: Path, template: str, log_path: Path | None = None, **kwargs):
        from ..core.native_worker import Contained

        self.path = Path(gguf)
        if not self.path.is_file():
            raise UserError(f"GGUF not found: {self.path}", hint="run `ollama-ft export RUN` first")
        self._w = Contained("ollama_ft.eval.engines:LlamaCppEngine", self.path, template,
                            what=f"llama.cpp ({self.path.name})", log_path=log_path, **kwargs)
        self._stop_ids: set[int] = set()

    @property
    def stop_ids(self) -> set[int]:
        return self._stop_ids

    @stop_ids.setter
    def stop_ids(self, ids: set[int]) -> None:
        self._stop_ids = set(ids)
        self._w.set("stop_ids", set(ids))

    def piece(self, tok: int) -> str:
        return self._w.call("piece", tok)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self._w.call("prompt_tokens", messages)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int,
                 prompt: list[int] | None = None) -> Generation:
        return self._w.call("generate", messages, max_new_tokens, prompt=prompt)

    def nll(self, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
        return self._w.call("nll", list(input_ids), list(labels))

    def text_nll(self, text: str) -> tuple[float, int]:
        return self._w.call("text_nll", text)

    def close(self) -> None:
        self._w.close()


class OllamaEngine:
    """Generation through a running Ollama server (the registered model); no perplexity."""

    name = "ollama"

    def __init__(self, model: str, host: str | None, template: str):
        from ..ollama import api as ollama_api

        self._api = ollama_api
        self.model = model
        self.host = ollama_api.resolve_host(host)
        self.template = template
        if not ollama_api.is_reachable(self.host):
            raise UserError(f"Ollama is not reachable at {self.host} (eval.via: ollama)",
                            hint="start Ollama, or evaluate the GGUF files directly with `--via llama_cpp`")

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int,
                 prompt: list[int] | None = None) -> Generation:
        t0 = time.perf_counter()
        res: dict[str, Any] = self._api.chat_once(self.host, self.model, messages,
                                                  options={"temperature": 0, "top_k": 1, "seed": 0,
                                                           "num_predict": max_new_tokens})
        secs = time.perf_counter() - t0
        if res.get("eval_duration_ns"):
            secs = res["eval_duration_ns"] / 1e9  # decode time only, like llama.cpp's tokens/s
        n = int(res.get("eval_count") or 0)
        return Generation(str(res.get("content", "")).strip(), n, res.get("done_reason") == "length", secs)

    def nll(self, input_ids: list[int], labels: list[int]) -> tuple[float, int]:  # pragma: no cover
        raise NotImplementedError("the Ollama API does not return prompt log-likelihoods")

    def close(self) -> None:
        pass

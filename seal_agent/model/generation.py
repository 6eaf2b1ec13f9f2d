"""Prompt rendering and batched text generation with a Hugging Face model."""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from .precision import Precision, batch_dtype, computing_in

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # A JSON schema (as JSON text) every completion must match: decoding is constrained
    # to it token by token (model/constrained.py; the torch engine only).
    json_schema: str | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # token ids written, an end token included: never more than max_new_tokens
    finish_reason: str  # "stop" (an end token or a stop string) or "length" (max_new_tokens written)


class Decoder:
    """A decoding engine standing where a torch model would (vLLM's: engine/vllm.py):
    `complete` and `generate` hand it the prompts, and `with_adapter` is how a
    LoRA module or the policy adapter is applied to it (a request option, not a merge)."""

    def complete(self, prompts: list[str], sampling: Sampling, *, seed: int | None = None) -> list[Completion]:
        raise NotImplementedError

    def with_adapter(self, adapter_dir) -> Decoder:
        raise NotImplementedError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """Messages -> prompt text through the tokenizer's chat template, ending
    where the assistant's answer begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(
    tokenizer, *, system: str | None, user: str, base: str, use_chat: bool
) -> str:
    """A chat model gets system+user through its template; a base model (or
    use_chat off) gets the plain `base` text, which ends in a header to continue."""
    if use_chat and has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        return render_chat(tokenizer, messages)
    return base


def first_stop(text: str, stop: tuple[str, ...]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)


def until_stop(pieces: Iterator[str], stop: tuple[str, ...]) -> Iterator[str]:
    """A stream's pieces of text up to the first stop string (which may span pieces)."""
    emitted = ""
    for piece in pieces:
        text = emitted + piece
        cut = first_stop(text, stop)
        if cut >= 0:
            if cut > len(emitted):
                yield text[len(emitted) : cut]
            return
        emitted = text
        if piece:
            yield piece


def _truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = first_stop(text, stop)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_kwargs(tokenizer, sampling: Sampling) -> dict:
    """`model.generate` arguments for a Sampling (greedy at temperature 0)."""
    kwargs: dict = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    return kwargs


def _constrained_kwargs(model, tokenizer, sampling: Sampling) -> dict:
    from .constrained import json_processor

    return {"logits_processor": [json_processor(model, tokenizer, sampling.json_schema)]}


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix all `rows` share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


class _Preallocated(DynamicLayer):
    """A key/value cache layer written in place into room reserved for the whole
    generation: a plain layer concatenates (copies its whole cache) at every step."""

    def __init__(self, room: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.room, self.length = room, 0
        if keys is not None:
            self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = self._v = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[-2]:  # (re)serve room for this and the rest of the generation
            self._k, self._v = (torch.cat([t[:, :, : self.length], t.new_empty(*t.shape[:2], n + self.room, t.shape[3])],
                                          dim=-2) for t in (self._k, self._v))
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        return self._view()

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)
            self._view()

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._view()

    def reset(self) -> None:
        self.length = 0
        super().reset()


def _plain(cache) -> bool:
    """Whether a cache is plain per-layer keys and values (no sliding windows,
    no recurrent state): the only kind laid out or reserved here."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _cache(model, room: int, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache | None:
    """A cache with `room` tokens reserved per layer beyond `prefix` (keys and values
    already computed); None where the model's cache is not plain (`_plain`), which
    is left to the model's own."""
    cache = DynamicCache(config=model.config)
    if not _plain(cache):
        return None
    cache.layers = [_Preallocated(room, *kv) for kv in prefix] if prefix else \
        [_Preallocated(room) for _ in cache.layers]
    return cache


def _shared_prefix_inputs(model, rows: list[list[int]], groups: list, pad_id: int, room: int) -> dict | None:
    """Inputs for `model.generate` in which each group of rows with a common
    token prefix has that prefix's keys and values computed once, not per row.

    Row layout: [pad][prefix][pad][rest]. Prefixes end in the same column, so
    the cache covers the first P columns of every row; padding is masked and
    positions count only real tokens, so each row sees exactly its own prompt.
    None when no two rows share a prefix worth it."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    prefix = [0] * len(rows)
    for idx in members.values():
        if len(idx) > 1:  # keep one token of each row to be fed as input
            n = min(common_prefix([rows[i] for i in idx]), min(len(rows[i]) for i in idx) - 1)
            for i in idx:
                prefix[i] = n
    if max(prefix) < 16:
        return None
    p_max = max(prefix)
    s_max = max(len(r) - n for r, n in zip(rows, prefix))
    ids, mask = [], []
    for r, n in zip(rows, prefix):
        rest = len(r) - n
        ids.append([pad_id] * (p_max - n) + r[:n] + [pad_id] * (s_max - rest) + r[n:])
        mask.append([0] * (p_max - n) + [1] * n + [0] * (s_max - rest) + [1] * rest)
    device = next(model.parameters()).device
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for idx in members.values():
        n = prefix[idx[0]]
        if n == 0:
            continue
        past = model(input_ids=torch.tensor([rows[idx[0]][:n]], device=device), use_cache=True).past_key_values
        if not _plain(past):
            return None  # sliding windows, recurrent state: left to generate's own prefill
        kv = [(layer.keys, layer.values) for layer in past.layers]
        if layers is None:
            layers = [(k.new_zeros(len(rows), k.shape[1], p_max, k.shape[3]),
                       v.new_zeros(len(rows), v.shape[1], p_max, v.shape[3])) for k, v in kv]
        for (keys, values), (k, v) in zip(layers, kv):
            keys[idx, :, p_max - n:] = k[0]
            values[idx, :, p_max - n:] = v[0]
    cache = _cache(model, s_max + room, layers)
    if cache is None:
        return None
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device),
            "past_key_values": cache}


# Generation settings that make `model.generate` differ from plain argmax decoding.
_NOT_PLAIN = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
              "encoder_repetition_penalty": 1.0, "bad_words_ids": None, "suppress_tokens": None,
              "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
              "sequence_bias": None, "min_length": 0, "min_new_tokens": None}
# ...and its sampling from temperature, top-k and top-p alone.
_NOT_PLAIN_SAMPLING = {"top_h": None, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def _unset(model, settings: dict) -> bool:
    """Whether the model's generation config leaves each of `settings` unset or at its default."""
    gc = getattr(model, "generation_config", None)
    return gc is None or all(getattr(gc, key, None) in (None, default) for key, default in settings.items())


def plain_greedy(model) -> bool:
    """Whether greedy `model.generate` is plain argmax decoding for this model
    (its generation config adds no penalties, suppressions or forced tokens)."""
    return _unset(model, _NOT_PLAIN)


def plain_sampling(model) -> bool:
    """Whether sampling with `model.generate` draws from the temperature, top-k
    and top-p filtered distribution alone for this model (as `_picker` does)."""
    return _unset(model, _NOT_PLAIN) and _unset(model, _NOT_PLAIN_SAMPLING)


def default_top_k(generation_config: GenerationConfig | None) -> int:
    """The top-k `model.generate` samples with: the model's generation config's, else
    transformers' default (50); 0 for none. (vLLM is given the same: engine/vllm.py.)"""
    top_k = getattr(generation_config, "top_k", None)
    if top_k is None:
        defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
        top_k = defaults().get("top_k") if defaults else GenerationConfig().top_k
    return top_k or 0


def _picker(model, sampling: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next tokens from the last position's logits: argmax, or (temperature > 0)
    one draw from the distribution `model.generate` samples: temperature, then
    top-k, then top-p, then softmax and `torch.multinomial` on the global
    generator, one draw per row per step, as transformers does."""
    if sampling.temperature == 0:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if top_k := default_top_k(getattr(model, "generation_config", None)):
        warpers.append(TopKLogitsWarper(top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(warpers(None, logits.float()), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    return pick


def eos_ids(generation_config: GenerationConfig | None, tokenizer) -> set[int]:
    """The end tokens `model.generate` stops at: the generation config's, else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _decode(model, enc: dict, max_new_tokens: int, eos: set[int], pick: Callable[[torch.Tensor], torch.Tensor],
            finished: Callable[[int, list[int]], bool] | None) -> list[list[int]]:
    """Decoding of a batch (next tokens by `pick`, see `_picker`) in which a row
    stops as soon as it writes an end token or `finished(row, its new tokens)`
    says so; once a quarter of the batch has stopped, those rows leave it (and
    its cache), so later steps compute only the rows still writing. Greedy,
    each row gets the tokens `model.generate` writes, up to where the row
    stopped; sampling, the same draws as long as no row has left the batch."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache = enc["past_key_values"] if "past_key_values" in enc else DynamicCache(config=model.config)
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    rows = list(range(ids.shape[0]))  # the batch's rows, as indices into `new`
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # padding does not count
    start = cache.get_seq_length()
    step_ids, step_positions = ids[:, start:], positions[:, start:]
    stopped: set[int] = set()  # rows done but still computed until the batch is worth shrinking
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, past_key_values=cache,
                       use_cache=True, **last_only).logits[:, -1]
        tokens = pick(logits)
        for row, token in zip(rows, tokens.tolist()):
            if row in stopped:
                continue
            new[row].append(token)  # an end token too, as model.generate keeps it
            if token in eos or (finished is not None and finished(row, new[row])):
                stopped.add(row)
        keep = [j for j, row in enumerate(rows) if row not in stopped]
        if not keep:
            break
        if len(keep) <= len(rows) * 3 // 4:  # shrinking copies the cache: only once a quarter is done
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            mask, tokens, rows = mask[index], tokens[index], [rows[j] for j in keep]
        step_positions = mask.long().sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        step_ids = tokens[:, None]
    return new


def generate(model, tokenizer, prompts: list[str], sampling: Sampling, **kwargs) -> list[str]:
    """Complete each prompt: only the new text (see `complete`)."""
    return [c.text for c in complete(model, tokenizer, prompts, sampling, **kwargs)]


@torch.inference_mode()
def complete(
    model,
    tokenizer,
    prompts: list[str],
    sampling: Sampling,
    *,
    compute_dtype: Precision = torch.float32,
    batch_size: int = 8,
    seed: int | None = None,
    groups: list | None = None,
    done: Callable[[int, str], bool] | None = None,
) -> list[Completion]:
    """Complete each prompt; batched with left padding. Each completion is the
    new text only, with the tokens it took and why it ended.

    `groups` (one key per prompt): prompts of a group start alike (the same
    passage before different questions), and the keys and values of their
    common token prefix are computed once per batch instead of once per row.
    `done(i, text so far)`: prompt i's completion may stop there; the rest of
    its batch goes on without it.

    Decoding runs its own loop, in which a finished row leaves the batch:
    greedy is plain argmax and sampling draws from the temperature, top-k and
    top-p filtered distribution, as `model.generate` for models whose
    generation config adds nothing else (penalties, other filters; those go
    to `model.generate`, without `done`). Both write keys and values into room
    reserved for the whole completion."""
    if isinstance(model, Decoder):  # the engine batches for itself; `groups`, `done` are torch's economies
        return model.complete(prompts, sampling, seed=seed)
    if seed is not None:
        torch.manual_seed(seed)
    outputs: list[Completion] = []
    device = next(model.parameters()).device
    eos = eos_ids(getattr(model, "generation_config", None), tokenizer)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            with computing_in(model, batch_dtype(compute_dtype, len(chunk))):
                enc = None
                if groups is not None:
                    rows = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                    enc = _shared_prefix_inputs(model, rows, groups[start : start + batch_size],
                                                tokenizer.pad_token_id, sampling.max_new_tokens)
                if enc is None:
                    enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                    enc = {k: v.to(device) for k, v in enc.items()}
                    cache = _cache(model, sampling.max_new_tokens)
                    if cache is not None:
                        enc["past_key_values"] = cache
                # A schema's grammar masks every row of the batch at every step: model.generate's loop
                # (the masker is a logits processor), not ours, whose finished rows leave the batch.
                constrained = sampling.json_schema is not None
                if constrained:
                    kwargs = {**generate_kwargs(tokenizer, sampling),
                              **_constrained_kwargs(model, tokenizer, sampling)}
                    out = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
                    new = [_written(row, eos, tokenizer.pad_token_id) for row in out.tolist()]
                elif plain_greedy(model) if sampling.temperature == 0 else plain_sampling(model):
                    finished = None
                    if done is not None or sampling.stop:
                        def finished(i: int, tokens: list[int], at: int = start) -> bool:
                            text = tokenizer.decode(tokens, skip_special_tokens=True)
                            return first_stop(text, sampling.stop) >= 0 or (done is not None and done(at + i, text))
                    new = _decode(model, enc, sampling.max_new_tokens, eos, _picker(model, sampling), finished)
                else:
                    out = model.generate(**enc, **generate_kwargs(tokenizer, sampling))[:, enc["input_ids"].shape[1] :]
                    new = [_written(row, eos, tokenizer.pad_token_id) for row in out.tolist()]
                for row in new:
                    outputs.append(_completion(tokenizer, row, sampling, eos)[0])
    finally:
        tokenizer.padding_side = old_side
    return outputs


def _written(row: list[int], eos: set[int], pad: int | None = None) -> list[int]:
    """The tokens a row of `model.generate` wrote: up to its end token (kept), or
    without the `pad` it puts after a row that ended before the rest of its batch."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    end = len(row)
    while end and row[end - 1] == pad:
        end -= 1
    return row[:end]


def _completion(tokenizer, ids: list[int], sampling: Sampling, eos: set[int]) -> tuple[Completion, bool]:
    """A row's completion, and whether it was cut short: neither an end token,
    a stop string nor max_new_tokens ended it (`done`, a cancelled stream)."""
    text, stopped = _truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
    stopped = stopped or (bool(ids) and ids[-1] in eos)
    full = not stopped and len(ids) >= sampling.max_new_tokens
    return Completion(text.strip(), len(ids), "length" if full else "stop"), not stopped and not full


class _Until(StoppingCriteria):
    """Ends every row of a `model.generate` once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextStream:
    """One prompt's completion as pieces of text while `model.generate` writes
    it, on a thread of its own holding `lock` (one generation at a time).

    Iterating yields the text up to the first stop string and ends with the
    generation; then `completion` has the tokens it wrote and why it ended. A
    generation that failed raises its error in the reader. `cancel()` (the
    reader is gone, the server is stopping) ends the generation at its next
    token, or before it starts; so does a reader that leaves the loop early.
    The reader looks every `poll_s` whether it was cancelled, so nothing waits
    for ever on a generation that stopped writing."""

    def __init__(self, model, tokenizer, prompt: str, sampling: Sampling, *, lock: threading.Lock,
                 compute_dtype: torch.dtype = torch.float32, seed: int | None = None, poll_s: float = 0.25):
        self.model, self.tokenizer, self.prompt, self.sampling = model, tokenizer, prompt, sampling
        self.lock, self.compute_dtype, self.seed, self.poll_s = lock, compute_dtype, seed, poll_s
        self.completion = Completion("", 0, "stop")  # until the generation ends
        self._error: Exception | None = None
        self._cancel = threading.Event()
        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=poll_s)
        self._thread = threading.Thread(target=self._generate, name="text-stream", daemon=True)

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        self._thread.start()
        try:
            yield from until_stop(iter(self._next_piece, None), self.sampling.stop)
        finally:
            self._cancel.set()  # a reader gone or a stop string met; once the generation ended, nothing
        self._thread.join()  # at most one more token: it was told to stop
        if self._error is not None:
            raise self._error

    def _next_piece(self) -> str | None:
        """The next piece of text; None at the end of the generation, or once cancelled."""
        while True:
            try:
                return next(self._streamer)
            except StopIteration:
                return None
            except queue.Empty:
                if self._cancel.is_set():
                    return None

    def _generate(self) -> None:
        try:
            while not self.lock.acquire(timeout=self.poll_s):
                if self._cancel.is_set():
                    return
            try:
                if self._cancel.is_set():
                    return
                self._write()
            finally:
                self.lock.release()
        except Exception as e:  # noqa: BLE001 - any failure, raised again in the reader
            self._error = e
        finally:
            # model.generate ends the streamer when it returns; one that failed or
            # never ran must end it too, or the reader would wait for it. A second
            # end only queues a second stop after the first, never read.
            self._streamer.end()

    def _write(self) -> None:
        model, tokenizer, sampling = self.model, self.tokenizer, self.sampling
        if self.seed is not None:
            torch.manual_seed(self.seed)
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in
               tokenizer(self.prompt, return_tensors="pt", add_special_tokens=False).items()}
        kwargs = {**generate_kwargs(tokenizer, sampling), "streamer": self._streamer,
                  "stopping_criteria": StoppingCriteriaList([_Until(self._cancel)])}
        with torch.inference_mode(), computing_in(model, self.compute_dtype):
            out = model.generate(**enc, **kwargs)
        eos = eos_ids(getattr(model, "generation_config", None), tokenizer)
        ids = _written(out[0, enc["input_ids"].shape[1] :].tolist(), eos)
        self.completion, cut_short = _completion(tokenizer, ids, sampling, eos)
        if cut_short:
            log.info("generation cancelled after %d of %d tokens (its reader went away)",
                     self.completion.tokens, sampling.max_new_tokens)

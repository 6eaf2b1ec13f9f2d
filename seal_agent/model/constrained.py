"""Decoding constrained to a JSON schema, on the torch engine.

xgrammar (the library vLLM's structured outputs use) compiles the schema
against the tokenizer's vocabulary into a grammar, and its logits processor
masks, at every step of `model.generate`, each token that would leave the
schema. A completion that ends before `max_new_tokens` is then a JSON object
of that schema. The vLLM engine refuses a schema (engine/vllm.py: its
structured outputs did not hold to it on the CPU build), so constrained
decoding is this engine's.
"""

from __future__ import annotations

import threading
import weakref

import xgrammar

# Per tokenizer (for as long as it lives): its grammars by (vocabulary size, schema).
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _vocab_size(model, tokenizer) -> int:
    # The model's embedding rows may outnumber the tokenizer's tokens (padding);
    # the mask must cover every row the logits have.
    config = getattr(model, "config", None)
    return max(getattr(config, "vocab_size", 0) or 0, len(tokenizer))


def compiled(model, tokenizer, schema: str) -> xgrammar.CompiledGrammar:
    """The schema's grammar for this tokenizer and vocabulary size, compiled once."""
    size = _vocab_size(model, tokenizer)
    with _lock:
        grammars = _compiled.setdefault(tokenizer, {})
        if (size, schema) not in grammars:
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size)
            # No free whitespace: a small model would spend its tokens on indentation.
            grammars[size, schema] = xgrammar.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
        return grammars[size, schema]


def json_processor(model, tokenizer, schema: str):
    """A logits processor for one `model.generate` call (xgrammar's are single-use)."""
    from xgrammar.contrib.hf import LogitsProcessor

    return LogitsProcessor(compiled(model, tokenizer, schema))

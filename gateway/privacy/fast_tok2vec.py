"""spaCy's NER token vectors (Tok2Vec.v2: MultiHashEmbed + MaxoutWindowEncoder) in a few numpy calls.

The network is small and its matrix products are most of its cost, but through thinc a 1 KB
prompt also pays for some sixty layer calls, list/ragged/padded conversions and an unvectorised
maxout: about a quarter of the time, measured here. This runs the same operations, in the same
order, on the model's own parameters, so the vectors are bitwise identical to thinc's (the test
suite checks that): hashing and summing embedding rows with thinc's own kernels, the same
products, layer norms written as thinc writes them, and the encoder's windows over sequences
joined with thinc's zero padding, which the padding rows' values depend on.

Only the shape that was checked is accepted (`FastTok2Vec.for_model` returns None otherwise, and
the caller keeps thinc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from thinc.api import Model


def _param(layer: Model, name: str) -> np.ndarray:
    # thinc types its parameters as its own array unions; at run time they are numpy arrays, and
    # np.asarray of one is the same object (no copy: the vectors stay bitwise thinc's).
    return np.asarray(layer.get_param(name))


@dataclass(frozen=True)
class _Maxout:
    w_t: np.ndarray  # (nI, nO * nP), a transposed view: the product thinc computes
    b: np.ndarray  # (nO * nP,)
    n_out: int
    n_pieces: int

    @classmethod
    def of(cls, layer: Model) -> _Maxout:
        w = _param(layer, "W")
        n_out, n_pieces, n_in = w.shape
        return cls(w.reshape(n_out * n_pieces, n_in).T, _param(layer, "b").reshape(n_out * n_pieces), n_out, n_pieces)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.dot(x, self.w_t)
        y += self.b
        pieces = y.reshape(len(y), self.n_out, self.n_pieces)
        best = pieces[:, :, 0].copy()
        for p in range(1, self.n_pieces):
            np.maximum(best, pieces[:, :, p], out=best)
        return best


@dataclass(frozen=True)
class _LayerNorm:
    g: np.ndarray
    b: np.ndarray

    @classmethod
    def of(cls, layer: Model) -> _LayerNorm:
        return cls(_param(layer, "G"), _param(layer, "b"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # thinc's expression, term for term (X.var's own arithmetic included).
        mu = x.mean(axis=1, keepdims=True)
        var = x.var(axis=1, keepdims=True) + 1e-08
        y = (x - mu) * var ** (-1.0 / 2.0) * self.g
        y += self.b
        return y


class FastTok2Vec:
    """Token vectors for a list of (tokens, columns) feature arrays, one per sequence."""

    def __init__(self, ops: Any, columns: list[str], embeds: list[tuple[int, int, np.ndarray]],
                 mix: tuple[_Maxout, _LayerNorm], pad: int, blocks: list[tuple[int, _Maxout, _LayerNorm]],
                 out_w_t: np.ndarray, out_b: np.ndarray) -> None:
        self._ops = ops  # thinc's NumpyOps: its hash / gather_add / seq2col kernels, typed for thinc's arrays
        self.columns: list[int | str] = list(columns)
        self._embeds = embeds  # (feature column, hash seed, table)
        self._mix = mix
        self._pad = pad
        self._blocks = blocks  # (window, maxout, layer norm), each inside a residual
        self._out_w_t = out_w_t
        self._out_b = out_b

    @classmethod
    def for_model(cls, tok2vec: Model) -> FastTok2Vec | None:
        """The fast path for spaCy's Tok2Vec.v2 as the small English pipelines build it, else None."""
        try:
            embed_encode, to_array, linear = tok2vec.layers
            embed, encode = embed_encode.layers
            extract, to_ragged, hashed, mixed, to_list = embed.layers
            if ([to_array.name, linear.name, extract.name, to_ragged.name, to_list.name]
                    != ["list2array", "linear", "extract_features", "list2ragged", "ragged2list"]):
                return None
            embeds = []
            for branch in hashed.layers[0].layers:  # concatenate(ints-getitem >> hashembed, ...)
                getitem, table = branch.layers
                index = getitem.attrs["index"]
                rows = index[0] if isinstance(index, tuple) and len(index) == 2 else None
                if table.name != "hashembed" or not isinstance(rows, slice) or rows.indices(1) != (0, 1, 1):
                    return None  # not "every row, one column"
                embeds.append((int(index[1]), int(table.attrs["seed"]), _param(table, "E")))
            (maxout_norm_dropout,) = mixed.layers
            maxout_norm, _dropout = maxout_norm_dropout.layers  # dropout: inactive at inference
            maxout, norm = maxout_norm.layers
            if [maxout.name, norm.name] != ["maxout", "layernorm"]:
                return None
            blocks = []
            for residual in encode.layers[0].layers:
                window, maxout_norm_dropout = residual.layers[0].layers
                block_maxout, block_norm = maxout_norm_dropout.layers[0].layers
                if (residual.name.split("(")[0] != "residual" or window.name != "expand_window"
                        or [block_maxout.name, block_norm.name] != ["maxout", "layernorm"]):
                    return None
                blocks.append((int(window.attrs["window_size"]), _Maxout.of(block_maxout), _LayerNorm.of(block_norm)))
            return cls(maxout.ops, list(extract.attrs["columns"]), embeds, (_Maxout.of(maxout), _LayerNorm.of(norm)),
                       int(encode.attrs["pad"]), blocks, _param(linear, "W").T, _param(linear, "b"))
        except (ValueError, KeyError, AttributeError, TypeError, IndexError):
            return None

    def __call__(self, sequences: list[np.ndarray]) -> np.ndarray:
        """The rows of every sequence, one after the other: (total tokens, width)."""
        features = sequences[0] if len(sequences) == 1 else np.concatenate(sequences)
        vectors = []
        for column, seed, table in self._embeds:
            keys = self._ops.hash(np.ascontiguousarray(features[:, column], dtype="uint64"), seed) % table.shape[0]
            vectors.append(self._ops.gather_add(table, keys))
        maxout, norm = self._mix
        x = norm(maxout(np.hstack(vectors)))
        # The encoder sees the sequences joined by `pad` zero rows, as thinc's with_array lays them out.
        zeros = np.zeros((self._pad, x.shape[1]), dtype=x.dtype)
        joined, row = [zeros], 0
        starts: list[int] = []
        for seq in sequences:
            starts.append(row + self._pad * len(starts) + self._pad)
            joined += [x[row : row + len(seq)], zeros]
            row += len(seq)
        h = np.concatenate(joined)
        for window, block_maxout, block_norm in self._blocks:
            h = h + block_norm(block_maxout(self._ops.seq2col(h, window)))
        rows = [h[start : start + len(seq)] for start, seq in zip(starts, sequences, strict=True)]
        y = np.dot(rows[0] if len(rows) == 1 else np.concatenate(rows), self._out_w_t)
        y += self._out_b
        return y

"""Magnets: text tokens that draw image→text attention out of proportion to their meaning.

Definitions (DESIGN.md §6), per sample, step and layer, from ``cross`` (image queries → text keys):

- **share** of a text token ``t``: its part of the image→text attention,
  ``Σ_q P[q, t] / Σ_q Σ_{t'} P[q, t']``, averaged over heads (it sums to 1 over text tokens);
- **kind share**: the summed share of each token kind (``content``, ``stop``, ``pad``,
  ``special``, ``magnet``): how much stop words, padding, special and appended magnet tokens
  take against content words;
- **attraction** of a token: its share over the mean share of a content token (1 = as much as
  an average content word; NaN when the prompt has no content word);
- a token **acts as a magnet** when its kind is one of ``kinds`` (not a content word, by
  default) and its attraction is at least ``factor``.

A global attention sink on a non-content text token (a padding sink) is also a magnet by this
definition: it takes image→text attention out of proportion.

>>> from attnlens.analysis import synthetic, find_magnets, magnet_words
>>> ds = synthetic.planted(layers=3, heads=2, steps=1, grid=(4, 4), magnets=["the"], magnet_layers=[1])
>>> magnet_words(find_magnets(ds))[["word", "kind", "layers"]].values.tolist()
[['the', 'stop', 'block.1']]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ._common import carry_coords, one_hot, require

__all__ = ["MAGNET_KINDS", "find_magnets", "magnet_words"]

#: token kinds that can act as magnets by default
MAGNET_KINDS = ("stop", "pad", "special", "magnet")


def find_magnets(ds: xr.Dataset, *, factor: float = 2.0, kinds: tuple[str, ...] = MAGNET_KINDS) -> xr.Dataset:
    """Image→text attention shares per token and token kind, and the tokens acting as magnets.

    Args:
        ds: a capture or store holding ``cross`` and ``token_kind`` (``sample``, ``step`` optional).
        factor: smallest attraction of a magnet, in units of an average content token (2).
        kinds: token kinds that can be magnets (default stop words, padding, special and
            appended magnet tokens).

    Returns:
        A Dataset, lazy when ``ds`` is: ``share``, ``attraction``, ``magnet`` ``(…, layer,
        key_text)``; ``kind_share`` ``(…, layer, kind)`` and ``kind_attraction`` (mean attraction
        of a token of each kind) ``(…, layer, kind)``; ``…`` = ``sample, step`` where present.
    """
    require(ds, "cross", "token_kind", analysis="find_magnets")
    mass = ds["cross"].reset_coords(drop=True).sum("query", skipna=False)  # NaN (no such layer) stays NaN
    share = mass / mass.sum("key_text")
    if "head" in share.dims:
        share = share.mean("head")
    token_kind = ds["token_kind"]
    content = token_kind.astype(str) == "content"
    content_share = share.where(content).mean("key_text")
    attraction = share / content_share
    candidate = token_kind.astype(str).isin(list(kinds))
    hot = one_hot(token_kind, "kind")
    counts = hot.sum("key_text")
    out = xr.Dataset(
        {
            "share": share,
            "attraction": attraction,
            "magnet": (candidate & (attraction >= factor)).transpose(*share.dims),
            "kind_share": xr.dot(share, hot, dim="key_text"),
            "kind_attraction": xr.dot(attraction.fillna(0.0), hot, dim="key_text") / counts.where(counts > 0),
        }
    )
    out.attrs = {"factor": factor, "kinds": list(kinds)}
    return carry_coords(out, ds)


def magnet_words(magnets: xr.Dataset) -> pd.DataFrame:
    """Which words act as magnets, over all samples, steps and layers of a :func:`find_magnets` result.

    Returns:
        one row per (word, kind) that is a magnet somewhere, most frequent first: ``word`` (the
        token string for padding and special tokens), ``kind``, ``layers`` (where it is a magnet
        at least once), ``frequency`` (share of its occurrences × steps × layers where it is),
        ``attraction`` and ``share`` (means where it is). Computes only ``(…, layer, key_text)``
        arrays.
    """
    small = magnets[["magnet", "attraction", "share"]].compute()
    flags = small["magnet"]
    columns = ["word", "kind", "layers", "frequency", "attraction", "share"]
    found = np.nonzero(flags.values)
    if not len(found[0]):
        return pd.DataFrame(columns=columns)
    at = dict(zip(flags.dims, found, strict=True))
    words = np.asarray(magnets["word"].values).astype(str)
    tokens = np.asarray(magnets["token_str"].values).astype(str)
    names = np.where(words != "", words, tokens)
    kinds = np.asarray(magnets["token_kind"].values).astype(str)
    label_at = (at["sample"], at["key_text"]) if names.ndim == 2 else (at["key_text"],)
    layer_order = {str(v): i for i, v in enumerate(flags["layer"].values)}
    hits = pd.DataFrame(
        {
            "word": names[label_at],
            "kind": kinds[label_at],
            "layer": flags["layer"].values[at["layer"]].astype(str),
            "attraction": small["attraction"].values[found],
            "share": small["share"].values[found],
        }
    )
    table = hits.groupby(["word", "kind"], sort=False).agg(
        layers=("layer", lambda s: ", ".join(sorted(set(s), key=layer_order.__getitem__))),
        hits=("layer", "size"),
        attraction=("attraction", "mean"),
        share=("share", "mean"),
    )
    # how often each word could have been a magnet: its occurrences in every step and layer
    per_sample = np.prod([flags.sizes[d] for d in flags.dims if d not in ("sample", "key_text")])
    occurrences = pd.DataFrame({"word": names.ravel(), "kind": kinds.ravel()}).value_counts() * per_sample
    table["frequency"] = table["hits"] / occurrences.reindex(table.index).to_numpy()
    table = table.reset_index().sort_values("frequency", ascending=False, kind="stable")
    return table[columns].reset_index(drop=True)

"""Attention stores: a capture run as a zarr v3 group, read back lazily as an ``xarray.Dataset``.

A store holds the variables, coordinates and attributes of :mod:`attnlens.schema` along a
``sample`` dimension that grows as samples finish. ``attnlens.capture(model, store=...)``
streams each finished sample to it through a :class:`StoreWriter` (a background thread
behind a bounded queue); :func:`open_store` returns a Dataset whose variables are dask
arrays, so that opening reads metadata only and analyses run out of core. :func:`plan` says
how many bytes a capture will write before it runs.

>>> import attnlens
>>> from attnlens.testing import tiny_flux_transformer, flux_inputs
>>> model = tiny_flux_transformer()
>>> with attnlens.capture(model, keep="cross", heads="mean", store="memory://doc/run.zarr") as cap:
...     for seed in range(3):
...         with cap.sample(f"img{seed}"):
...             _ = model(**flux_inputs(model, height=4, width=6, seed=seed))
>>> ds = attnlens.open_store("memory://doc/run.zarr")
>>> ds.cross.dims, ds.sizes["sample"], list(ds.sample_id.values)
(('sample', 'step', 'layer', 'head', 'query', 'key_text'), 3, ['img0', 'img1', 'img2'])
>>> bool((ds.cross == cap.result.cross).all())
True

The package has one module per job: :mod:`.location` (what a location holds, the claim
primitives), :mod:`.layout` (chunks, codecs, storage dtype), :mod:`.records` (which samples are
complete and what each wrote), :mod:`.writer`, :mod:`.reader` and :mod:`.planning`.

Layout of a store (one zarr v3 group):

- one array per data variable, in chunks of one sample holding as many leading steps and
  layers as fit in 32 MiB (or, with ``layout="shards"``, inner chunks of one step and layer
  packed in shards); no compression by default;
- one array per coordinate: along ``step``/``layer``/... written once, along ``sample``
  (token strings, words, kinds) one chunk per sample; strings are variable-length UTF-8;
- ``_attnlens/``: a record per complete sample (its id, prompt, and each chunk's key, size and
  crc32c), written after all of its chunks, so that a sample cut short by a crash is never
  read and damage is found; the index consolidating the records; leases of samples being
  written; claims of a growing store's slots;
- root attributes ``attnlens`` (versions, sample-id mode, digests of every array's metadata)
  and ``capture`` (model, config hash, spec, versions).

Sample ids: without ``sample_ids`` a store grows, one slot per new sample (ids ``"0"``,
``"1"``, ... unless named with :meth:`attnlens.Capture.sample`); writers in several processes
may append at once, each claiming its slots. With ``sample_ids=[...]`` (the same list in every
process) the store holds one slot per declared id from the start, and any number of processes
fill disjoint slots, e.g. under ``torchrun``::

    ids = [f"img{i}" for i in range(len(dataset))]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with attnlens.capture(pipe, spec, store="s3://bucket/run.zarr", sample_ids=ids) as cap:
        for sid in cap.pending(ids[rank::world]):  # skips samples completed by an earlier run
            with cap.sample(sid):
                pipe(prompts[sid], ...)
"""

from __future__ import annotations

from .planning import Plan, plan
from .reader import open_store, stored_bytes, verify_store
from .writer import SampleStream, StoreWriter

__all__ = ["Plan", "SampleStream", "StoreWriter", "open_store", "plan", "stored_bytes", "verify_store"]

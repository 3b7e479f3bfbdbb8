"""Damage to a finished store is found: by ``verify_store`` / ``attnlens inspect --verify``, and by
reading the damaged sample, which raises ``CorruptStoreError`` naming it instead of returning data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import attnlens
from attnlens.cli import main as cli_main
from attnlens.errors import CorruptStoreError
from attnlens.store import StoreWriter, open_store, verify_store
from attnlens.testing import flux_inputs, tiny_flux_transformer


@pytest.fixture(scope="module", params=["chunks", "shards"])
def finished(request, tmp_path_factory):
    """A store of three samples ('a', 'b', 'c'), written once per layout and copied for each test."""
    path = tmp_path_factory.mktemp(request.param) / "run.zarr"
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    writer = StoreWriter(path, layout=request.param)
    with attnlens.capture(model, keep=("cross", "key_mass"), store=writer) as cap:
        for i, name in enumerate("abc"):
            with cap.sample(name):
                model(**flux_inputs(model, seed=i))
    return path


@pytest.fixture
def store(finished, tmp_path):
    path = tmp_path / "run.zarr"
    shutil.copytree(finished, path)
    return path


def _chunk(path, array, slot):
    """A chunk (or shard) file of one sample."""
    return sorted((path / array).glob(f"c.{slot}.*"))[0]


def _reads_fail(path, match):
    """Sample 'b' (slot 1) fails to read with ``match``; 'a' and 'c' still read."""
    ds = open_store(path)
    ds.sel(sample=0).load(), ds.sel(sample=2).load()
    with pytest.raises(CorruptStoreError, match=match):
        ds.sel(sample=1).load()
    with pytest.raises(CorruptStoreError, match=match):
        ds.load()  # never returned as data, whatever the selection


def _verify_names(path, *texts):
    problems = verify_store(path)
    assert problems and all(any(t in p for p in problems) for t in texts), problems
    assert cli_main(["inspect", str(path), "--verify"]) == 1
    return problems


def test_an_undamaged_store_verifies(store, capsys):
    assert verify_store(store) == []
    assert cli_main(["inspect", str(store), "--verify"]) == 0
    assert "verified 3 sample(s): 0 problem(s)" in capsys.readouterr().out


def test_a_deleted_chunk(store):
    _chunk(store, "cross", 1).unlink()
    _reads_fail(store, r"chunk cross/c\.1\.[0-9.]+ of sample 'b' is missing")
    _verify_names(store, "cross, sample 'b': chunk cross/c.1.", "is missing")


def test_a_truncated_chunk(store):
    chunk = _chunk(store, "cross", 1)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    _reads_fail(store, r"sample\(?s?\)? '?b'?.*(truncated|cannot be decoded)")
    _verify_names(store, "cross, sample 'b'", "truncated")


def test_an_altered_chunk(store):
    chunk = _chunk(store, "cross", 1)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte, the size unchanged
    chunk.write_bytes(bytes(data))
    _reads_fail(store, r"sample\(?s?\)? '?b'?.*(crc32c|damaged|cannot be decoded)")
    _verify_names(store, "cross, sample 'b'", "differs from what its writer wrote")


def test_a_deleted_token_label_chunk(store):
    _chunk(store, "token_str", 1).unlink()
    with pytest.raises(CorruptStoreError, match="of sample 'b' is missing"):
        open_store(store).attnlens.tokens(sample="b")
    _verify_names(store, "token_str, sample 'b'")


def test_a_deleted_array(store, capsys):
    (store / "key_mass" / "zarr.json").unlink()
    with pytest.raises(
        CorruptStoreError, match=r"array 'key_mass' is missing \(key_mass/zarr.json is gone\)"
    ):
        open_store(store)
    assert cli_main(["inspect", str(store)]) == 2  # noticed without --verify
    assert "array 'key_mass' is missing" in capsys.readouterr().out
    _verify_names(store, "array 'key_mass' is missing")


def test_edited_array_metadata(store):
    meta_path = store / "cross" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["fill_value"] = 0.0  # a missing chunk would now read as zeros
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match=r"metadata of array 'cross' .* edited or damaged"):
        open_store(store)
    _verify_names(store, "metadata of array 'cross'")


def test_edited_root_attributes(store):
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["capture"]["config_hash"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match=r"root attributes .* edited or damaged"):
        open_store(store)
    with pytest.raises(CorruptStoreError, match="root attributes"):
        verify_store(store)


def test_a_damaged_record(store):
    (record,) = (store / "_attnlens" / "samples" / "0").glob("1.*.json")
    record.write_text('{"slot": 1, "id": "b"')  # cut short
    _reads_fail(store, r"the record .* is damaged")  # the index still lists 'b'
    _verify_names(store, "sample 'b'", "is damaged")
    (store / "_attnlens" / "index.json").unlink()
    ds = open_store(store)  # without the index, the damaged record is found when the store opens
    assert list(ds.sample_id.values) == ["a", "c"]
    assert list(ds.encoding["damaged"]) == [1]


def test_a_damaged_index_is_ignored_and_reported(store):
    index = store / "_attnlens" / "index.json"
    index.write_bytes(index.read_bytes().replace(b'"b"', b'"x"'))
    assert list(open_store(store).sample_id.values) == ["a", "b", "c"]
    assert verify_store(store) == [
        "the index (_attnlens/index.json) is damaged: it is ignored, and rewritten by the next writer"
    ]


def test_analyses_stop_at_the_damage(store, capsys):
    _chunk(store, "key_mass", 1).unlink()
    assert cli_main(["sinks", str(store), "--out", ""]) == 2
    assert "of sample 'b' is missing" in capsys.readouterr().out


def test_the_index_is_a_cache_that_cannot_be_stale(store):
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    index = store / "_attnlens" / "index.json"
    old = index.read_bytes()
    with attnlens.capture(model, keep=("cross", "key_mass"), store=store) as cap:
        with cap.sample("b"):  # rewritten: its record gets a new name
            model(**flux_inputs(model, seed=7))
        with cap.sample("d"):
            model(**flux_inputs(model, seed=8))
    index.write_bytes(old)  # as if the writer had died before consolidating
    ds = open_store(store).load()
    assert list(ds.sample_id.values) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(ds.cross.sel(sample=1), cap.result.cross.sel(sample=1))  # the new b

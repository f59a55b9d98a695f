"""`llava-evaclip features` at dataset scale (LLaVA's 558K / 665K image sets, many ranks), tested by counting the work
that grows with the number of images, never by timing: the start-up checks of --format files list each output folder
once instead of a stat per image, and resuming a store of N files reads N headers over all ranks, not N per rank."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from llava_evaclip import features as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_features import save_tower, write_image  # noqa: E402
from test_features_multinode import ThreadGroup  # noqa: E402

SETTINGS = {"model": "m", "weights_fingerprint": "blake2b:0", "random_weights": "false", "select_layer": "-2",
            "select_feature": "patch", "image_size": "28", "dtype": "float32"}


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> str:
    return save_tower(tmp_path_factory.mktemp("tower"), seed=1)


def count_stats(monkeypatch) -> list:
    """Every os.stat (os.path.exists / isdir / isfile go through it) made from now on."""
    calls: list = []
    stat = os.stat

    def counting(*args, **kwargs):
        calls.append(args[0])
        return stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    return calls


@pytest.mark.parametrize("existing", [False, True])
def test_files_startup_checks_stat_per_folder_not_per_image(tmp_path, monkeypatch, existing):
    """600K images at a network file system's ~0.3 ms a stat took minutes per rank before the first image."""
    folders, per_folder = 3, 60
    items = [F.ImageItem(str(tmp_path / "in" / f"d{folder}" / f"{index}.png"), f"d{folder}/{index}.png")
             for folder in range(folders) for index in range(per_folder)]
    out = tmp_path / "out"
    if existing:  # some outputs and their folders exist (a resumed run): other files than ours, so nothing is read
        for folder in range(folders - 1):
            (out / f"d{folder}").mkdir(parents=True)
            (out / f"d{folder}" / "0.png.safetensors").write_bytes(b"x")
    monkeypatch.setattr(F, "_existing_mismatch", lambda *args, **kwargs: None)
    calls = count_stats(monkeypatch)
    F._check_planned_outputs(items, str(out))
    todo, kept, failures = F.plan(items, str(out), SETTINGS, "files")
    assert (len(todo), kept, failures) == ((folders * per_folder - 2, 2, []) if existing
                                           else (folders * per_folder, 0, []))
    assert len(calls) <= 4 * folders, calls


def test_files_startup_checks_keep_their_answers(tmp_path):
    """The listing gives what a stat per path gave: a folder in an output's place, a file where a folder must be,
    an output behind a symlink (kept when its target exists, computed when it dangles)."""
    out = tmp_path / "out"
    (out / "a" / "x.png.safetensors").mkdir(parents=True)
    (out / "b").write_bytes(b"user file")
    (out / "c").mkdir()
    os.symlink(tmp_path / "nowhere", out / "c" / "dangling.png.safetensors")
    folder_item = F.ImageItem(str(tmp_path / "a" / "x.png"), "a/x.png")
    file_item = F.ImageItem(str(tmp_path / "b" / "y.png"), "b/y.png")
    with pytest.raises(ValueError, match="x.png.safetensors is a folder"):
        F._check_planned_outputs([folder_item], str(out))
    with pytest.raises(ValueError, match=r"out/b is a file, not a folder"):
        F._check_planned_outputs([file_item], str(out))
    dangling = F.ImageItem(str(tmp_path / "c" / "dangling.png"), "c/dangling.png")
    F._check_planned_outputs([dangling], str(out))
    assert F.plan([dangling], str(out), SETTINGS, "files") == ([dangling], 0, [])


def test_resume_reads_each_existing_file_once_over_all_ranks(tower_dir, tmp_path, monkeypatch):
    """Every rank used to open every existing output: N x world_size header reads on one shared folder. Each rank
    now reads its share; kept and the refusals are still the whole store's, on every rank's report as before."""
    images = tmp_path / "images"
    for index in range(10):
        write_image(images / f"d{index % 2}" / f"{index:02d}.png", seed=index)
    out = tmp_path / "out"
    tower = F.load_tower(tower_dir)
    assert F.extract_features(tower, [str(images)], str(out), batch_size=4).written == 10
    for name in ("d0/02.png", "d1/07.png"):  # refused on resume, by whichever rank reads it (rank 1, rank 0)
        (out / f"{name}.safetensors").write_bytes(b"not features")

    reads: dict = {}
    check = F._existing_mismatch

    def counting(path, *args, **kwargs):
        reads.setdefault(threading.get_ident(), []).append(path)
        return check(path, *args, **kwargs)

    monkeypatch.setattr(F, "_existing_mismatch", counting)
    group, sent = ThreadGroup(2), []
    make_context = group.context

    def recording_context(rank):
        context = make_context(rank)
        gather = context.gather
        context.gather = lambda value: (sent.append(repr(value)), gather(value))[1]
        return context

    group.context = recording_context
    results = group.run(lambda rank, context: F.extract_features(
        F.load_tower(tower_dir), [str(images)], str(out), batch_size=4, context=context))
    assert not any(isinstance(result, BaseException) for result in results), results
    assert sorted(len(paths) for paths in reads.values()) == [5, 5]
    assert len({path for paths in reads.values() for path in paths}) == 10
    report = results[0]
    assert (report.total, report.kept, report.written) == (10, 8, 0)
    assert [path for path, _ in report.failures] == [str(images / "d0" / "02.png"), str(images / "d1" / "07.png")]
    assert all("not a readable features file" in reason for _, reason in report.failures)
    assert results[1].failures == report.failures  # every rank knows (its exit status), as before
    # and each refusal crossed between ranks once (from the share that read it), not again in rank 0's report
    assert sum(payload.count("02.png.safetensors exists") for payload in sent) == 1
    assert sum(payload.count("07.png.safetensors exists") for payload in sent) == 1


def test_files_writer_makes_each_folder_once_and_again_when_removed(tmp_path, monkeypatch):
    """os.makedirs per image was a mkdir and a stat per output (two network round trips of six) for 558K images."""
    import torch

    calls: list = []
    mkdir = os.mkdir
    monkeypatch.setattr(os, "mkdir", lambda path, *args, **kwargs: (calls.append(path), mkdir(path, *args, **kwargs)))
    out = tmp_path / "out"
    writer = F.FileWriter(str(out), SETTINGS)
    results = [F.Extracted(F.ImageItem(str(tmp_path / f"{index}.png"), f"d{index % 3}/{index}.png"),
                           torch.full((2, 4), float(index)), "8x8") for index in range(60)]
    for result in results[:30]:
        writer.add(result)
    assert len(calls) <= 3 + 2, calls  # the three folders (and OUT itself with its parent)
    for name in os.listdir(out / "d0"):  # a user removes a folder during the run: it is made again
        os.remove(out / "d0" / name)
    os.rmdir(out / "d0")
    for result in results[30:]:
        writer.add(result)
    assert writer.written == 60
    store = F.FeatureStore(out)
    assert len(store) == 50 and torch.equal(store["d0/57.png"], torch.full((2, 4), 57.0))


def test_the_shard_index_is_rewritten_only_with_new_fragments_by_the_c_encoder(tower_dir, tmp_path, monkeypatch):
    """Every run rewrote index.json, ~130 MB at 600K images, with json's pure-Python encoder (indent=0): 13 s at the
    end of a resumed run that computed nothing. Counted here: index writes, and calls into the Python encoder."""
    import json.encoder

    images = tmp_path / "images"
    for index in range(3):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    tower = F.load_tower(tower_dir)

    def python_encoder(*args, **kwargs):
        raise AssertionError("the index went through json's pure-Python encoder")

    monkeypatch.setattr(json.encoder, "_make_iterencode", python_encoder)
    F.extract_features(tower, [str(images)], str(out), format="shards", shard_size_mb=0.001)
    before = os.stat(out / "index.json")
    report = F.extract_features(tower, [str(images)], str(out), format="shards")
    assert (report.written, report.kept) == (0, 3)
    assert os.stat(out / "index.json").st_ino == before.st_ino  # not replaced
    write_image(images / "3.png", seed=3)
    assert F.extract_features(tower, [str(images)], str(out), format="shards").written == 1
    assert os.stat(out / "index.json").st_ino != before.st_ino
    store = F.FeatureStore(out)
    assert sorted(store) == ["0.png", "1.png", "2.png", "3.png"] and store._unmerged == 0 and store.verify() == []


def test_headers_are_read_without_safe_open_and_checked_as_it_checks_them(tower_dir, tmp_path, monkeypatch):
    """safe_open(framework="pt") opened and mapped each file twice to give its metadata: a resume, or a training run
    over a store of 600K files, reads every header. The header reader gives safe_open's metadata, and refuses what it
    refuses: a file cut short, a header that is not JSON, data beyond what the header describes."""
    import safetensors
    import torch
    from safetensors.torch import save_file

    images = tmp_path / "images"
    for index in range(4):
        write_image(images / f"{index}.png", seed=index)
    out = tmp_path / "out"
    tower = F.load_tower(tower_dir)
    F.extract_features(tower, [str(images)], str(out))
    F.extract_features(tower, [str(images)], str(tmp_path / "shards"), format="shards")
    good = [*map(str, out.glob("*.safetensors")), *map(str, (tmp_path / "shards" / "shards").glob("*.safetensors")),
            *map(str, Path(tower_dir).glob("*.safetensors"))]
    save_file({"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.int64)}, str(tmp_path / "plain.safetensors"))
    good.append(str(tmp_path / "plain.safetensors"))
    for path in good:
        with safetensors.safe_open(path, framework="pt") as handle:
            assert F.FeatureStore._file_metadata(path) == (handle.metadata() or {}), path
    data = (out / "0.png.safetensors").read_bytes()
    for name, content in [("empty", b""), ("short", data[:5]), ("cut", data[:-1]), ("longer", data + b"\0"),
                          ("not_json", len(b"{x").to_bytes(8, "little") + b"{x"),
                          ("huge", (1 << 40).to_bytes(8, "little"))]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(Exception):
            with safetensors.safe_open(str(path), framework="pt") as handle:
                handle.metadata()
        with pytest.raises(ValueError):
            F.FeatureStore._file_metadata(str(path))

    def no_safe_open(*args, **kwargs):
        raise AssertionError("safe_open was used to read a header")

    monkeypatch.setattr(safetensors, "safe_open", no_safe_open)
    assert len(F.FeatureStore(out)) == 4
    assert F.plan(F.find_images([str(images)])[0], str(out), F.tower_settings(tower), "files")[1] == 4


def test_a_name_listed_only_in_another_case_or_normalisation_is_asked_of_the_file_system(tmp_path, monkeypatch):
    """On macOS's or Windows' file systems `Cat.png.safetensors` and `cat.png.safetensors`, or a name in NFC and in
    NFD, are one file: the listing cannot tell, so such a name (and only such a name) gets its own stat."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "CAT.PNG.safetensors").write_bytes(b"x")
    (out / "cafe\u0301.png.safetensors").write_bytes(b"x")  # NFD
    items = [F.ImageItem(str(tmp_path / name), name) for name in ("cat.png", "caf\u00e9.png", "dog.png")]
    calls = count_stats(monkeypatch)
    F._check_planned_outputs(items, str(out))
    assert F.plan(items, str(out), SETTINGS, "files") == (items, 0, [])  # this file system tells them apart
    asked = {os.path.basename(path) for path in calls}
    assert {"cat.png.safetensors", "caf\u00e9.png.safetensors"} <= asked and "dog.png.safetensors" not in asked


def test_the_entry_table_answers_as_the_dict_it_was_built_from():
    """The store keeps its index packed (`EntryTable`); the dict of entries json gave is the reference: every key,
    in sorted order, every entry with its fields and their types, absent keys and fields, a key given again."""
    import random

    generator = random.Random(0)
    names = ["a/b.jpg", "caf\u00e9.png", "caf\u0065\u0301.png", "\udcff.jpg", "\U0001f600/x.png", "z", "a", "a/b",
             "A", "\u00ff", "", "a b/c.jpg"]
    pool = ["s", "", "\u00e9", "\udcff", 1, 1.0, True, False, None, 0, -7, [2, 4], [2.0, 4], [], {"x": 1},
            {"x": [1, "1"]}, "1", "[2, 4]", "None"]
    reference = {}
    for index in range(600):
        key = generator.choice(names) + (str(index) if index % 3 else "")
        reference[key] = {field: generator.choice(pool) for field in ("shard", "tensor", "shape", "source", "extra")
                          if generator.random() < 0.8}
    reference["replaced"] = {"shard": "old", "only_old": 1}
    reference.update({"replaced": {"shard": "new"}})
    table = F.EntryTable(reference)
    assert len(table) == len(reference) and list(table.keys()) == sorted(reference)
    for key, entry in reference.items():
        row = table.row(key)
        assert table.key(row) == key
        got = table.entry(row)
        assert got == entry and {name: type(value) for name, value in got.items()} == {
            name: type(value) for name, value in entry.items()}
        for field in ("shard", "only_old", "nowhere"):
            assert table.value(row, field, "absent") == entry.get(field, "absent")
    assert dict(table.items()) == reference
    for absent in ("a/b.jp", "a/b.jpgx", "zz", "\udcfe.jpg", "A/"):
        if absent not in reference:
            assert table.row(absent) is None
    assert table.rows(["replaced", "nowhere", "z"]) == [table.row("replaced"), None, table.row("z")]
    shards = {f"k{index}": {"shard": name} for index, name in enumerate(["b", "a", "b", None, 1, True, 1.0, "1"])}
    shards["no shard"] = {}
    assert F.EntryTable(shards).distinct("shard") == {"a", "b", None, 1, True, "1"}
    empty = F.EntryTable({})
    assert len(empty) == 0 and empty.row("x") is None and list(empty.items()) == [] and empty.distinct("shard") == set()


def test_missing_a_few_keys_bisects_instead_of_listing_every_key(monkeypatch):
    """`store.missing([key])` built a dict of every key first: 0.5 s per call at 600K entries. Counted: keys decoded."""
    table = F.EntryTable({f"k{index:04d}": {"shard": "s", "tensor": f"t{index}"} for index in range(1000)})
    decoded, original = [], F.EntryTable.key
    monkeypatch.setattr(F.EntryTable, "key", lambda self, row: decoded.append(row) or original(self, row))
    assert table.rows(["k0007", "nope"]) == [7, None] and not decoded
    keys = [f"k{index:04d}" for index in range(0, 1000, 2)] + ["nope"]
    assert table.rows(keys) == list(range(0, 1000, 2)) + [None]


def test_a_store_whose_first_outputs_predate_image_resize_takes_one_resize_only(tmp_path):
    """Outputs made before `image_resize` was recorded are checked against neither resize: a store that starts with
    them (a shard fragment, the first file) took later outputs of both, e.g. an old store resumed on transformers 5
    and then 4.37, and reported no resize, so either line's cache took it. The first recorded resize is the store's."""
    import torch

    def write(writer, key):
        writer.add(F.Extracted(F.ImageItem(f"/data/{key}", key), torch.zeros(1, 1), "8x8"))
        if isinstance(writer, F.ShardWriter):
            writer.close()

    for kind, make in (("shards", lambda out, settings: F.ShardWriter(str(out), settings, shard_size_mb=1)),
                         ("files", lambda out, settings: F.FileWriter(str(out), settings))):
        out = tmp_path / kind
        for key, resize in (("a.png", None), ("b.png", "torchvision")):
            write(make(out, {**SETTINGS, **({"image_resize": resize} if resize else {})}), key)
        assert F.FeatureStore(out).settings["image_resize"] == "torchvision", kind
        if kind == "shards":
            F.merge_index(str(out))
            assert F.FeatureStore(out).settings["image_resize"] == "torchvision"
        write(make(out, {**SETTINGS, "image_resize": "pil"}), "c.png")
        with pytest.raises(ValueError, match="image_resize 'pil'|image_resize 'torchvision'"):
            F.FeatureStore(out)


def test_an_index_without_its_fragment_list_reads_them_again_and_one_of_other_names_is_damaged(tmp_path):
    """`_check_format` let an index without "fragments" pass (a fragment has none), then the read was a KeyError; a
    list of non-names was a TypeError from set(). Now: the fragments are read again, as without an index."""
    import json

    import torch

    writer = F.ShardWriter(str(tmp_path), SETTINGS, shard_size_mb=1)
    for key in ("a.png", "b.png"):
        writer.add(F.Extracted(F.ImageItem(f"/data/{key}", key), torch.zeros(1, 1), "8x8"))
    writer.close()
    F.merge_index(str(tmp_path))
    index_path = tmp_path / F.INDEX_NAME
    index = json.loads(index_path.read_text())
    listed = index.pop("fragments")
    index_path.write_text(json.dumps(index))
    assert list(F.FeatureStore(tmp_path)) == ["a.png", "b.png"]
    F.merge_index(str(tmp_path))
    assert json.loads(index_path.read_text())["fragments"] == listed
    index["fragments"] = [listed]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="index.json is damaged"):
        F.FeatureStore(tmp_path)


def test_a_store_read_from_pickles_for_spawned_workers(tmp_path):
    """A DataLoader with multiprocessing_context "spawn" / "forkserver" pickles the dataset and its store: once the
    store had read a tensor, its open shard map made that a TypeError (cannot pickle 'builtins.safe_open')."""
    import pickle

    import torch

    writer = F.ShardWriter(str(tmp_path), SETTINGS, shard_size_mb=1)
    writer.add(F.Extracted(F.ImageItem("/data/a.png", "a.png"), torch.arange(4.0).view(2, 2), "8x8"))
    writer.close()
    store = F.FeatureStore(tmp_path)
    before = store["a.png"]
    copy = pickle.loads(pickle.dumps(store))
    assert torch.equal(copy["a.png"], before) and list(copy) == ["a.png"] and store._handles


def _private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Private_Dirty:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_forked_worker_reading_every_entry_copies_no_memory_per_entry(tmp_path):
    """LLaVA's DataLoader workers are forked from a training rank that opened the store: an index of one dict per
    entry took ~800 bytes an entry in each rank, and each worker copied the pages its reads touched (a read writes
    the entry's reference count) and its cyclic GC walked (~185 MB for one pass at 600K entries). Measured: the pages a
    forked child makes its own while it looks up every one of 40K entries (its objects from before the fork frozen
    out of its GC, so only the reads count): ~0.3 MB, against 16-19 MB with one dict per entry."""
    import gc

    import torch

    count = 40_000
    writer = F.ShardWriter(str(tmp_path), SETTINGS, shard_size_mb=1e6)
    for index in range(count):
        writer.add(F.Extracted(F.ImageItem(f"/data/{index:07d}.jpg", f"images/{index:07d}.jpg"),
                               torch.zeros(1, 1, dtype=torch.float16), "8x8"))
    writer.close()
    F.merge_index(str(tmp_path))
    store = F.FeatureStore(tmp_path)
    assert len(store) == count and store.entry("images/0000007.jpg")["source"] == "/data/0000007.jpg"
    gc.collect()
    gc.freeze()  # what the child's GC would copy of everything else (pytest's, torch's objects) is not measured
    reader, writer_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: look up every entry, report the MB it made its own
        try:
            before = _private_dirty_mb()
            found = sum(store.entry(f"images/{index:07d}.jpg")["tensor"].startswith("t") for index in range(count))
            gc.collect()
            os.write(writer_end, f"{found} {_private_dirty_mb() - before}".encode())
        finally:
            os._exit(0)
    os.close(writer_end)
    try:
        found, copied = os.read(reader, 100).decode().split()
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
        gc.unfreeze()
    assert int(found) == count
    assert float(copied) < 2.0, f"a forked reader copied {float(copied):.1f} MB for {count} entries"


def _results(tmp_path, count: int, shape=(2, 4)) -> list:
    import torch

    return [F.Extracted(F.ImageItem(str(tmp_path / f"{index}.png"), f"{index}.png"),
                        torch.full(shape, float(index)), "8x8") for index in range(count)]


def test_a_shard_is_on_disk_before_the_fragment_that_names_it(tmp_path, monkeypatch):
    """A machine crash (not a killed process) could keep a fragment and lose the data of the shard it names: the
    store then held entries no read could serve. Each shard is synced, then its folder (the rename), before the
    fragment is written; the fragment and index.json likewise. Recorded: fsyncs (by path) and renames, in order."""
    events: list = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor):
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        stem = F._temp_stem(os.path.basename(path))
        events.append(("sync", stem[0] if stem else os.path.basename(path)))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", os.path.basename(dst))),
                                                         replace(src, dst))[1])
    out = tmp_path / "out"
    writer = F.ShardWriter(str(out), SETTINGS, shard_size_mb=1000)
    for result in _results(tmp_path, 3):
        writer.add(result)
    writer.close()
    F.merge_index(str(out))
    shard = next(name for name in os.listdir(out / "shards") if name.endswith(".safetensors"))
    fragment = shard[: -len(".safetensors")] + ".json"
    assert events == [("sync", shard), ("rename", shard), ("sync", "shards"),
                      ("sync", fragment), ("rename", fragment), ("sync", "shards"),
                      ("sync", "index.json"), ("rename", "index.json"), ("sync", "out")], events


def test_a_shard_holds_at_most_max_shard_tensors_and_their_header_stays_within_safetensors_limit(tmp_path,
                                                                                                monkeypatch):
    """Shards were cut by bytes only: a tiny tower's ~100-byte features filled a default-size shard with millions of
    tensors, whose header safetensors refuses to read past 100 MB. Checked: the cap cuts shards (made small here),
    and a header of MAX_SHARD_TENSORS entries, measured with safetensors' own writer at a real tower's shape and the
    longest names a shard uses, stays well within the limit."""
    import torch
    from safetensors.torch import save

    from llava_evaclip._safetensors import MAX_HEADER_BYTES

    monkeypatch.setattr(F, "MAX_SHARD_TENSORS", 3)
    out = tmp_path / "out"
    writer = F.ShardWriter(str(out), SETTINGS, shard_size_mb=1000)
    results = _results(tmp_path, 7)
    for result in results:
        writer.add(result)
    writer.close()
    F.merge_index(str(out))
    assert writer.count == 3 and len([n for n in os.listdir(out / "shards") if n.endswith(".safetensors")]) == 3
    store = F.FeatureStore(out)
    assert all(torch.equal(store[result.item.key], result.features) for result in results)
    monkeypatch.undo()
    sample = 20
    tensors = {f"t{F.MAX_SHARD_TENSORS - 1 - index}": torch.zeros(577, 1024, dtype=torch.float16)
               for index in range(sample)}
    per_tensor = int.from_bytes(save(tensors)[:8], "little") / sample
    assert F.MAX_SHARD_TENSORS * per_tensor * 2 < MAX_HEADER_BYTES, per_tensor


def test_a_files_run_lists_each_output_folder_once(tower_dir, tmp_path, monkeypatch):
    """The start-up checks and the plan each listed every output folder (two scandirs per folder, on every rank): the
    plan now takes the checks' listing. Counted: scandirs of OUT's folders in a resumed files run."""
    images = tmp_path / "images"
    for folder in range(2):
        for index in range(3):
            write_image(images / f"d{folder}" / f"{index}.png", seed=index)
    out = tmp_path / "out"
    tower = F.load_tower(tower_dir)
    assert F.extract_features(tower, [str(images)], str(out), format="files").written == 6
    listed: list = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (listed.append(os.fspath(path)), scandir(path))[1])
    report = F.extract_features(tower, [str(images)], str(out), format="files")
    assert (report.written, report.kept) == (0, 6)
    in_out = sorted(path for path in listed if os.path.commonpath([path, str(out)]) == str(out))
    assert in_out == [str(out / "d0"), str(out / "d1")], listed

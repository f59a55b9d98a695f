"""`llava-evaclip features` across ranks that do not see one world: node-local output folders, the same dataset at
other paths per node, per-node options, a check that fails on one node only, a stale WORLD_SIZE, resume with other
world sizes. Ranks are threads sharing an in-process `gather` (each one as it would run on its own node: its own
tower, inputs and OUT), so a disagreement is tested without a launcher; one run starts two real torchrun "nodes"."""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from llava_evaclip import features as F
from llava_evaclip.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_features import one_line_error, save_tower, write_image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "_dist"))
from runner import (  # noqa: E402
    DIST_DIR, PORT_TAKEN, free_port, load_scale, read_rank_results, run_torchrun, worker_env,
)

COLLECTIVE_TIMEOUT_S = 60  # a rank left waiting for one that never comes fails the test instead of hanging it


class ThreadGroup:
    """`world_size` ranks as threads: `gather` and `barrier` meet at a threading.Barrier (broken after a timeout, so a
    rank that never arrives fails the others)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.meeting = threading.Barrier(world_size, timeout=COLLECTIVE_TIMEOUT_S * load_scale())
        self.slots: list = [None] * world_size

    def context(self, rank: int) -> F.DistributedContext:
        group = self

        class ThreadContext(F.DistributedContext):
            def barrier(self) -> None:
                group.meeting.wait()

            def gather(self, value):
                group.slots[self.rank] = value
                group.meeting.wait()
                values = list(group.slots)
                group.meeting.wait()
                return values

        return ThreadContext(rank=rank, world_size=self.world_size, local_rank=rank)

    def run(self, per_rank) -> list:
        """per_rank(rank, context) on every rank at once; each rank's return value or raised exception."""
        results: list = [None] * self.world_size

        def target(rank: int) -> None:
            try:
                results[rank] = per_rank(rank, self.context(rank))
            except BaseException as error:  # noqa: BLE001 - the test inspects it
                results[rank] = error

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world_size)]
        with one_fork_at_a_time():
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return results


@contextlib.contextmanager
def one_fork_at_a_time():
    """Thread ranks start their decoding workers one at a time. On Python >= 3.12, filelock >= 4.3 (imported by
    transformers) refuses a fork while another thread of the process is forking ("os.fork is unsafe while filelock
    is changing descriptor ownership"); real ranks are processes, each forking alone."""
    start, lock = multiprocessing.process.BaseProcess.start, threading.Lock()

    def serialised_start(process) -> None:
        with lock:
            start(process)

    multiprocessing.process.BaseProcess.start = serialised_start
    try:
        yield
    finally:
        multiprocessing.process.BaseProcess.start = start


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> str:
    return save_tower(tmp_path_factory.mktemp("tower"), seed=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnt") / "images"
    for index in range(13):
        write_image(root / f"d{index % 2}" / f"{index:03d}.png", size=[(28, 28), (40, 30), (17, 60)][index % 3],
                    seed=index)
    return root


@pytest.fixture(scope="module")
def single(tower_dir, images, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every image's features from one process (the reference every multi-rank result must equal bit for bit)."""
    out = tmp_path_factory.mktemp("single") / "out"
    tower = F.load_tower(tower_dir)
    report = F.extract_features(tower, [str(images)], str(out), format="shards", batch_size=8)
    assert report.written == 13 and not report.failures
    store = F.FeatureStore(out)
    return {key: store[key].clone() for key in store}


def ranks(world_size: int, inputs, outs, tower_dir, dtypes=None, batch_sizes=None, fmt="shards", workers=0):
    """Run extract_features on `world_size` thread ranks, rank r with inputs[r], outs[r], dtypes[r], batch_sizes[r]."""
    def per_rank(rank, context):
        tower = F.load_tower(tower_dir, dtype=(dtypes or [torch.float32] * world_size)[rank])
        return F.extract_features(tower, [str(inputs[rank])], str(outs[rank]), format=fmt,
                                  batch_size=(batch_sizes or [8] * world_size)[rank], workers=workers,
                                  shard_size_mb=0.005, context=context)

    return ThreadGroup(world_size).run(per_rank)


def refused(results, *fragments) -> None:
    """Every rank raised one ValueError, the same line on each (but for its own --out), holding `fragments`."""
    assert all(isinstance(result, ValueError) for result in results), results
    assert len({str(result).split(" is not one folder")[-1] for result in results}) == 1, results
    for message in map(str, results):
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def written(out: Path) -> list[str]:
    """What a refused run left in OUT: nothing but folders."""
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()) if out.exists() else []


def assert_same_as_single(out: Path, single: dict[str, torch.Tensor]) -> None:
    store = F.FeatureStore(out)
    assert store.verify() == [] and list(store) == sorted(single)
    for key, expected in single.items():
        assert torch.equal(store[key], expected), key


@pytest.mark.parametrize("fmt", ["shards", "files"])
def test_node_local_output_folders_are_refused_before_any_write(tower_dir, images, tmp_path, fmt):
    # Each "node" has its own disk: rank 0's index (or its count of files) would miss rank 1's half, reported complete.
    outs = [tmp_path / "node0" / "out", tmp_path / "node1" / "out"]
    results = ranks(2, [images, images], outs, tower_dir, fmt=fmt)
    refused(results, "is not one folder shared by every rank: rank 1 (", "does not see the file rank 0")
    assert written(outs[0]) == [] and written(outs[1]) == []


def test_the_same_dataset_at_other_paths_per_node_is_refused(tower_dir, images, tmp_path):
    # Another mount point (or a relative input from another working directory) on node 1: the store would record
    # node 1's paths for half the images, and a resume on node 0 refuses them as other images.
    other = tmp_path / "other-mount" / "images"
    shutil.copytree(images, other)
    out = tmp_path / "out"
    results = ranks(2, [images, other], [out, out], tower_dir)
    refused(results, "rank 1", "finds the images under other paths than rank 0",
            str(other / "d0" / "000.png"), str(images / "d0" / "000.png"))
    assert written(out) == []


def test_another_set_of_images_on_one_node_is_refused(tower_dir, images, tmp_path):
    # One image missing on node 1: the round-robin shares would differ, images computed twice or never.
    other = tmp_path / "other" / "images"
    shutil.copytree(images, other)
    (other / "d1" / "005.png").unlink()
    out = tmp_path / "out"
    results = ranks(2, [other, other], [out, out], tower_dir)  # same paths: the shared copy itself
    assert all(not isinstance(result, BaseException) for result in results), results
    shutil.rmtree(out)
    results = ranks(2, [images, other], [out, out], tower_dir)
    refused(results, "rank 1", "finds other images than rank 0 (12 vs 13")
    assert written(out) == []


@pytest.mark.parametrize("option", ["dtype", "batch_size", "format"])
def test_per_node_options_are_refused_not_mixed_into_one_store(tower_dir, images, tmp_path, option):
    out = tmp_path / "out"
    if option == "dtype":  # before: a store of float32 and bfloat16 fragments, unreadable once merged
        results = ranks(2, [images, images], [out, out], tower_dir, dtypes=[torch.float32, torch.bfloat16])
        refused(results, "rank 1", "dtype 'bfloat16' (rank 0 'float32')")
    elif option == "batch_size":
        results = ranks(2, [images, images], [out, out], tower_dir, batch_sizes=[8, 3])
        refused(results, "rank 1", "--batch-size 3, rank 0 with 8")
    else:
        group = ThreadGroup(2)
        tower = F.load_tower(tower_dir)
        results = group.run(lambda rank, context: F.extract_features(
            tower, [str(images)], str(out), format=("shards", "files")[rank], context=context))
        refused(results, "rank 1", "--format 'files', rank 0 with 'shards'")
    assert written(out) == []


def test_a_check_failing_on_one_rank_stops_every_rank(tower_dir, images, tmp_path):
    # Node 1's input is missing: it refused and left; rank 0 waited for it in the next collective (2 hours).
    out = tmp_path / "out"
    results = ranks(2, [images, tmp_path / "not-mounted"], [out, out], tower_dir)
    assert isinstance(results[1], ValueError) and str(results[1]).endswith("no such file or directory.")
    assert isinstance(results[0], ValueError), results[0]
    assert str(results[0]).startswith("on rank 1 (") and "not-mounted: no such file" in str(results[0])
    assert written(out) == []


def test_resume_with_other_world_sizes_and_workers_is_bitwise_a_single_run(tower_dir, images, single, tmp_path):
    out = tmp_path / "out"
    first = ranks(3, [images] * 3, [out] * 3, tower_dir)  # 13 images on 3 ranks: uneven shares
    assert first[0].written == 13 and first[0].world_size == 3
    assert_same_as_single(out, single)
    # Half the shards' fragments are lost (a killed run's), then two ranks with a decoding worker each resume.
    (out / "index.json").unlink()
    for name in sorted((out / "shards").glob("*.json"))[1::2]:
        name.unlink()
    kept = len(F.FeatureStore(out))
    assert 0 < kept < 13
    resumed = ranks(2, [images] * 2, [out] * 2, tower_dir, workers=1)
    assert (resumed[0].kept, resumed[0].written) == (kept, 13 - kept)
    assert_same_as_single(out, single)
    # More ranks than images left to compute: the idle ranks write nothing, the run completes.
    (out / "index.json").unlink()
    name = sorted((out / "shards").glob("*.json"))[0]
    lost = len(__import__("json").loads(name.read_text())["entries"])
    name.unlink()
    resumed = ranks(4, [images] * 4, [out] * 4, tower_dir)
    assert resumed[0].written == lost < 4 and resumed[0].kept == 13 - lost
    assert_same_as_single(out, single)


def test_a_stale_world_size_without_a_launcher_is_one_line(tower_dir, images, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # exported by an old job script: not a launcher's
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not")
    assert written(out) == []


def test_ranks_that_never_come_are_one_line_at_the_timeout(tower_dir, images, tmp_path, capsys, monkeypatch):
    # WORLD_SIZE, RANK and a stale MASTER_ADDR / MASTER_PORT left from another job: rank 1 never comes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("LLAVA_EVACLIP_DIST_TIMEOUT_S", "1")
    out = tmp_path / "out"
    assert main(["features", str(images), "--model", tower_dir, "--out", str(out), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, "rank 0 of 2 cannot join the others through 127.0.0.1:")
    assert not torch.distributed.is_initialized() and written(out) == []


def test_a_node_whose_input_is_missing_stops_both_torchrun_nodes(tower_dir, images, tmp_path):
    # Two torchrun "nodes" with a static rendezvous: node 1 cannot see the input. Before, node 1 printed its line and
    # left while node 0 waited in init_process_group for the distributed timeout (2 hours).
    for attempt in range(3):  # torchrun's store lost the race for the free port: start again
        processes, outputs = two_nodes(tower_dir, [images, tmp_path / "not-mounted"], tmp_path / "out")
        if not any(text in output for output in outputs for text in PORT_TAKEN):
            break
    assert all(process.returncode not in (0, None) for process in processes), outputs
    assert "llava-evaclip features: error: on rank 1 (" in outputs[0] and "not-mounted: no such file" in outputs[0]
    assert written(tmp_path / "out") == []


def test_gloo_gather_keeps_what_it_hands_the_group_until_the_group_is_destroyed(tmp_path):
    """torch < 2.8's gloo group joins its worker threads in `destroy_process_group` holding the GIL while a worker
    may still be freeing a collective's last tensors, which needs the GIL when their Python objects are gone: after
    `all_gather_object` one CPU run in four hung at the end (the test above, on torch 2.1.2 and 2.5.1). The CPU
    ranks' gather must hold every tensor it hands the group until `stop()` has destroyed the group, and gather the
    same values (payloads of other lengths, non-ASCII text) on every rank."""
    result = run_torchrun(DIST_DIR / "context_gather.py", "--out", str(tmp_path), nproc=2, timeout=120)
    assert result.returncode == 0, result.describe()
    ranks = read_rank_results(tmp_path, 2)
    expected = [{"rank": rank, "text": "é" * (3 + 500 * rank), "items": list(range(7 * rank))} for rank in range(2)]
    for rank, got in enumerate(ranks):
        assert got["rank"] == rank and got["gathered"] == expected
        assert got["first_error"] == ("missing on rank 0" if rank == 0 else f"on rank 0 ({socket.gethostname()}): "
                                                                              "missing on rank 0")
        assert not got["used_all_gather_object"]
        assert got["handed"] >= 4 and got["alive_before_stop"] == got["handed"]  # two gathers, sizes and payloads
        assert got["alive_after_stop"] == 0 and got["group_left"]


def two_nodes(tower_dir, inputs, out):
    """`torchrun --nnodes 2 --node_rank N` for N = 0, 1 (static rendezvous on this machine), node N with inputs[N];
    both killed at the time limit."""
    port = str(free_port())
    limit = 60 * load_scale()
    env = worker_env({"LLAVA_EVACLIP_DIST_TIMEOUT_S": str(int(limit * 4))})
    processes = []
    for node, source in enumerate(inputs):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, "--max-restarts",
                   "0", "--monitor-interval", "0.5", "-m", "llava_evaclip", "features", str(source), "--model",
                   tower_dir, "--out", str(out), "--device", "cpu"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=limit)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
    return processes, outputs

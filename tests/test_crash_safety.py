"""SIGKILL at random points while checkpoints and exports are written: what is on disk is always
a complete earlier or later version, never half of one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsekit.export import load_compact, read_export
from sparsekit.run_folder.checkpoint import load_checkpoint

TARGET = Path(__file__).with_name("crash_target.py")
KILLS = 10  # per mode: 20 kill points in all


def kill_while_writing(folder: Path, mode: str, first: int, rng: random.Random) -> int | None:
    """Start the writer at version `first`, let it write for a random moment, SIGKILL it;
    return the last version it reported finished (None if none)."""
    process = subprocess.Popen(
        [sys.executable, str(TARGET), str(folder), mode, str(first)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.stdout.readline().strip() == "ready"
    done = []
    for _ in range(rng.randint(1, 3)):  # wait for the 1st to 3rd write to begin...
        line = process.stdout.readline().strip()
        while line != "writing":
            done.append(int(line))
            line = process.stdout.readline().strip()
    time.sleep(rng.uniform(0.0, 0.4))  # ...and kill somewhere in it (or just after)
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate()
    done += [int(line) for line in out.split() if line != "writing"]
    return done[-1] if done else None


@pytest.mark.parametrize("mode", ["checkpoint", "export"])
def test_killed_writers_leave_whole_files(tmp_path: Path, mode: str) -> None:
    rng = random.Random(mode)
    latest = None  # the newest version any writer finished so far
    torn_seen: set[str] = set()
    outcomes = []  # (last version finished, version on disk) per kill, for the failure message
    kill = 0
    # At least KILLS kills; more (up to 3x) while none has landed mid-write, since the moment of a
    # kill is random and a test that never hit a write would prove nothing.
    while kill < KILLS or (not torn_seen and kill < 3 * KILLS):
        kill += 1
        first = 1000 * kill  # versions grow across writers
        finished = kill_while_writing(tmp_path, mode, first, rng)
        if mode == "checkpoint":
            path = tmp_path / "checkpoint.pt"
        else:
            path = tmp_path / "export" / "model.safetensors"
        if not path.exists():
            assert latest is None and finished is None
            outcomes.append((finished, None))
            continue
        if mode == "checkpoint":
            ckpt = load_checkpoint(path)  # never a torn file
            version = ckpt["epoch"]
            tensors = ckpt["model"]
        else:
            _, tensors = read_export(path)  # the tensor hash proves the file whole
            version = int(next(iter(tensors.values())).flatten()[0])
            load_compact(path)
        assert all(torch.all(t == version) for t in tensors.values())
        # On disk: the last version finished, or the one being written when the kill came
        # (its rename had happened).
        allowed = {first} if finished is None else {finished, finished + 1}
        if finished is None and latest is not None:
            allowed.add(latest)
        assert version in allowed, (version, allowed)
        latest = version
        outcomes.append((finished, version))
        torn = [p.name for p in tmp_path.glob("**/.*.tmp")]
        torn_seen.update(torn)
    # Some kills landed in the middle of a write (their temporary files prove it), and the
    # next write cleaned them up.
    assert torn_seen, f"no kill hit a write in {kill} tries; the test proved nothing: {outcomes}"


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import errno

    import sparsekit.run_folder.checkpoint as checkpoint
    from sparsekit.errors import SparsekitError

    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # part of it reaches the disk, then:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(SparsekitError, match="No space left on device.*previous checkpoint"):
        checkpoint.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_a_tampered_or_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    from sparsekit.errors import SparsekitError
    from sparsekit.run_folder.checkpoint import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(4)}})
    payload = torch.load(path, weights_only=True)
    payload["model"]["w"][0] = 5.0  # edited after the fact, hash left as it was
    torch.save(payload, path)
    with pytest.raises(SparsekitError, match="modified or damaged"):
        load_checkpoint(path)
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(4)}})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SparsekitError, match="cannot be read"):
        load_checkpoint(path)

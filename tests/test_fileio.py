"""Atomic directories: a writer killed mid-write (out of memory, SIGKILL) leaves its temp directory behind; the
next writer of the same name removes it, and never one whose writer still runs or that belongs to another name."""

from __future__ import annotations

import os
import subprocess
import sys

from edge_peft.fileio import atomic_directory


def test_next_writer_removes_what_a_killed_writer_left(tmp_path):
    final = tmp_path / "llama-0"
    script = ("import os, sys; from edge_peft.fileio import atomic_directory\n"
              "with atomic_directory(sys.argv[1]) as tmp:\n"
              "    (tmp / 'half.onnx').write_bytes(b'x' * 1000); os.kill(os.getpid(), 9)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(final)])
    assert killed.returncode == -9
    abandoned = [p for p in tmp_path.iterdir() if p.name.startswith(".llama-0.")]
    assert len(abandoned) == 1 and (abandoned[0] / "half.onnx").is_file()
    running = tmp_path / f".llama-0.{os.getpid()}.abc123.tmp"  # a live writer's (this process)
    other = tmp_path / ".llama-0.5b.999999999.abc123.tmp"  # another name's, its pid gone
    running.mkdir()
    other.mkdir()
    with atomic_directory(final) as tmp:
        (tmp / "model.onnx").write_bytes(b"done")
    assert not abandoned[0].exists()
    assert running.is_dir() and other.is_dir()
    assert (final / "model.onnx").read_bytes() == b"done"

"""Progress output: a live bar on a terminal, one line per epoch in a pipe."""

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios

from pyro_lvm.experiments.progress import EpochLines, LiveBar, open_progress

FAST = ["--hidden-dim", "16", "--latent-dim", "2", "--eval-samples", "10"]


def test_a_piped_run_logs_one_line_per_epoch_without_carriage_returns(tmp_path):
    out = tmp_path / "vae"
    argv = ["train", "vae", "--out", str(out), "--epochs", "3", *FAST]
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_lvm", *argv], capture_output=True, text=True, check=True
    )
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "epoch" in line]
    # one line per epoch at most (at most one a second), the last epoch always
    assert 1 <= len(lines) <= 3
    assert lines[0].startswith("vae on digits: epoch 1/3, step 15/45, train_loss ")
    assert lines[-1].startswith("vae on digits: epoch 3/3, step 45/45, train_loss ")


def _through_a_terminal(code: str) -> bytes:
    main, follower = pty.openpty()
    # a terminal of 24 x 100 characters (a fresh pty has size 0 x 0: tqdm draws nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed (Linux: EIO)
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=60)
    os.close(main)
    return b"".join(chunks)


def test_a_terminal_keeps_the_live_bar():
    code = (
        "from pyro_lvm.experiments.progress import open_progress\n"
        "bar = open_progress(20, 0, 'demo', 2)\n"
        "assert type(bar).__name__ == 'LiveBar'\n"
        "for _ in range(20):\n"
        "    bar.step(1.0, {})\n"
        "bar.close()\n"
    )
    output = _through_a_terminal(code)
    assert b"\r" in output and b"demo" in output and b"20/20" in output


def test_epoch_lines_are_rate_limited_and_end_with_the_last_epoch():
    now = [0.0]
    stream = io.StringIO()
    lines = EpochLines(100, 0, "m", stream, epochs=10, min_interval=1.0, clock=lambda: now[0])
    for epoch in range(1, 11):
        for _ in range(10):
            lines.step(0.5, {})
        now[0] += 0.3
        lines.epoch({"epoch": epoch, "train_loss": 2.0 / epoch})
    printed = [
        int(line.split("epoch ")[1].split("/")[0]) for line in stream.getvalue().splitlines()
    ]
    assert printed == [1, 5, 9, 10]  # >= 1 s apart (0.3 s epochs), and the last one
    assert (
        stream.getvalue().splitlines()[-1] == "m: epoch 10/10, step 100/100, train_loss 0.2, 3.0s"
    )


def test_open_progress_picks_by_terminal():
    assert isinstance(open_progress(1, 0, "x", 1, stream=io.StringIO()), EpochLines)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = open_progress(1, 0, "x", 1, stream=Terminal())
    assert isinstance(bar, LiveBar)
    bar.close()

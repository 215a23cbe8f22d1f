"""The console relay (train/console.py) on the session's Ray: workers' fmdist lines and rank 0's steps
reach the driver's console through the queue; nothing else does."""

from __future__ import annotations

import io
import logging

import pytest
import ray

from fmdist.train import console

pytestmark = pytest.mark.usefixtures("ray_cluster")


@ray.remote(num_cpus=0)
def worker(queue, rank: int, steps: int) -> None:
    """What a Ray Train worker does: attach the relay, log as the loop does, report its steps."""
    from fmdist.runtime import get_logger

    step_done = console.attach(queue, rank)
    log = get_logger("fmdist.train", rank)
    log.info("rank %d starts", rank)  # only rank 0 speaks at INFO
    logging.getLogger("transformers").warning("third-party noise")  # not an fmdist logger: not relayed
    for step in range(1, steps + 1):
        if step_done is not None:
            step_done(step, steps, 1.0 / step)
    if rank == 1:
        log.warning("rank 1 has no rows this epoch")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fmdist_lines_and_a_progress_bar_reach_the_console_and_nothing_else():
    out = FakeTerminal()
    relay = console.open_relay(out)
    assert relay.bar is not None  # a terminal gets a bar
    ray.get([worker.remote(relay.queue, 0, 6), worker.remote(relay.queue, 1, 6)])
    console.close_relay(relay)
    assert sorted(line.split(": ", 1)[1] for line in relay.lines) == ["rank 0 starts", "rank 1 has no rows this epoch"]
    assert [line for line in relay.lines if "no rows" in line][0].startswith("[rank 1] ")
    text = out.getvalue()
    assert "third-party noise" not in text
    # The bar ended at the last step rank 0 sent (the final step is always sent), with its loss.
    assert relay.bar.n == 6 and relay.bar.total == 6
    assert "6/6" in text and "loss 0.1667" in text


def test_without_a_terminal_there_is_no_bar_and_lines_are_plain():
    out = io.StringIO()
    relay = console.open_relay(out)
    assert relay.bar is None
    ray.get(worker.remote(relay.queue, 0, 3))
    console.close_relay(relay)
    assert out.getvalue().splitlines()[0].endswith("INFO fmdist.train: rank 0 starts")
    assert "3/3" not in out.getvalue()

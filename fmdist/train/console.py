"""What the person who launched a run sees: fmdist's own log lines and a progress bar, not the noise.

A run's workers print a lot that is not about the run: Hugging Face load reports, DeepSpeed op builds,
FutureWarnings, Ray Train's controller chatter. Ray forwards every line of every worker to the driver
(`log_to_driver`), so by default fmdist turns that forwarding off and relays only its own loggers:
each worker's "fmdist" log handler puts formatted lines on a Ray queue that the driver prints (rank 0
at INFO, other ranks when they warn), and rank 0 sends its step count, which the driver draws as a
progress bar when its stdout is a terminal. `--verbose` (`quiet=False`) keeps Ray's forwarding and
shows everything. The workers' full output stays in Ray's log files either way.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from fmdist.runtime import LOG_DATE_FORMAT, LOG_FORMAT

PROGRESS_EVERY_S = 0.5
"""Rank 0 sends its step at most this often: one actor call per half second, whatever the step time."""


@dataclass
class Relay:
    """The driver's end: the queue the workers write to, and the thread that prints what arrives."""

    queue: Any
    """ray.util.queue.Queue (an actor with no CPU of its own)."""
    out: TextIO
    bar: Any | None = None
    """A tqdm bar when `out` is a terminal."""
    lines: list[str] = field(default_factory=list)
    """Every relayed line, in order (the tests read them)."""
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def open_relay(out: TextIO | None = None, progress_bar: bool | None = None) -> Relay:
    """Start relaying to `out` (stdout); a progress bar when `out` is a terminal, unless told."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = out or sys.stdout
    # On the driver's node, which outlives the workers' (a lost node must not take the console with it),
    # and with no CPU of its own (the workers hold every CPU of a small local Ray).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    relay = Relay(Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}), out)
    relay.bar = _bar(out) if (out.isatty() if progress_bar is None else progress_bar) else None
    relay.thread = threading.Thread(target=_drain, args=(relay,), name="fmdist-console", daemon=True)
    relay.thread.start()
    return relay


def close_relay(relay: Relay | None) -> None:
    """Print whatever is still queued, close the bar, end the queue's actor."""
    if relay is None:
        return
    relay.stop.set()
    if relay.thread is not None:
        relay.thread.join(timeout=10)
    try:
        _print_items(relay, relay.queue.get_nowait_batch(relay.queue.qsize()))
        relay.queue.shutdown()
    except Exception as exc:  # noqa: BLE001 - the queue's actor is gone; the run's outcome is not the console's
        print(
            f"(console relay ended early: {exc.__class__.__name__}; the workers' lines are in Ray's logs)",
            file=relay.out,
        )
    if relay.bar is not None:
        relay.bar.close()


def attach(queue: Any, rank: int) -> Any:
    """In a worker: send fmdist's log lines to the driver's queue. Returns rank 0's `step_done` callback
    for the loop (None on other ranks)."""
    handler = _QueueHandler(queue, rank)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    parent = logging.getLogger("fmdist")
    for old in list(parent.handlers):
        parent.removeHandler(old)
    parent.addHandler(handler)
    parent.propagate = False
    if rank != 0:
        return None
    last_sent = [0.0]

    def step_done(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last_sent[0] >= PROGRESS_EVERY_S or step == total:
            last_sent[0] = now
            _put(queue, {"step": step, "total": total, "loss": loss})

    return step_done


class _QueueHandler(logging.Handler):
    """A logging handler that puts each formatted line on the driver's queue (other ranks: prefixed)."""

    def __init__(self, queue: Any, rank: int) -> None:
        super().__init__()
        self.queue, self.rank = queue, rank

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        _put(self.queue, {"line": line if self.rank == 0 else f"[rank {self.rank}] {line}"})


def _put(queue: Any, item: dict[str, Any]) -> None:
    """One actor call. The console must never stop training: if the driver's queue is gone (the driver
    exited), the line goes to this worker's own stderr, i.e. Ray's log file of the worker."""
    try:
        queue.put_nowait(item)
    except Exception:  # noqa: BLE001 - ray.exceptions.RayActorError and friends; the line is kept below
        if "line" in item:
            print(item["line"], file=sys.stderr)


def _bar(out: TextIO) -> Any:
    from tqdm import tqdm

    return tqdm(total=0, file=out, unit="step", dynamic_ncols=True, leave=True, desc="train")


def _drain(relay: Relay) -> None:
    from ray.util.queue import Empty

    while not relay.stop.is_set():
        try:
            item = relay.queue.get(block=True, timeout=0.5)
        except Empty:
            continue
        except Exception:  # noqa: BLE001 - the queue's actor ended: nothing more will arrive
            return
        _print_items(relay, [item])


def _print_items(relay: Relay, items: list[dict[str, Any]]) -> None:
    for item in items:
        if "line" in item:
            relay.lines.append(item["line"])
            if relay.bar is not None:
                relay.bar.write(item["line"], file=relay.out)
            else:
                print(item["line"], file=relay.out, flush=True)
        elif relay.bar is not None:
            relay.bar.total = item["total"]
            relay.bar.n = item["step"]
            relay.bar.set_postfix_str(f"loss {item['loss']:.4f}", refresh=False)
            relay.bar.refresh()

"""A pipeline stage run as its own process by tests/test_pipeline.py: q_in -> handler -> q_out."""

from __future__ import annotations

import sys
import time

import pqueue


def double(msg: pqueue.Message) -> object:
    time.sleep(0.001)  # a little work, so kills land mid-batch
    return {"n": msg.data["n"], "v": msg.data["v"] * 2}


def split(msg: pqueue.Message) -> object:
    time.sleep(0.001)
    return pqueue.Many([{"n": msg.data["n"], "part": i, "v": msg.data["v"] + i} for i in range(2)])


def main() -> None:
    q_in, q_out, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    handler = double if kind == "double" else split
    with pqueue.Queue(q_in) as src, pqueue.Queue(q_out) as dst:
        with pqueue.ConsumerPool(src, handler, workers=2, output=dst, lease=2.0):
            print("ready", flush=True)
            while True:
                time.sleep(0.05)


if __name__ == "__main__":
    main()

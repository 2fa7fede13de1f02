#!/usr/bin/env python3
"""How far off the crossover estimate is: simulated evenings through iotserver's own crossover().

    python3 tests/crossover.py [--runs 200]

A hot day's evening (outside along a day's cosine curve, 22 ± 6 °C with its top at 15:00;
inside cooling 0.3 °C an hour), both stations posting once a minute with uniform noise,
the crossing 10 to 120 minutes ahead. Prints how often an estimate was said and its
worst error; then how often a flat or a noisy pair got one. Prints figures, asserts nothing.
"""

import argparse
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iotserver  # noqa: E402

MINUTE = 60_000
NOW = 1_800_000_000_000


def outside(h):
    return 22 + 6 * math.cos(2 * math.pi * (h - 15) / 24)


def inside(h):
    return 24.5 - 0.3 * (h - 15)


def crossing_hour():
    lo, hi = 17.0, 23.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if outside(mid) > inside(mid) else (lo, mid)
    return lo


def evening(ahead, noise, rng, cross_h):
    """Two hours of readings ending now (the outside station 20 s after the inside one)."""
    ins, outs = [], []
    for m in range(119, -1, -1):
        ms = NOW - m * MINUTE
        h = cross_h + (ms - NOW) / 3_600_000 - ahead / 60
        ins.append((ms, inside(h) + rng.uniform(-noise, noise)))
        if m:
            outs.append((ms + 20_000, outside(h + 20 / 3600) + rng.uniform(-noise, noise)))
    return ins, outs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="evenings per case")
    args = parser.parse_args()
    cross_h = crossing_hour()
    for noise in (0.1, 0.3):
        for ahead in (10, 20, 30, 40, 60, 120):
            errors = []
            for seed in range(args.runs):
                found = iotserver.crossover(*evening(ahead, noise, random.Random(seed), cross_h), NOW)
                if found:
                    errors.append(abs(found[0] - NOW - ahead * MINUTE) / MINUTE)
            print("noise ±%.1f °C, crossing %3d min ahead: said %3d of %d, worst %s" % (
                noise, ahead, len(errors), args.runs, "%.1f min off" % max(errors) if errors else "-"))
    for name, spread in (("flat pair, ±0.05 °C", 0.05), ("noisy pair, ±2 °C", 2.0)):
        said = 0
        for seed in range(args.runs):
            rng = random.Random(seed)
            ins = [(NOW - m * MINUTE, 25 + rng.uniform(-spread, spread)) for m in range(119, -1, -1)]
            outs = [(NOW - m * MINUTE, 26 + rng.uniform(-spread, spread)) for m in range(119, -1, -1)]
            said += bool(iotserver.crossover(ins, outs, NOW))
        print("%s: said %d of %d" % (name, said, args.runs))


if __name__ == "__main__":
    main()

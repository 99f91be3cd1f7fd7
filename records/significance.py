"""Is an improvement a record? The challenge asks that a new record beat the previous one by at least
0.005 nats (val_loss) with p < 0.01, over several seeds.

    python3 records/significance.py --new 1.8920 1.8931 1.8925 --previous 1.9001 1.8990 1.9012
    python3 records/significance.py --new-logs logs/s1.txt logs/s2.txt logs/s3.txt --previous 1.9001

One-sided tests of H0: improvement <= 0.005 nats, against H1: improvement > 0.005 nats.
- Previous record given per seed (2+ values): Welch's t-test (unequal variances), previous vs new + 0.005.
- Previous record given as one value: one-sample t-test of new + 0.005 against it.
The t distribution comes from scipy (scipy.stats.ttest_ind / ttest_1samp, alternative="greater").
Exit status: 0 qualifies as a record, 1 does not, 2 bad input.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlog import read_log  # noqa: E402

MARGIN_NATS = 0.005
ALPHA = 0.01


@dataclass
class Verdict:
    test: str
    n_new: int
    mean_new: float
    std_new: float
    n_previous: int
    mean_previous: float
    std_previous: float | None  # None when the previous record is a single value
    t: float
    df: float
    p: float

    @property
    def improvement(self) -> float:
        return self.mean_previous - self.mean_new

    @property
    def qualifies(self) -> bool:
        return self.p < ALPHA

    def report(self) -> str:
        previous = (f"n={self.n_previous} mean {self.mean_previous:.8f} std {self.std_previous:.8f} nats"
                    if self.std_previous is not None else f"{self.mean_previous:.8f} nats (one value)")
        return "\n".join([
            f"new:         n={self.n_new} mean {self.mean_new:.8f} std {self.std_new:.8f} nats",
            f"previous:    {previous}",
            f"improvement: {self.improvement:.8f} nats (a record needs > {MARGIN_NATS} at p < {ALPHA})",
            f"{self.test}, one-sided, H0: improvement <= {MARGIN_NATS}: t={self.t:.4f} df={self.df:.2f} p={self.p:.6f}",
            f"{'RECORD' if self.qualifies else 'NOT A RECORD'}: p={self.p:.6f} {'<' if self.qualifies else '>='} {ALPHA}",
        ])


def improvement_test(new: list[float], previous: list[float]) -> Verdict:
    """Test that mean(previous) - mean(new) > MARGIN_NATS (losses in nats; lower is better)."""
    from scipy import stats
    if len(new) < 2:
        raise ValueError(f"need at least 2 new runs for a standard deviation, got {len(new)}")
    if not previous:
        raise ValueError("need the previous record's val_loss (one value or one per seed)")
    if len(previous) == 1:  # each seed's improvement over the single value, tested against the margin
        r = stats.ttest_1samp([previous[0] - x for x in new], MARGIN_NATS, alternative="greater")
        test, prev_std = "one-sample t-test against the previous value", None
    else:  # shifting the new losses by the margin makes H0: mean(previous) <= mean(new) + margin
        r = stats.ttest_ind(previous, [x + MARGIN_NATS for x in new], equal_var=False, alternative="greater")
        test, prev_std = "Welch t-test against the previous seeds", statistics.stdev(previous)
    return Verdict(test, len(new), statistics.fmean(new), statistics.stdev(new), len(previous),
                   statistics.fmean(previous), prev_std, float(r.statistic), float(r.df), float(r.pvalue))


def losses_from_logs(paths) -> list[float]:
    out = []
    for path in paths:
        run = read_log(path)
        if run.failure():
            raise ValueError(f"{path}: {run.failure()}")
        out.append(run.score().val_loss)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    new = p.add_mutually_exclusive_group(required=True)
    new.add_argument("--new", type=float, nargs="+", metavar="NATS", help="val_loss of each new seed")
    new.add_argument("--new-logs", type=Path, nargs="+", metavar="LOG", help="read each seed's score from its log")
    p.add_argument("--previous", type=float, nargs="+", required=True, metavar="NATS",
                   help="the previous record's val_loss: one per seed (Welch) or one value")
    a = p.parse_args(argv)
    try:
        verdict = improvement_test(a.new or losses_from_logs(a.new_logs), a.previous)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(verdict.report())
    sys.exit(0 if verdict.qualifies else 1)


if __name__ == "__main__":
    main()

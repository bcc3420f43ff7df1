"""Whether a model fits a latency budget, decided robustly on a noisy (shared) machine.

    rule = FitRule(limit_ms=0.089, reference=dense_timer, reference_ms=0.178)
    verdict = rule.decide([0.121, 0.0809], timer=candidate_timer)
    verdict.fits, verdict.latency_ms, verdict.how

Load from other processes only ever makes a run *slower*, so one measurement is an upper
bound and the least of several is the best estimate of what the model costs on a quiet
machine. The rule, in order:

1. A model's latency is the **minimum over all its measurements** (each one a median of
   many runs): taken when it was tried, before and after fine-tuning -- the caller keeps
   them (the search persists them, so a resume reaches the same verdict). At or under the
   limit: it fits.
2. Over the limit by more than the noise band (``noise``, relative): it does not fit.
3. Within the band: **re-measured**, ``rounds`` times interleaved with a reference model
   (the dense net the budget was derived from, whose quiet latency ``reference_ms`` is
   known). A new minimum at or under the limit fits. Otherwise, when the reference read
   slower than its baseline by more than ``quiet`` in every round (the machine was loaded
   throughout), the candidate is judged by the median of the paired ratios
   candidate / reference against the budget's fraction ``limit / reference_ms`` -- i.e. at
   the reference's quiet speed; when the reference read at its baseline, the machine was
   quiet and the candidate's minimum stands (it does not fit).

The verdict says which step decided (``how``), with the numbers. The same rule measures the
search's trials and finalists and, in ``benchmarks/search.py``, every baseline.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeslim.core.errors import ConfigError

__all__ = ["NOISE", "QUIET", "ROUNDS", "FitRule", "Verdict"]

NOISE = 0.5  # a loaded shared machine read the same model up to 2x slow (benchmarks/README)
QUIET = 0.05  # a reference within 5% of its baseline: the machine is quiet
ROUNDS = 5  # interleaved (reference, candidate) pairs when re-measuring

Timer = Callable[[], float]


@dataclass
class Verdict:
    """Whether a model fits, the latency the verdict rests on and how it was reached.

    ``latency_ms`` is at or under the limit exactly when ``fits``: the minimum of
    ``samples``, or (judged by ratio) the median ratio times the reference's quiet latency.
    """

    fits: bool
    latency_ms: float
    samples: list[float]
    how: str
    ratio: float | None = None  # median candidate / reference (re-measured rounds)
    reference: list[float] = field(default_factory=list)  # the reference's re-measured ms

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(**data)


class FitRule:
    """The latency verdict for one limit (see the module docstring).

    ``reference``: a timer of the reference model (one call = one median, ms) and
    ``reference_ms`` its latency on a quiet machine; both optional (without them a model
    within the noise band is re-measured alone and its minimum decides).
    """

    def __init__(
        self,
        limit_ms: float,
        reference: Timer | None = None,
        reference_ms: float | None = None,
        *,
        noise: float = NOISE,
        rounds: int = ROUNDS,
        quiet: float = QUIET,
    ) -> None:
        if not limit_ms > 0:
            raise ConfigError(f"FitRule: limit_ms must be > 0, got {limit_ms}")
        if noise < 0 or quiet < 0 or rounds < 1:
            raise ConfigError(
                f"FitRule: need noise >= 0, quiet >= 0, rounds >= 1; got noise={noise}, "
                f"quiet={quiet}, rounds={rounds}"
            )
        if reference_ms is not None and not reference_ms > 0:
            raise ConfigError(f"FitRule: reference_ms must be > 0, got {reference_ms}")
        self.limit = float(limit_ms)
        self.reference = reference
        self.reference_ms = reference_ms
        self.noise, self.rounds, self.quiet = noise, rounds, quiet

    def decide(self, samples: Sequence[float], timer: Timer | None = None) -> Verdict:
        """The verdict on a model measured ``samples`` (ms) so far; ``timer`` measures it
        again (one call = one median, ms), needed when ``samples`` is empty and for the
        re-measurement near the limit. Without a timer the samples alone decide."""
        samples = [float(s) for s in samples]
        if not samples:
            if timer is None:
                raise ConfigError("FitRule.decide: no measurement and no timer")
            samples.append(float(timer()))
        best = min(samples)
        n = len(samples)
        over = best / self.limit - 1
        if best <= self.limit:
            return Verdict(
                True, best, samples, f"min of {_of(n)} {best:.4g} <= {self.limit:.4g} ms"
            )
        if over > self.noise or timer is None:
            why = "beyond the noise band" if timer is not None else "not re-measured"
            return Verdict(
                False,
                best,
                samples,
                f"min of {_of(n)} {best:.4g} ms is {100 * over:.0f}% over {self.limit:.4g} ms "
                f"({why}, {100 * self.noise:.0f}%)",
            )
        # within the noise band: re-measure, interleaved with the reference
        refs: list[float] = []
        pairs: list[tuple[float, float]] = []
        for i in range(self.rounds):
            if self.reference is None:
                samples.append(float(timer()))
                continue
            if i % 2 == 0:  # alternate the order: a drift within a round hits both alike
                r = float(self.reference())
                c = float(timer())
            else:
                c = float(timer())
                r = float(self.reference())
            refs.append(r)
            pairs.append((c, r))
            samples.append(c)
        best = min(samples)
        n = len(samples)
        again = f"re-measured {self.rounds}x"
        if best <= self.limit:
            return Verdict(
                True, best, samples, f"{again}: min of {_of(n)} {best:.4g} <= {self.limit:.4g} ms",
                reference=refs,
            )  # fmt: skip
        if not refs or self.reference_ms is None:
            return Verdict(
                False, best, samples,
                f"{again} (no reference): min of {_of(n)} {best:.4g} > {self.limit:.4g} ms",
            )  # fmt: skip
        ratio = statistics.median(c / r for c, r in pairs)
        fraction = self.limit / self.reference_ms
        ref_low = min(refs)
        if ref_low <= self.reference_ms * (1 + self.quiet):
            return Verdict(
                False, best, samples,
                f"{again}; reference at its baseline ({ref_low:.4g} vs {self.reference_ms:.4g} "
                f"ms: quiet): min of {_of(n)} {best:.4g} > {self.limit:.4g} ms",
                ratio=ratio, reference=refs,
            )  # fmt: skip
        at_quiet = ratio * self.reference_ms
        fits = at_quiet <= self.limit
        return Verdict(
            fits, at_quiet, samples,
            f"{again}; reference loaded (min {ref_low:.4g} vs baseline {self.reference_ms:.4g} "
            f"ms): median ratio candidate/reference {ratio:.4f} "
            f"{'<=' if fits else '>'} budget fraction {fraction:.4f} "
            f"(= {at_quiet:.4g} ms at the reference's quiet speed)",
            ratio=ratio, reference=refs,
        )  # fmt: skip


def _of(n: int) -> str:
    return "1 measurement" if n == 1 else f"{n} measurements"

"""A policy that raises, returns nonsense or runs too long, live on a real guest: the run goes
on with the last safe targets, every error is a ``policy_error`` event and a warning, nothing
recorded is lost."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from balloonlab.model.policy import Decision
from balloonlab.qemu.guest import Guest
from balloonlab.record.policy_loop import PolicyWarning
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import load_run

pytestmark = pytest.mark.qemu
MiB = 1 << 20


class Script:
    """A policy that answers from a list, one answer (or exception, or delay) per call."""

    name = "script"

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, view):
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else {}
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, tuple) and answer[0] == "sleep":
            time.sleep(answer[1])
            if isinstance(answer[2], Exception):
                raise answer[2]
            return answer[2]
        return answer


async def test_a_faulty_policy_never_moves_a_guest_past_its_limits_and_the_run_keeps_every_row(spec, tmp_path):
    guest = await Guest.launch(spec(memory="512M"))
    name = guest.name
    answers = [
        {name: 400 * MiB},                       # 1: fine: 512 -> 400 MiB
        ZeroDivisionError("bug in the policy"),  # 2: raises
        {name: -5},                              # 3: negative
        {name: math.nan},                        # 4: NaN
        {name: 4 << 30},                         # 5: above the guest's memory
        {"ghost": 300 * MiB},                    # 6: a guest not in the run
        ["not", "a", "mapping"],                 # 7: not targets at all
        ("sleep", 1.5, {name: 200 * MiB}),       # 8: too slow: its answer is dropped
        {},                                      # 9: skipped while 8 still runs, or nothing
        ("sleep", 1.2, KeyError("late")),        # too slow, then raises: still recorded
        # 10-12: below the floor (128 MiB, 25 % of 512): down by at most the step (128 MiB) a time
        *[Decision({name: 10 * MiB}, {name: {"reason": "squeeze"}})] * 3,
    ]
    policy = Script(answers)
    run_dir = tmp_path / "run"
    sampler = Sampler(run_dir=run_dir, host_interval_s=0.5)
    try:
        await sampler.start()
        await sampler.add(guest)
        with pytest.warns(PolicyWarning) as warned:
            loop = sampler.run_policy(policy, interval_s=0.5, timeout_s=0.6)
            with pytest.raises(ValueError, match="a policy is already running on this sampler"):
                sampler.run_policy(Script([]))
            deadline = time.monotonic() + 30
            while policy.answers and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # the last answer applied
            # the balloon took the last safe target, the floor (128 MiB is 25 % of 512 MiB)
            settled = await guest.balloon.wait_for_actual(128 * MiB, timeout_s=30)
            samples_before_stop = len(sampler.frame())
        assert not policy.answers, f"the policy was called only {policy.calls} times"
        assert settled.reached
        assert loop.limits[name].target == 128 * MiB
    finally:
        await sampler.stop()
        await guest.shutdown()
    run = load_run(run_dir)
    events = run.events
    errors = events[events["kind"] == "policy_error"]["detail"].tolist()
    text = "\n".join(errors)
    for expected in ("raised ZeroDivisionError: bug in the policy", "is negative", "is not finite",
                     "above the guest's memory", "no guest 'ghost'", "not list", "ran longer than 0.6 s",
                     "the late call the policy raised KeyError: 'late'"):
        assert expected in text, f"no policy_error saying {expected!r} in:\n{text}"
    assert len([w for w in warned if issubclass(w.category, PolicyWarning)]) >= 7
    decisions = events[(events["kind"] == "policy") & (events["guest"] == name)]
    targets = [int(v) for v in decisions["value"]]
    # the targets set: 400 MiB, then towards 10 MiB a step at a time down to the floor; the slow
    # answer's 200 MiB never
    steps = [400 * MiB, 272 * MiB, 144 * MiB, 128 * MiB]
    assert [t for i, t in enumerate(targets) if i == 0 or t != targets[i - 1]] == steps
    last = json.loads(decisions["detail"].iloc[-1])
    assert last["proposed"] == 10 * MiB and last["notes"] == f"floor {128 * MiB}"
    assert last["why"] == {"reason": "squeeze"} and last["inputs"]["actual"] is not None
    set_targets = events[(events["kind"] == "target") & (events["guest"] == name)]["value"].astype(int).tolist()
    assert set_targets == steps
    # sampling went on through it all: every row of the live frame is on disk, one per second or so
    on_disk = run.samples[run.samples["guest"] == name]
    assert len(on_disk) >= samples_before_stop >= 8
    assert run.metadata["policy"]["name"] == "script"
    assert run.metadata["policy"]["limits"][name]["floor_bytes"] == 128 * MiB
    assert len(run.host) >= 10

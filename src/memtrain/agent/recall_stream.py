"""Recall probes asked as soon as the memory they read exists, beside the memory agent's own calls.

A probe reads memory ``m_k`` and a masked chunk ``c_l`` (l <= k). Its draw depends on the chunks alone
(:func:`memtrain.agent.recall.build_recall_probes`), so once the chunks' entity candidates are known the probes are
planned, and each probe's G2 answers are requested right after its trajectory writes ``m_k``: on a streaming engine
they run while the rollouts go on, elsewhere they join the next agent step's call. No engine call is spent on probes
after the final answers, except for probes planned only after the rollouts (entity tagging still running).
"""

from __future__ import annotations

from collections.abc import Callable

from memtrain.agent.generation import GenerationOutput, SamplingConfig
from memtrain.agent.recall import RecallProbe
from memtrain.agent.request_stream import StreamRequest
from memtrain.agent.trajectory import Trajectory


class RecallProbeStream:
    """Plans the probes of a batch of rollouts when ``ready()``, and makes each probe's request once its memory exists.

    ``plan()`` returns one probe (or None) per trajectory, in trajectory order; ``prompt_of(probe)`` the token ids of
    its recall prompt. Use :meth:`after_update` as :meth:`MemoryAgent.run`'s ``after_update``, run :meth:`finish`'s
    requests after the rollouts, then read :attr:`probes`, :attr:`prompts` and :attr:`outputs`.
    """

    def __init__(
        self,
        trajectories: list[Trajectory],
        plan: Callable[[], list[RecallProbe | None]],
        ready: Callable[[], bool],
        prompt_of: Callable[[RecallProbe], list[int]],
        samples: int,
        sampling: SamplingConfig,
    ) -> None:
        self.trajectories = trajectories
        self._plan, self._ready, self._prompt_of = plan, ready, prompt_of
        self.samples = samples
        self.sampling = sampling
        self.probes: list[RecallProbe | None] | None = None
        self.prompts: dict[int, list[int]] = {}  # trajectory index -> its probe's prompt (once requested)
        self.outputs: dict[int, GenerationOutput] = {}  # trajectory index -> its probe's G2 answers
        self.planned_during_rollout = False

    def after_update(self, index: int, trajectory: Trajectory) -> list[StreamRequest]:
        """The probe requests that trajectory ``index``'s new memory makes possible (all possible ones at planning)."""
        if self.probes is None:
            if not self._ready():
                return []
            self.probes = self._plan()
            self.planned_during_rollout = True
            return [self._request(i) for i in range(len(self.probes)) if self._askable(i)]
        return [self._request(index)] if self._askable(index) else []

    def finish(self) -> list[StreamRequest]:
        """After the rollouts: plan if not yet done, and the requests of every probe not asked yet."""
        if self.probes is None:
            self.probes = self._plan()
        return [self._request(i) for i in range(len(self.probes)) if self._askable(i)]

    def _askable(self, index: int) -> bool:
        probe = self.probes[index]
        if probe is None or index in self.prompts:
            return False
        memories = self.trajectories[index].memories
        if probe.memory is None and probe.memory_step < len(memories):
            probe.memory = memories[probe.memory_step]
        return probe.memory is not None

    def _request(self, index: int) -> StreamRequest:
        prompt = self._prompt_of(self.probes[index])
        self.prompts[index] = prompt

        def on_done(output: GenerationOutput) -> list[StreamRequest]:
            self.outputs[index] = output
            return []

        return StreamRequest(prompt, self.samples, self.sampling, on_done, key=index)

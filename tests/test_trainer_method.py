"""The MemTrain method pinned end to end through MemTrainer: scripted completions, exact training rows, the KL term.

A scripted generation backend (TRL's ``_generate_single_turn`` replaced) answers every model call with a fixed
completion, so the rewards, advantages and loss weights of a hand-made batch are known numbers. Everything between
the generation backend and the loss (memory agent, recall probes, reward functions, R_i coupling, group advantages,
DAPO filtering, rows, loss weights) is the real code path of ``MemTrainer._rollout_and_score``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from memtrain.agent.memory_agent import AgentConfig
from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.configs import MemTrainConfig
from memtrain.grpo import TrainingRow
from memtrain.trainer import MemTrainer


AGENT = AgentConfig(chunk_size=32, max_chunks=2, max_problem_tokens=64, max_memory_tokens=16, max_answer_tokens=16)
PROBLEM = "Based on the entire article, which entity is represented by the [MASK] placeholder?"
ENTITIES = ["Zanzibar", "Quito", "Tbilisi"]  # one entity per document, in every chunk of it
G2 = 4
# Per rollout (document-major, G1 = 2): final answer right?, recall answers right out of G2.
FINAL_RIGHT = [True, False, False, False, False, True]
RECALL_RIGHT = [1, 3, 2, 2, 4, 0]
LAMBDA = 0.5


def _context(entity: str) -> str:
    return " ".join(f"The old port of {entity} trades spices, number {n}." for n in range(10))


def hand_made_batch() -> list[dict]:
    """Three documents, each twice (G1 = 2), in the order TRL's RepeatSampler yields them."""
    rows = []
    for d, entity in enumerate(ENTITIES):
        row = {"id": f"doc{d}", "prompt": PROBLEM, "context": _context(entity), "answers": ["[MASK] answer"]}
        rows += [dict(row), dict(row)]
    return rows


def scripted_entity_tools():
    """One entity per document, found wherever it occurs; masked by plain replacement."""

    def find_entities(texts: list[str]) -> list[list[str]]:
        return [[e for e in ENTITIES if e in text] for text in texts]

    def mask_entity(text: str, entity: str) -> str:
        return text.replace(entity, TARGET_TOKEN)

    return find_entities, mask_entity


class ScriptedBackend:
    """Stands in for TRL's generation backend: the completion of a call is a function of its prompt only.

    Memory update at step t of rollout i writes ``note r<i> step<t>`` (step 1 is told apart by its position in the
    batch, later steps by the memory they are given); the final answer is right or wrong as FINAL_RIGHT says; the
    j-th of the G2 recall answers of rollout i is right iff j < RECALL_RIGHT[i].
    """

    def __init__(self, tokenizer, answers: list[str]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.prompts: list[tuple[str, str]] = []  # (kind, decoded prompt), every call

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def __call__(self, prompt_ids, images=None, multimodal_fields=None, num_generations=1, **kwargs):
        completions, seen = [], {}
        for position, ids in enumerate(prompt_ids):
            text = self.tokenizer.decode(ids)
            note = re.search(r"note r(\d+) step(\d+)", text)
            if TARGET_TOKEN in text:
                rollout, j = int(note.group(1)), seen.get(text, 0)
                seen[text] = j + 1
                entity = ENTITIES[rollout // 2]
                reply = f"\\boxed{{{entity}}}" if j < RECALL_RIGHT[rollout] else "\\boxed{Nowhere}"
                kind = "recall"
            elif "Updated memory" in text:
                rollout, step = (position, 1) if note is None else (int(note.group(1)), int(note.group(2)) + 1)
                reply, kind = f"note r{rollout} step{step}", "update"
            else:
                rollout = int(note.group(1))
                reply = f"\\boxed{{{self.answers[rollout] if FINAL_RIGHT[rollout] else 'wrong'}}}"
                kind = "final"
            self.prompts.append((kind, text))
            completions.append(self._encode(reply))
        return completions, None


def make_trainer(model, tokenizer, tmp_path: Path, **overrides) -> MemTrainer:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, num_generations=2, recall_samples=G2,
        max_steps=1, report_to="none", use_cpu=True, bf16=False, seed=0, trajectory_html_steps=0,
        beta=0.0,
    )  # fmt: skip
    settings.update(overrides)
    return MemTrainer(
        model=model,
        args=MemTrainConfig(**settings),
        agent_config=AGENT,
        train_dataset=Dataset.from_list(hand_made_batch()),
        processing_class=tokenizer,
        entity_tools=scripted_entity_tools(),
    )


def scripted_rows(trainer: MemTrainer) -> tuple[list[TrainingRow], ScriptedBackend]:
    batch = hand_made_batch()
    backend = ScriptedBackend(trainer.processing_class, [row["answers"][0] for row in batch])
    trainer._generate_single_turn = backend
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    trainer.model.train()
    return trainer._rollout_and_score(batch), backend


def expected_rollout_advantages() -> list[float]:
    """R_i = EM_i + lambda x mean recall EM, centred within each document's G1 = 2 rollouts (no std division)."""
    rewards = [float(em) + LAMBDA * right / G2 for em, right in zip(FINAL_RIGHT, RECALL_RIGHT)]
    return [r - (rewards[i - i % 2] + rewards[i - i % 2 + 1]) / 2 for i, r in enumerate(rewards)]


def rollout_of(row: TrainingRow, tokenizer) -> int:
    return int(re.search(r"note r(\d+) step", tokenizer.decode(row.prompt_ids)).group(1))


@pytest.fixture
def scripted(tiny_model, tokenizer, tmp_path, monkeypatch):
    import memtrain.trainer

    probes = []

    def recording_build_recall_probes(*args, **kwargs):
        made = build(*args, **kwargs)
        probes.extend(made)
        return made

    build = memtrain.trainer.build_recall_probes
    monkeypatch.setattr(memtrain.trainer, "build_recall_probes", recording_build_recall_probes)
    trainer = make_trainer(tiny_model, tokenizer, tmp_path)
    rows, backend = scripted_rows(trainer)
    backend.probes = probes
    return trainer, rows, backend


def test_default_config_is_the_papers_objective(tmp_path):
    args = MemTrainConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert args.reward_funcs == ["masked_entity_em", "memory_recall"] and args.reward_weights == [1.0, 0.5]
    assert args.scale_rewards == "none" and args.filter_zero_variance_groups
    assert args.beta == pytest.approx(1e-3) and args.epsilon == 0.2
    assert (args.epsilon_high or args.epsilon) == 0.2  # None: the trainer uses epsilon for the upper clip too
    assert args.learning_rate == pytest.approx(1e-6) and args.warmup_steps == 20
    assert str(
        args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value") else args.lr_scheduler_type
    ) == ("constant_with_warmup")
    assert args.weight_decay == pytest.approx(0.01) and args.max_grad_norm == 1.0
    assert args.temperature == 1.0 and args.top_p == 1.0
    assert args.num_generations == 8 and args.recall_samples == 8
    assert args.loss_aggregation == "conversation_mean"
    # lambda follows memory_recall wherever it is listed; other rewards weigh 1
    args = MemTrainConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, reward_funcs=["memory_recall", "answer_f1"]
    )
    assert args.reward_weights == [0.5, 1.0]


def test_memory_and_final_rows_carry_their_rollouts_centred_coupled_advantage(scripted, tokenizer):
    trainer, rows, _ = scripted
    expected = expected_rollout_advantages()
    turns = [r for r in rows if r.kind in {"update", "final"}]
    by_rollout: dict[int, list[TrainingRow]] = {}
    for row in turns:
        assert row.conversation == rollout_of(row, tokenizer) if row.kind == "final" else True
        by_rollout.setdefault(row.conversation, []).append(row)
    # document 1's two rollouts have equal R (0 + 0.5 x 2/4 each): DAPO drops the group, no rows
    assert sorted(by_rollout) == [0, 1, 4, 5]
    for i, group in by_rollout.items():
        assert sorted(r.kind for r in group) == ["final", "update", "update"], i  # 2 chunks + the final answer
        for row in group:
            assert row.advantage == pytest.approx(expected[i], abs=1e-6), (i, row.kind)
    # the numbers themselves: (1 + 0.5/4) vs (0 + 0.5 x 3/4), (0 + 0.5) vs (1 + 0)
    assert [expected[i] for i in (0, 1, 4, 5)] == pytest.approx([0.375, -0.375, -0.25, 0.25])
    log = trainer._metrics["train"]
    assert log["groups_filtered"][-1] == 1


def test_recall_answers_carry_their_probe_groups_centred_advantage(scripted, tokenizer):
    trainer, rows, _ = scripted
    recall = [r for r in rows if r.kind == "recall"]
    by_rollout: dict[int, list[TrainingRow]] = {}
    for row in recall:
        by_rollout.setdefault(rollout_of(row, tokenizer), []).append(row)
    # rollouts 4 and 5 answered all right / all wrong: both probe groups are filtered
    assert sorted(by_rollout) == [0, 1, 2, 3]
    assert trainer._metrics["train"]["recall_groups_filtered"][-1] == 2
    for i, group in by_rollout.items():
        assert len(group) == G2
        mean = RECALL_RIGHT[i] / G2
        for row in group:
            right = ENTITIES[i // 2] in tokenizer.decode(row.completion_ids)
            assert row.advantage == pytest.approx((1.0 if right else 0.0) - mean, abs=1e-6), (i, right)
        assert sum(ENTITIES[i // 2] in tokenizer.decode(r.completion_ids) for r in group) == RECALL_RIGHT[i]
    assert len({r.conversation for r in recall}) == len(recall)  # each recall answer is its own conversation


def test_recall_probe_reads_a_chunk_its_memory_has_already_read(scripted, tokenizer):
    """The (k, l) choice reaches the probe prompt: memory m_k (written at step k) and a chunk l <= k, masked."""
    trainer, _, backend = scripted
    trajectories = trainer._last_trajectories
    assert len(backend.probes) == len(trajectories)
    for i, probe in enumerate(backend.probes):
        trajectory, entity = trajectories[i], ENTITIES[i // 2]
        assert probe.trajectory_index == i and probe.entity == entity
        assert 1 <= probe.chunk_index <= probe.memory_step <= trajectory.num_chunks
        assert probe.memory == trajectory.memories[probe.memory_step]
        assert probe.masked_chunk == trajectory.chunks[probe.chunk_index - 1].replace(entity, TARGET_TOKEN)
    # this batch draws some intermediate memory (k < K), so m_k and the final memory are told apart
    assert any(p.memory_step < trajectories[p.trajectory_index].num_chunks for p in backend.probes)
    prompts = [text for kind, text in backend.prompts if kind == "recall"]
    assert len(prompts) == len(trajectories) * G2
    for text in prompts:
        rollout, k = (int(g) for g in re.search(r"note r(\d+) step(\d+)", text).groups())
        probe = backend.probes[rollout]
        assert k == probe.memory_step and re.findall(r"note r\d+ step\d+", text) == [probe.memory]
        assert probe.masked_chunk in text and ENTITIES[rollout // 2] not in text


def test_memory_is_overwritten_each_step(scripted, tokenizer):
    """Step t sees only the memory of step t - 1; the final answer sees only the last memory."""
    trainer, rows, backend = scripted
    for kind, text in backend.prompts:
        notes = re.findall(r"note r\d+ step(\d+)", text)
        if kind == "update":
            assert len(notes) <= 1
        elif kind == "final":
            assert notes == [str(AGENT.max_chunks)]
    for trajectory in trainer._last_trajectories:
        final = trajectory.calls[-1]
        assert final.kind == "final"
        expected = trainer.memory_agent.encode_chat(trainer.templates.render_final(PROBLEM, trajectory.memories[-1]))
        assert final.prompt_ids == expected


@pytest.mark.parametrize("aggregation", ["conversation_mean", "token_mean", "rollout_mean"])
def test_loss_weights_sum_as_the_aggregation_says(tiny_model, tokenizer, tmp_path, aggregation):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, loss_aggregation=aggregation)
    rows, _ = scripted_rows(trainer)
    mass = [r.weight * len(r.completion_ids) for r in rows]
    assert sum(mass) == pytest.approx(1.0)
    if aggregation == "conversation_mean":  # every model call weighs the same
        assert mass == pytest.approx([1 / len(rows)] * len(rows))
    elif aggregation == "token_mean":  # every token weighs the same
        assert {round(r.weight, 9) for r in rows} == {round(1 / sum(len(r.completion_ids) for r in rows), 9)}
    else:  # a rollout's calls together weigh as one recall answer
        per: dict[int, float] = {}
        for row, m in zip(rows, mass):
            per[row.conversation] = per.get(row.conversation, 0.0) + m
        assert list(per.values()) == pytest.approx([1 / len(per)] * len(per))


def test_lambda_scales_the_recall_term_in_the_rollout_reward(tiny_model, tokenizer, tmp_path):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, reward_weights=[1.0, 2.0])
    rows, _ = scripted_rows(trainer)
    # document 0: R = 1 + 2 x 1/4 = 1.5 vs 2 x 3/4 = 1.5: equal, so the group is filtered at lambda = 2
    assert {r.conversation for r in rows if r.kind != "recall"} == {4, 5}


def _hand_logps(model, row: TrainingRow) -> torch.Tensor:
    ids = torch.tensor([row.prompt_ids + row.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(row.completion_ids).unsqueeze(-1)).squeeze(-1)


def _check_kl_against_hand(trainer: MemTrainer, policy, reference_logps, beta: float) -> None:
    rows, _ = scripted_rows(trainer)
    rows = sorted(rows, key=lambda r: r.num_tokens)[:3]
    for row in rows:
        row.weight = 1.0 / 7
    trainer._metrics["train"]["kl"].clear()
    loss = trainer._micro_batch_loss(trainer.model, rows, "train")
    trainer._log_loss_metrics("train")
    kl_tokens, want_loss = [], 0.0
    for row in rows:
        policy_logps = _hand_logps(policy, row)
        delta = reference_logps(row) - policy_logps
        k3 = torch.exp(delta) - delta - 1  # TRL's low-variance estimator of KL(policy || reference), >= 0
        kl_tokens.append(k3)
        # old log-probs = current ones: ratio 1, so the PPO term is -A per token
        want_loss += float(((-row.advantage + beta * k3) * row.weight).sum())
    kl = torch.cat(kl_tokens)
    assert float(kl.mean()) > 1e-3, "policy and reference should differ in this test"
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert float(loss) == pytest.approx(want_loss, rel=1e-4, abs=1e-7)


def test_kl_is_taken_against_trls_reference_copy(tiny_checkpoint, tokenizer, tmp_path):
    """Full fine-tuning: the policy is moved away from TRL's reference copy; KL and loss match a hand computation."""
    beta = 0.5
    trainer = make_trainer(str(tiny_checkpoint), tokenizer, tmp_path, beta=beta)
    assert trainer.ref_model is not None
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _check_kl_against_hand(trainer, trainer.model, lambda row: _hand_logps(trainer.ref_model, row), beta)


def test_kl_is_taken_against_the_adapter_off_base_with_peft(tiny_model, tokenizer, tmp_path):
    """LoRA (every QLoRA recipe): the reference is the base with the adapter disabled, no second model."""
    from peft import LoraConfig

    beta = 0.5
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    trainer = MemTrainer(
        model=tiny_model,
        args=MemTrainConfig(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=6,
            num_generations=2,
            recall_samples=G2,
            max_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
            trajectory_html_steps=0,
            beta=beta,
        ),  # fmt: skip
        agent_config=AGENT,
        train_dataset=Dataset.from_list(hand_made_batch()),
        processing_class=tokenizer,
        entity_tools=scripted_entity_tools(),
        peft_config=peft_config,
    )
    assert trainer.ref_model is None
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 2.0)

    def base_logps(row: TrainingRow) -> torch.Tensor:
        with trainer.model.disable_adapter():
            return _hand_logps(trainer.model, row)

    _check_kl_against_hand(trainer, trainer.model, base_logps, beta)


def test_ppo_clip_stops_the_gradient_outside_the_trust_region(scripted):
    """A positive-advantage token whose ratio already exceeds 1 + epsilon_high contributes no gradient."""
    trainer, rows, _ = scripted
    row = next(r for r in rows if r.advantage > 0)
    logps, _ = trainer._row_logps(trainer.model, [row])
    row = TrainingRow(row.prompt_ids, row.completion_ids, row.advantage, row.kind, row.conversation, weight=1.0)
    # old log-probs 0.5 nats below the current ones: ratio e^0.5 = 1.65 > 1.2 on every token
    row.old_logps = (logps[0, : len(row.completion_ids)].detach() - 0.5).tolist()
    trainer.model.zero_grad()
    loss = trainer._micro_batch_loss(trainer.model, [row], "train")
    loss.backward()
    trainer._log_loss_metrics("train")
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    assert float(loss) == pytest.approx(-(1 + trainer.epsilon_high) * row.advantage * len(row.completion_ids))
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] == 1.0


SEARCH_RIGHT = [True, False, True, True]  # rollouts of 2 questions x G1 = 2


class ScriptedSearchBackend(ScriptedBackend):
    """Turn 1 of rollout i: think ``state r<i>`` and search; turn 2: answer, right or wrong as SEARCH_RIGHT says."""

    def __call__(self, prompt_ids, images=None, multimodal_fields=None, num_generations=1, **kwargs):
        completions = []
        for position, ids in enumerate(prompt_ids):
            text = self.tokenizer.decode(ids)
            note = re.search(r"state r(\d+)", text)
            if note is None:
                reply = f"<think>state r{position}</think><search>Hamlet playwright</search>"
            else:
                i = int(note.group(1))
                reply = f"<think>state r{i} done</think><answer>{self.answers[i] if SEARCH_RIGHT[i] else 'x'}</answer>"
            self.prompts.append(("search", text))
            completions.append(self._encode(reply))
        return completions, None


def test_search_agent_rows_carry_their_rollouts_centred_advantage(tiny_model, tokenizer, tmp_path):
    fixtures = Path(__file__).parent / "fixtures"
    question = {"prompt": "Who wrote Hamlet?", "answers": ["William Shakespeare"]}
    batch = [dict(question, id="q0"), dict(question, id="q0"), dict(question, id="q1"), dict(question, id="q1")]
    trainer = MemTrainer(
        model=tiny_model,
        args=MemTrainConfig(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=4,
            num_generations=2,
            max_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            seed=0,
            trajectory_html_steps=0,
            beta=0.0,
            agent_type="search",
            retriever=str(fixtures / "search" / "dpr_passages_200.jsonl"),
            search_max_turns=2,
            search_max_new_tokens=32,
            reward_funcs=["search_em"],
            train_recall_answers=False,
        ),  # fmt: skip
        train_dataset=Dataset.from_list(batch),
        processing_class=tokenizer,
    )
    backend = ScriptedSearchBackend(tokenizer, ["William Shakespeare"] * 4)
    trainer._generate_single_turn = backend
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    rows = trainer._rollout_and_score(batch)
    # question 0: EM 1 vs 0 -> advantages +0.5 / -0.5 on both turns; question 1: both right -> filtered, no rows
    assert sorted((r.conversation, r.kind) for r in rows) == [(0, "final"), (0, "search"), (1, "final"), (1, "search")]
    for row in rows:
        assert row.advantage == pytest.approx(0.5 if row.conversation == 0 else -0.5)
        assert f"state r{row.conversation}" in tokenizer.decode(row.prompt_ids + row.completion_ids)
    assert [r.weight * len(r.completion_ids) for r in rows] == pytest.approx([0.25] * 4)

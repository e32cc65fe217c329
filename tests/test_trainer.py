"""MemTrainer on a tiny random model over real built MemTrain documents (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from memtrain.agent.generation import SamplingConfig, TransformersGenerator
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
from memtrain.configs import MemTrainConfig
from memtrain.grpo import TrainingRow
from memtrain.rewards import REWARD_FUNCS
from memtrain.trainer import MemTrainer, TrainerGenerator


AGENT = AgentConfig(chunk_size=48, max_chunks=2, max_problem_tokens=64, max_memory_tokens=8, max_answer_tokens=6)


@pytest.fixture(scope="module")
def documents() -> Dataset:
    """Three real MemTrain documents (5 paragraphs each) built from the shipped Wikipedia sample."""
    from memtrain.data.corpus import builtin_corpus_path, load_corpus
    from memtrain.data.documents import DocumentBuilderConfig, build_documents

    corpus = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=300)
    config = DocumentBuilderConfig(
        num_documents=3, num_neighbours=2, num_random=2, neighbour_method="bm25", seed=7, show_progress=False
    )
    return Dataset.from_list(build_documents(corpus.paragraphs, config).rows)


def answer_length_reward(completions, **kwargs) -> list[float]:
    """A real reward with spread on a random model: how many characters the final answer has."""
    return [float(len(text)) / 10 for text in completions]


def entity_tools():
    from memtrain.agent.recall import default_entity_tools

    return default_entity_tools()


def make_trainer(model, tokenizer, dataset, tmp_path: Path, funcs=None, **overrides) -> MemTrainer:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        num_generations=2,
        recall_samples=2,
        max_steps=2,
        learning_rate=1e-2,
        warmup_steps=0,  # the paper's 20 warm-up steps start at lr 0: these tests need the first step to move
        temperature=1.0,
        beta=0.0,
        scale_rewards="none",
        logging_steps=1,
        save_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        trajectory_html_steps=1,
        reward_funcs=["answer_length_reward", "memory_recall"],
        reward_weights=[1.0, 0.5],
        lenient_recall=True,
    )
    settings.update(overrides)
    args = MemTrainConfig(**settings)
    return MemTrainer(
        model=model,
        args=args,
        agent_config=AGENT,
        train_dataset=dataset,
        processing_class=tokenizer,
        entity_tools=entity_tools(),
        reward_funcs=funcs or [answer_length_reward, REWARD_FUNCS["memory_recall"]],
    )


def test_every_row_is_scored_on_its_own_prompt(tiny_model, tokenizer, documents, tmp_path):
    """Training-time log-probs of each call's completion = generation-time log-probs of that same completion."""
    generator = TransformersGenerator(tiny_model, tokenizer, SamplingConfig(temperature=1.0, seed=3))
    agent = MemoryAgent(tokenizer, generator, AGENT)
    trajectories = agent.rollout(documents["context"][:2], documents["prompt"][:2], n=2)
    rows, expected = [], []
    for i, trajectory in enumerate(trajectories):
        assert len(trajectory.calls) == trajectory.num_chunks + 1
        for call in trajectory.calls:
            rows.append(TrainingRow(call.prompt_ids, call.completion_ids, 1.0, call.kind, i))
            expected.append(call.logprobs)
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path)
    computed = trainer.compute_row_logps(rows)
    for got, want, row in zip(computed, expected, rows):
        assert len(got) == len(row.completion_ids)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=0)


def test_trainer_generator_makes_one_call_per_agent_step(tiny_model, tokenizer, documents, tmp_path):
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path)
    trajectories = trainer.memory_agent.rollout(documents["context"][:2], documents["prompt"][:2], n=2)
    steps = max(len(t.calls) for t in trajectories)
    assert isinstance(trainer.generator, TrainerGenerator)
    assert trainer.generator.calls == steps
    for trajectory in trajectories:
        assert all(len(c.completion_ids) <= AGENT.max_memory_tokens for c in trajectory.calls if c.kind == "update")


def test_two_steps_train_checkpoint_and_resume(tiny_model, tokenizer, documents, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path)
    trainer.train()
    after = tiny_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "two optimizer steps left the weights unchanged"

    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logs) == 2
    for key in ("rewards/answer_length_reward/mean", "recall_accuracy", "memory_tokens/mean",
                "rows_trained", "tokens_trained", "groups_filtered", "recall_candidates/template_text_ratio"):  # fmt: skip
        assert key in logs[0], key
    # 2 rollouts x (2 chunks + final) + recall answers: at least the 6 memory/final rows per document.
    assert logs[0]["rows_trained"] >= 6
    run = Path(trainer.args.output_dir)
    assert (run / "checkpoint-2").is_dir()
    assert (run / "trajectories" / "step-000001.html").is_file()

    from conftest import build_tiny_model

    resumed = make_trainer(build_tiny_model(tokenizer, seed=1), tokenizer, documents, tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert resumed.state.global_step == 3
    steps = [entry["step"] for entry in resumed.state.log_history if "reward" in entry]
    assert steps == [1, 2, 3]


def test_a_step_whose_groups_are_all_filtered_leaves_the_weights_alone(tiny_model, tokenizer, documents, tmp_path):
    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, weight_decay=0.1, train_recall_answers=False,
        reward_funcs=["constant_reward"], reward_weights=[1.0], filter_zero_variance_groups=True,
        funcs=[constant_reward],
    )  # fmt: skip
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["groups_filtered"] == 1 and log["rows_trained"] == 0 and log["skipped_steps"] == 1


def test_ddp_processes_with_different_call_counts_stay_in_lockstep(smollm2_tokenizer_dir, tmp_path):
    """Two DDP processes (gloo, CPU) whose documents differ in length: no deadlock, identical weights after."""
    from test_trainer_distributed import assert_same_generation_rounds, run_workers

    reports = run_workers(smollm2_tokenizer_dir, tmp_path, "train")
    assert all(r["world_size"] == 2 and r["global_step"] == 2 for r in reports)
    assert reports[0]["generator_calls"] != reports[1]["generator_calls"]
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-6)
    # logged metrics are gathered over both processes: every rank logs the same global values
    for mine, theirs in zip(reports[0]["logged"], reports[1]["logged"], strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9, nan_ok=True), key  # one gathered value
    assert reports[0]["logged"][0]["chunks/mean"] not in {1.0, None}  # rank 0 alone reads 1-chunk documents
    # every scoring forward (each an all-reduce in the worker, as FSDP's gather) ran as often on both processes
    assert reports[0]["forwards"] == reports[1]["forwards"]
    assert_same_generation_rounds(reports)  # every generation as wide, with the same budget, on both processes
    # DDP all-reduces once per step, at the last micro-batch; under FSDP no micro-batch defers its reduction
    for report in reports:
        assert sum(report["syncs"]) == 2 and report["syncs"][-1] and len(report["syncs"]) > 2
        assert report["ddp_no_sync"] and not report["fsdp_no_sync"]
    # log_completions: rank 0 logs the rollouts of both processes, one table per step
    tables = reports[0]["completions"]
    assert len(tables) == 2 and "completions" not in reports[1]
    for table in tables:
        assert {"prompt", "completion", "memories", "answer_length_reward", "memory_recall", "advantage"} <= set(
            table["columns"]
        )
        assert len(table["memories"]) == 4  # 2 processes x 2 rollouts
        # rank 0's 1-paragraph documents are read in fewer chunks than rank 1's 6-paragraph ones
        assert table["memories"][0].count("\n\n[") < table["memories"][-1].count("\n\n[")


def test_search_agent_rollouts_train_one_row_per_turn(tiny_model, tokenizer, tmp_path):
    """MEM1-style search QA through the same trainer: a real BM25 index over DPR passages, pairs of questions."""
    from memtrain.data.searchqa import build_multi_question_rows, load_qa_pairs

    fixtures = Path(__file__).parent / "fixtures"
    nq = load_qa_pairs(fixtures / "search" / "nq_test_17.jsonl")
    hotpot = load_qa_pairs(fixtures / "longqa" / "hotpotqa_train_12.json")
    dataset = Dataset.from_list(build_multi_question_rows([nq, hotpot], num_rows=2, seed=0))

    def token_checksum_reward(completions, completion_ids, **kwargs):
        return [(sum(ids) % 97) / 97 for ids in completion_ids]

    trainer = make_trainer(
        tiny_model, tokenizer, dataset, tmp_path, max_steps=1, agent_type="search",
        retriever=str(fixtures / "search" / "dpr_passages_200.jsonl"), search_max_turns=2, search_max_new_tokens=8,
        reward_funcs=["token_checksum_reward", "search_em"], reward_weights=[1.0, 1.0], train_recall_answers=False,
        trajectory_html_steps=0, funcs=[token_checksum_reward, REWARD_FUNCS["search_em"]],
    )  # fmt: skip
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert "rewards/search_em/mean" in log and "searches/mean" in log and "recall_accuracy" not in log
    # every rollout makes 1..3 calls (2 turns + a forced answer), each its own row
    assert 2 <= log["rows_trained"] <= 2 * 2 * 3
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_kl_to_the_reference_model_is_a_loss_term_when_beta_is_set(tiny_checkpoint, tokenizer, documents, tmp_path):
    """Full fine-tuning with beta > 0: TRL's reference copy scores every row; the KL is logged (0 at step 1)."""
    trainer = make_trainer(str(tiny_checkpoint), tokenizer, documents, tmp_path, max_steps=1, beta=0.04)
    assert trainer.ref_model is not None
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["rows_trained"] > 0
    # before the first update the policy is the reference: the k3 estimate is 0 up to float error
    assert log["kl"] == pytest.approx(0.0, abs=1e-6)


def test_reused_generations_are_scored_against_their_old_log_probs(tiny_model, tokenizer, documents, tmp_path):
    """num_iterations = 2: the second update reuses the rollouts, so rows carry their generation-time log-probs."""
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path, max_steps=2, num_iterations=2)
    trainer.train()
    rows = [row for shard in trainer._buffered_inputs for row in shard]
    assert rows and all(row.old_logps is not None and len(row.old_logps) == len(row.completion_ids) for row in rows)
    logs = [entry for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    assert len(logs) == 2
    # one rollout phase for the two updates
    assert len([entry for entry in trainer.state.log_history if "rollout_time" in entry]) == 1


def test_log_completions_records_each_rollouts_problem_memories_answer_rewards(
    tiny_model, tokenizer, documents, tmp_path, capsys
):
    """TRL's completions table (printed, saved under completions/) with one row per rollout of the step."""
    import pandas as pd

    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, log_completions=True, num_completions_to_print=1,
        trajectory_html_steps=0, save_strategy="no",
    )  # fmt: skip
    trainer.train()
    tables = sorted((Path(trainer.args.output_dir) / "completions").glob("*.parquet"))
    assert [t.name for t in tables] == ["completions_00001.parquet"]
    table = pd.read_parquet(tables[0])
    expected = ["step", "prompt", "completion", "answer_length_reward", "memory_recall", "memories", "doc_id"]
    assert list(table.columns) == [*expected, "advantage"]
    trajectories = trainer._last_trajectories
    assert len(table) == len(trajectories) == 2  # one document x num_generations rollouts
    for (_, row), trajectory in zip(table.iterrows(), trajectories, strict=True):
        assert row["prompt"] == trajectory.problem and row["completion"] == trajectory.answer
        assert len(trajectory.memories) > 1  # the initial memory, then one per chunk read
        for t, memory in enumerate(trajectory.memories[1:], start=1):
            assert f"[{t}] {memory}" in row["memories"]
    # advantages are centred within the document's group; rewards are the functions' own values
    assert table["advantage"].sum() == pytest.approx(0.0, abs=1e-6)
    assert table["answer_length_reward"].tolist() == pytest.approx([len(t.answer) / 10 for t in trajectories])
    assert "Step 1" in capsys.readouterr().out  # rich printed num_completions_to_print rows


def test_a_filtered_micro_step_does_not_skip_the_accumulated_update(tiny_model, tokenizer, documents, tmp_path):
    """Gradient accumulation 2: an all-filtered first micro-step, a learning second one: the update happens."""
    calls = []

    def constant_then_length_reward(completions, **kwargs):
        calls.append(len(completions))
        return [1.0 if len(calls) == 1 else len(text) + i for i, text in enumerate(completions)]

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, gradient_accumulation_steps=2,
        steps_per_generation=1, train_recall_answers=False, reward_funcs=["constant_then_length_reward"],
        reward_weights=[1.0], filter_zero_variance_groups=True, funcs=[constant_then_length_reward],
        trajectory_html_steps=0, save_strategy="no",
    )  # fmt: skip
    trainer.train()
    assert len(calls) == 2 and trainer.state.global_step == 1
    log = next(entry for entry in trainer.state.log_history if "reward" in entry)
    assert log["skipped_steps"] == 0.5  # the first micro-step had nothing to learn, the second had rows
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_rows_scored_after_an_update_get_old_log_probs(tiny_model, tokenizer, documents, tmp_path):
    """steps_per_generation 2, gradient accumulation 3: a generation's second half is trained after a step."""
    trainer = make_trainer(
        tiny_model, tokenizer, documents, tmp_path, max_steps=1, gradient_accumulation_steps=3,
        steps_per_generation=2, trajectory_html_steps=0, save_strategy="no",
    )  # fmt: skip
    assert trainer._needs_old_logps()
    trainer.model.train()
    trainer._prepare_inputs([documents[i] for i in (0, 0, 1, 1)])  # a generation batch: 2 documents x G1
    rows = [row for shard in trainer._buffered_inputs for row in shard]
    assert rows and all(row.old_logps is not None and len(row.old_logps) == len(row.completion_ids) for row in rows)
    aligned = make_trainer(tiny_model, tokenizer, documents, tmp_path, gradient_accumulation_steps=2,
                           steps_per_generation=2)  # fmt: skip
    assert not aligned._needs_old_logps()  # one optimizer step consumes the whole generation


def test_deepspeed_is_refused_before_the_model_loads(tiny_model, tokenizer, documents, tmp_path, monkeypatch):
    args = MemTrainConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_generations=2,
                          use_cpu=True, report_to="none")  # fmt: skip
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --config_file zero3.yaml` sets
    with pytest.raises(ValueError, match="DeepSpeed"):
        MemTrainer.check_launcher()  # train.py's check, before the recipe is parsed
    with pytest.raises(ValueError, match=r"DeepSpeed.*fsdp\.yaml"):
        MemTrainer(model=tiny_model, args=args, agent_config=AGENT, train_dataset=documents, processing_class=tokenizer,
                   entity_tools=entity_tools(), reward_funcs=[answer_length_reward])  # fmt: skip
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    MemTrainer.check_launcher(args)  # DDP / FSDP / one process: accepted
    with pytest.raises(ValueError, match="DeepSpeed"):
        MemTrainer.check_launcher(args, deepspeed_enabled=True)  # a plugin passed in code


def test_fsdp2_under_bf16_reduces_gradients_in_fp32():
    """Accelerate's FSDP2 plugin under mixed_precision bf16 reduces in bf16; MemTrainer switches that to fp32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does for `mixed_precision: bf16`
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    policy = MemTrainer._fp32_reduce_policy(plugin)
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32,
                                                                              torch.bfloat16)  # fmt: skip
    full = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert MemTrainer._fp32_reduce_policy(full) is None  # no mixed precision: parameters' own dtype
    full.set_mixed_precision("fp32")
    assert MemTrainer._fp32_reduce_policy(full) is None
    assert MemTrainer._fp32_reduce_policy(None) is None

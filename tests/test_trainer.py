"""MemTrainer on a tiny random model over real built MemTrain documents (CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from memtrain.agent.memory_agent import AgentConfig
from memtrain.configs import MemTrainConfig
from memtrain.rewards import REWARD_FUNCS
from memtrain.trainer import MemTrainer


AGENT = AgentConfig(chunk_size=48, max_chunks=2, max_problem_tokens=64, max_memory_tokens=8, max_answer_tokens=6)


def answer_length_reward(completions, **kwargs) -> list[float]:
    """A real reward with spread on a random model: how many characters the final answer has, ties (two random answers
    of one length: their budget in tokens is small) broken by the characters themselves."""
    return [float(len(text)) / 10 + 1e-3 * (sum(map(ord, text)) % 100) for text in completions]


def entity_tools():
    from memtrain.agent.recall import default_entity_tools

    return default_entity_tools()


def make_trainer(model, tokenizer, dataset, tmp_path: Path, funcs=None, peft_config=None, **overrides) -> MemTrainer:
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
        peft_config=peft_config,
    )


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


def test_ddp_processes_with_different_call_counts_stay_in_lockstep(smollm2_tokenizer_dir, tmp_path):
    """Two DDP processes (gloo, CPU) whose documents differ in length: no deadlock, identical weights after."""
    from test_trainer_distributed import assert_paired_generation_rounds, run_workers

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
    assert_paired_generation_rounds(reports)  # calls paired one to one, fillers of one row and one token
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


def test_the_training_forward_has_no_lora_dropout(tiny_model, tokenizer, documents, tmp_path):
    """Rows are the sampler's own tokens, scored against log-probs taken without dropout (old log-probs, vLLM's for
    importance sampling): a recipe's lora_dropout must not noise the training forward (issue 22)."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    trainer = make_trainer(tiny_model, tokenizer, documents, tmp_path, peft_config=lora)
    model = trainer.model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at init, where dropout on the adapter's input would change nothing
                parameter.normal_(std=1.0)
    model.train()
    ids = torch.tensor([tokenizer("The memory agent reads a long text chunk by chunk.")["input_ids"]])
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)

"""Model cards render with real values and round-trip; pushes send the right files (only the Hub server is faked)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.errors import HfHubHTTPError

from memtrain import hub
from memtrain.hub import hub_card_template, push_folder_to_hub, render_model_card


RECIPE = """\
# SmolLM2-135M, QLoRA, one consumer GPU
model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
reward_funcs: [masked_entity_em, memory_recall]
reward_weights: [1.0, 0.5]
hub_token: hf_SECRETSECRET
pad_token: <|endoftext|>
max_new_tokens: 1024
note: "a literal fence ``` inside the recipe"
"""


def adapter_card(**overrides) -> ModelCard:
    kwargs = dict(
        repo_id="alice/smollm2-135m-memtrain-lora",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        recipe_name="smollm2-135m-qlora",
        recipe_yaml=RECIPE,
        dataset_id="alice/memtrain-wiki-masked",
        metrics={
            "eval/masked_entity_em": 0.5625,
            "eval/accuracy@7k": 0.4,
            "train/steps": 300,
            "skipped": float("nan"),
        },
        is_adapter=True,
    )
    kwargs.update(overrides)
    return render_model_card(**kwargs)


def test_adapter_card_metadata_round_trips():
    card = adapter_card()
    data = ModelCard(str(card)).data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["library_name"] == "peft"
    assert data["tags"] == ["memtrain", "grpo", "trl", "memory-agent", "lora", "peft"]
    assert data["datasets"] == ["alice/memtrain-wiki-masked"]
    assert data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    assert data["model_name"] == "smollm2-135m-memtrain-lora"


def test_adapter_card_body_has_recipe_metrics_and_usage():
    text = ModelCard(str(adapter_card())).text
    assert "arxiv.org/abs/2606.03197" in text
    assert "A LoRA adapter (PEFT) for [HuggingFaceTB/SmolLM2-135M-Instruct]" in text
    # the recipe, verbatim except for the secret, in a fence longer than the ``` it contains
    assert "````yaml\n# SmolLM2-135M, QLoRA, one consumer GPU\n" in text
    assert "reward_weights: [1.0, 0.5]\n" in text
    assert "hub_token: <redacted>" in text and "SECRETSECRET" not in text
    # a token given as a bare command-line value (no `key:`) is redacted too
    bare = adapter_card(recipe_yaml="note: trained with --hub_token hf_BareSecret12345\n")
    assert "hf_BareSecret12345" not in str(bare) and "--hub_token <redacted>" in str(bare)
    assert "pad_token: <|endoftext|>" in text and "max_new_tokens: 1024" in text
    # the metrics table
    assert "| metric | value |\n|---|---|\n| eval/masked_entity_em | 0.5625 |\n" in text
    assert "| eval/accuracy@7k | 0.4000 |\n| train/steps | 300 |\n| skipped | n/a |" in text
    # usage
    assert "memtrain read --model alice/smollm2-135m-memtrain-lora --context-file article.txt" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/smollm2-135m-memtrain-lora")' in text
    assert "- transformers: " in text and "- trl: " in text


def test_full_model_card_without_dataset_or_metrics():
    card = adapter_card(is_adapter=False, dataset_id=None, metrics={}, license="mit", extra_tags=["qwen", "memtrain"])
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert "datasets" not in data
    assert data["license"] == "mit"
    assert data["tags"] == ["memtrain", "grpo", "trl", "memory-agent", "qwen"]
    assert "A fine-tune of [HuggingFaceTB/SmolLM2-135M-Instruct]" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/smollm2-135m-memtrain-lora")' in card.text
    assert "AutoPeftModelForCausalLM" not in card.text
    assert "a local dataset (not published)" in card.text
    assert "No evaluation was run" in card.text


def test_local_bases_and_datasets_are_named_but_not_linked(caplog, tmp_path):
    data_dir = tmp_path / "masked"
    data_dir.mkdir()
    for base in ["/models/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m", str(tmp_path)]:
        card = adapter_card(base_model=base, dataset_id=str(data_dir))
        data = ModelCard(str(card)).data.to_dict()
        assert "base_model" not in data and "datasets" not in data
        assert f"A LoRA adapter (PEFT) for a local base model (`{base}`)" in card.text
        assert f"- Data: a local dataset (`{data_dir}`)" in card.text
    assert "is not a Hub repo id" in caplog.text
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id"):
        adapter_card(repo_id="alice/bad name")


def test_templates_are_found_in_the_checkout_and_in_the_package_folder():
    path = hub_card_template("model_card.md")
    repo_root = Path(__file__).resolve().parents[1]
    assert path == repo_root / "hub_cards" / "model_card.md"
    # the package folder an installed wheel reads from is the same file (a symlink resolved at build time)
    packaged = repo_root / "src" / "memtrain" / "resources" / "hub_cards" / "model_card.md"
    assert packaged.samefile(path)
    with pytest.raises(FileNotFoundError, match="No hub card template named 'nope.md'"):
        hub_card_template("nope.md")


def test_template_falls_back_to_the_package_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_REPO_HUB_CARDS", tmp_path / "not-a-checkout")
    assert hub_card_template("model_card.md").parts[-4:] == ("memtrain", "resources", "hub_cards", "model_card.md")


def _http_error(status: int, message: str) -> HfHubHTTPError:
    request = httpx.Request("POST", "https://huggingface.co/api")
    return HfHubHTTPError(message, response=httpx.Response(status, request=request))


class FakeHubServer:
    """Stands in for the Hub's HTTP API: records what HfApi would send and answers like the server."""

    def __init__(self, monkeypatch, accepted_tokens: set[str] | None = None, fail_commits: bool = False):
        """``accepted_tokens``: the logins ``whoami`` accepts (None: any non-empty token); ``fail_commits``: every
        commit is refused (a Hub outage at the end of a run). Being a reachable Hub, it also switches offline mode off.
        """
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        server = self

        def whoami(api, token=None, **kwargs):
            token = token or api.token
            if not token or (accepted_tokens is not None and token not in accepted_tokens):
                raise _http_error(401, "401 Client Error: Unauthorized (invalid token)")
            return {"name": "me", "type": "user"}

        def create_repo(api, repo_id, *, private=None, repo_type=None, exist_ok=False, **kwargs):
            server.repos.append(dict(repo_id=repo_id, private=private, repo_type=repo_type, exist_ok=exist_ok))
            server.token = api.token
            prefix = "datasets/" if repo_type == "dataset" else ""
            return RepoUrl(f"https://huggingface.co/{prefix}{repo_id}")

        def create_commit(api, repo_id, operations, *, commit_message, repo_type=None, revision=None, **kwargs):
            if fail_commits:
                raise _http_error(503, "503 Server Error: Service Unavailable")
            files = {}
            for op in operations:
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            server.commits.append(dict(repo_id=repo_id, files=files, message=commit_message, repo_type=repo_type))
            prefix = "datasets/" if repo_type == "dataset" else ""
            url = f"https://huggingface.co/{prefix}{repo_id}/commit/{'0' * 40}"
            return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """A trainer output folder: the adapter, an old README, a resumable checkpoint and a nested file."""
    out = tmp_path / "run"
    (out / "checkpoint-300").mkdir(parents=True)
    (out / "logs").mkdir()
    (out / "adapter_config.json").write_text('{"r": 16}')
    (out / "adapter_model.safetensors").write_bytes(b"\x00\x01weights")
    (out / "README.md").write_text("stale card from the Trainer")
    (out / "checkpoint-300" / "optimizer.pt").write_bytes(b"optimizer state")
    (out / "logs" / "trajectories.html").write_text("<html></html>")
    return out


def test_push_uploads_folder_and_card_in_one_commit(monkeypatch, output_dir):
    server = FakeHubServer(monkeypatch)
    card = adapter_card()
    url = push_folder_to_hub(
        output_dir,
        "alice/smollm2-135m-memtrain-lora",
        card=card,
        private=True,
        commit_message="MemTrain run",
        token="t",
    )
    assert url == f"https://huggingface.co/alice/smollm2-135m-memtrain-lora/commit/{'0' * 40}"
    assert server.repos == [
        dict(repo_id="alice/smollm2-135m-memtrain-lora", private=True, repo_type="model", exist_ok=True)
    ]
    assert server.token == "t"
    (commit,) = server.commits
    assert commit["message"] == "MemTrain run"
    assert sorted(commit["files"]) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "logs/trajectories.html",
    ]  # checkpoint-300/ is left out
    assert commit["files"]["adapter_model.safetensors"] == b"\x00\x01weights"
    pushed_card = ModelCard(commit["files"]["README.md"].decode("utf-8"))
    assert pushed_card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert str(pushed_card) == str(card)


def test_push_without_card_keeps_the_folders_readme_and_honours_patterns(monkeypatch, output_dir):
    server = FakeHubServer(monkeypatch)
    push_folder_to_hub(output_dir, "alice/memtrain-wiki-masked", repo_type="dataset", ignore_patterns=["logs/*"])
    (commit,) = server.commits
    assert commit["repo_type"] == "dataset"
    assert commit["files"]["README.md"] == b"stale card from the Trainer"
    assert "checkpoint-300/optimizer.pt" in commit["files"] and "logs/trajectories.html" not in commit["files"]


def test_push_errors_name_the_folder(monkeypatch, tmp_path):
    FakeHubServer(monkeypatch)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push_folder_to_hub(tmp_path / "missing", "alice/x")
    (tmp_path / "only-checkpoints" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "only-checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="Nothing to push from .*only-checkpoints"):
        push_folder_to_hub(tmp_path / "only-checkpoints", "alice/x")
